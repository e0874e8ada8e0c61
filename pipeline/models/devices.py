"""Where and in which precision a model runs: ``--device``, ``--dtype`` and ``--threads`` as the stages take them."""

from __future__ import annotations

import torch

from kdpipe.pipeline.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 (or fp16 without bf16 support) on CUDA, fp32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise ConfigError(f"unknown --dtype {name!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def set_cpu_threads(threads: int | None) -> int:
    """Make torch run its CPU operations on ``threads`` threads (None: leave torch's default, one per
    physical core, or what ``OMP_NUM_THREADS`` says); the count now in effect, which manifests and
    run.json record (``software.torch_threads``).

    Only the intra-op count is set: kdpipe's stages run eager operations one after another, which the
    inter-op pool does not parallelise. On a machine whose cores are busy with other work, fewer threads
    than cores is faster (they stop waiting for each other); the CPU bits depend on the count, so
    ``kdpipe reproduce`` re-runs with the recorded one.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"--threads {threads} must be a whole number of 1 or more (torch's CPU threads); "
                              "leave it out for torch's default")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
