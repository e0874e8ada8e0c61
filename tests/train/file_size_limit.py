"""Run the kdpipe command line with a limit on the size of every file this process writes, the way a
full disk stops a write: ``python file_size_limit.py BYTES RANK kdpipe-args...``.

Past ``BYTES`` a write fails with the operating system's own error (``[Errno 27] File too large``,
through safetensors' or torch's writer as on a full disk). ``RANK``: under torchrun, the one rank
limited (``all``: every process). Used by tests/train/test_checkpoint_integrity.py.
"""

from __future__ import annotations

import os
import resource
import signal
import sys


def main() -> None:
    limit, rank, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if rank == "all" or os.environ.get("RANK", "0") == rank:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    from kdpipe.stages.cli import main as kdpipe

    sys.argv = ["kdpipe", *args]
    kdpipe()


if __name__ == "__main__":
    main()
