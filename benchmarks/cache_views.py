"""What a cache keeps of the teacher, by k and by encoding: the numbers of docs/choosing-k.md.

    python benchmarks/cache_views.py --work /tmp/cache-views --out benchmarks/results/cache_views_cpu.json

On the shipped demo teacher (``data/teacher``, V = 2,048) and the held-out play, seq-len 128:

- ``tail_mass_by_k``: for k = 8, 32, 128, 512, a capture of 128 rows at T = 1, 2, 4 (default values)
  and its ``kdpipe inspect --json --sample-rows 128``: bytes/token and the mean tail mass per T;
- ``fidelity``: top-64 quantized, top-64 float16 and top-16 + 16 draws captures of 32 rows (T = 1, 2)
  and their ``kdpipe inspect --fidelity --rows 16 --json``: per T the KL between the dense teacher and
  the cache's view, the teacher mass the cached ids cover and the KD gradient's cosine.

Every command is the ``kdpipe`` of the running interpreter's venv and is recorded with its output.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KDPIPE = str(Path(sys.executable).parent / "kdpipe")
CAPTURE = "cache-teacher --teacher {repo}/data/teacher --data {repo}/data/shakespeare/heldout --out {out} --seq-len 128"
TAIL_K = (8, 32, 128, 512)
FIDELITY = {"top-64 quantized": "--top-k 64", "top-64 float16": "--top-k 64 --values float16",
            "top-16 + 16 draws (at T = 1)": "--top-k 16 --sample 16"}


def kdpipe(args: str) -> dict | None:
    done = subprocess.run([KDPIPE, *shlex.split(args)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"kdpipe {args} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout) if "--json" in args else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    work = args.work.resolve()
    tail = {}
    for k in TAIL_K:
        out = work / f"k{k}"
        kdpipe(CAPTURE.format(repo=REPO, out=out) + f" --top-k {k} --temperature 1 --temperature 2 --temperature 4"
               " --limit-rows 128")
        tail[str(k)] = kdpipe(f"inspect {out} --json --sample-rows 128")
    fidelity = {}
    for label, options in FIDELITY.items():
        out = work / label.split(" (")[0].replace(" ", "")
        kdpipe(CAPTURE.format(repo=REPO, out=out) + f" {options} --limit-rows 32")
        fidelity[label] = {"options": options, "inspect": kdpipe(f"inspect {out} --fidelity --rows 16 --json")}
    report = {"benchmark": "cache_views", "command": " ".join(shlex.quote(a) for a in sys.argv),
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              "tail_mass_by_k": tail, "fidelity": fidelity}
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
