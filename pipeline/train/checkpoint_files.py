"""A checkpoint folder: written whole, then trusted only after it is verified.

``checkpoint/`` holds ``model.safetensors``, ``optimizer.pt`` (tensors only; read with
``weights_only=True``), ``rng.pt``, ``trainer_state.json`` (step, epoch, batches consumed in the
epoch) and, written last, ``checkpoint.json``: the byte size and sha256 of each of those files and a
``checksum`` of its own canonical JSON (as ``run.json`` has). A resume verifies all of it
(:func:`verify_checkpoint`) before it loads anything, so an edited ``trainer_state.json``, a zeroed or
truncated file or a missing manifest is refused, not trained on.

Rotation. The previous checkpoint is kept as ``checkpoint.previous/``. A new one is written into
``checkpoint.tmp/`` (the one before the previous is deleted first, so at most two whole checkpoints
and the one being written share the disk), then ``checkpoint/`` becomes ``checkpoint.previous/`` and
``checkpoint.tmp/`` becomes ``checkpoint/``. A crash at any moment leaves at least one whole
checkpoint: ``checkpoint/``, or ``checkpoint.previous/`` alone between the two renames, which a resume
then takes. A failed write (disk full) deletes ``checkpoint.tmp/`` and raises a one-line
:class:`~kdpipe.pipeline.errors.WriteError`; the checkpoints already written stay as they were.

Sharded checkpoints (``--sharding fsdp``, format ``kdpipe-sharded-checkpoint/1``) rotate alike, and
every rank writes its own shards: ``dcp/`` is a ``torch.distributed.checkpoint`` folder (one
``__R_0.distcp`` file per rank with its shards of the model and of the AdamW state, and ``.metadata``),
``rng/rankR.pt`` each rank's torch RNG, ``trainer_state.json``; no rank gathers the whole model or
optimizer. Each rank hashes a share of the files, rank 0 writes ``checkpoint.json`` listing them all
(and the world size), then renames. The folder must be on a file system all ranks share (one machine,
or a shared mount). ``.metadata`` is a pickle (DCP's format); it is read with an unpickler that builds
only DCP's metadata classes, never arbitrary objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from kdpipe.pipeline.cache.manifest import manifest_checksum
from kdpipe.pipeline.errors import WriteError
from kdpipe.pipeline.fileio import atomic_write_json, describe_os_error, fix_for_os_error, fsync_dir, sha256_file
from kdpipe.pipeline.models.students import load_state_dict_into, save_state_dict

CHECKPOINT = "checkpoint"
PREVIOUS = f"{CHECKPOINT}.previous"
WRITING = f"{CHECKPOINT}.tmp"
MANIFEST = "checkpoint.json"
FORMAT = "kdpipe-checkpoint/1"
FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")
SHARDED_FORMAT = "kdpipe-sharded-checkpoint/1"
DCP_FOLDER = "dcp"


class DamagedCheckpoint(Exception):
    """A checkpoint folder that fails verification; ``reason`` says how (internal: callers turn it
    into a one-line user error naming the folder and what to do)."""

    def __init__(self, folder: Path, reason: str):
        super().__init__(f"{folder}: {reason}")
        self.folder, self.reason = folder, reason


def checkpoint_folders(out: Path) -> list[Path]:
    """The checkpoint folders of the run in ``out``, the latest first (``checkpoint/``, then
    ``checkpoint.previous/``), those that exist."""
    return [folder for folder in (out / CHECKPOINT, out / PREVIOUS) if folder.is_dir()]


def save_checkpoint(out: Path, model, optimizer, trainer_state: dict) -> None:
    """Write a checkpoint of ``model``, ``optimizer``, the torch RNG and ``trainer_state`` (``step``,
    ``epoch``, ``batches_in_epoch``) as the run's latest, keeping the one it replaces as the previous."""
    final, previous, tmp = out / CHECKPOINT, out / PREVIOUS, out / WRITING
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer
    if final.is_dir():
        shutil.rmtree(previous, ignore_errors=True)  # ``final`` becomes the previous one below
    with _checkpoint_write_errors(out, tmp, step=trainer_state["step"]):
        tmp.mkdir(parents=True)
        save_state_dict(model, tmp / "model.safetensors")
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        atomic_write_json(tmp / "trainer_state.json", trainer_state)
        files = {name: _file_record(tmp / name) for name in FILES}
        manifest = {"format": FORMAT, "step": trainer_state["step"], "files": files}
        _land(out, manifest)


def _land(out: Path, manifest: dict) -> None:
    """Write ``checkpoint.tmp/checkpoint.json`` (last) and rename the folder into place, the latest
    checkpoint becoming the previous one."""
    final, previous, tmp = out / CHECKPOINT, out / PREVIOUS, out / WRITING
    atomic_write_json(tmp / MANIFEST, {**manifest, "checksum": manifest_checksum(manifest)})
    fsync_dir(tmp)
    if final.is_dir():
        final.rename(previous)
    tmp.rename(final)
    fsync_dir(out)


def save_sharded_checkpoint(out: Path, root, optimizer, trainer_state: dict, *, rank: int) -> None:
    """Every rank of an FSDP run: write this rank's shards of ``root`` (the FSDP root module) and
    ``optimizer``, its RNG and (rank 0) ``trainer_state`` into ``checkpoint.tmp/``, hash its share of
    the files; rank 0 then lists them all in ``checkpoint.json`` and lands the folder as :func:`save_checkpoint`."""
    from kdpipe.pipeline.train.sharded_checkpoint import gather_to_rank_0, save_shards, wait_for_ranks

    final, previous, tmp = out / CHECKPOINT, out / PREVIOUS, out / WRITING
    step = trainer_state["step"]
    with _checkpoint_write_errors(out, tmp, step=step):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer
            if final.is_dir():
                shutil.rmtree(previous, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
            atomic_write_json(tmp / "trainer_state.json", trainer_state)
        wait_for_ranks()  # tmp/ is ready
        _torch_save({"torch": torch.get_rng_state()}, tmp / "rng" / f"rank{rank}.pt")
        world_size = save_shards(tmp / DCP_FOLDER, root, optimizer)  # returns once every rank's files are written
        names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        mine = {name: _file_record(tmp / name) for name in names[rank::world_size]}  # ranks hash a share each
        shares = gather_to_rank_0(mine)
        if rank == 0:
            files = {name: record for share in shares for name, record in share.items()}
            _land(out, {"format": SHARDED_FORMAT, "step": step, "world_size": world_size, "files": files})
    wait_for_ranks()  # no rank goes on (and may write the next checkpoint) before this one landed


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def verify_checkpoint(folder: Path) -> dict:
    """The trainer state of the checkpoint in ``folder`` once every file matches its ``checkpoint.json``;
    raises :class:`DamagedCheckpoint` saying what does not."""
    path = folder / MANIFEST
    if not path.is_file():
        raise DamagedCheckpoint(folder, f"it has no {MANIFEST} (written last: the checkpoint is incomplete, "
                                        "or from a kdpipe that did not write one)")
    try:
        manifest = json.loads(path.read_text())
        recorded = manifest["checksum"], manifest["files"], manifest["step"]
        required = _required_files(manifest)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DamagedCheckpoint(folder, f"its {MANIFEST} is not a checkpoint manifest (damaged)") from None
    if manifest_checksum(manifest) != recorded[0] or not required <= set(recorded[1]):
        raise DamagedCheckpoint(folder, f"its {MANIFEST} was edited (its checksum does not match)")
    for name, expected in recorded[1].items():
        file = folder / name
        if not file.is_file():
            raise DamagedCheckpoint(folder, f"{name} is missing")
        if file.stat().st_size != expected["bytes"] or sha256_file(file) != expected["sha256"]:
            raise DamagedCheckpoint(folder, f"{name} does not match the size and sha256 its {MANIFEST} records "
                                            "(edited or damaged)")
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == recorded[2], "a verified trainer_state.json holds the manifest's step"
    return state


def _required_files(manifest: dict) -> set[str]:
    """The files a checkpoint of ``manifest``'s format must list (a sharded one: also every distcp file)."""
    if manifest.get("format") == SHARDED_FORMAT:
        ranks = int(manifest["world_size"])
        return {"trainer_state.json", f"{DCP_FOLDER}/.metadata", *(f"rng/rank{r}.pt" for r in range(ranks))}
    return set(FILES)


def load_checkpoint_files(folder: Path, model, optimizer, *, rank: int = 0) -> None:
    """Load a verified checkpoint (:func:`verify_checkpoint`) into ``model``, ``optimizer`` and the torch
    RNG; a sharded one into the FSDP root ``model`` (every rank reads its shards; ``rank``: whose RNG)."""
    if json.loads((folder / MANIFEST).read_text()).get("format") == SHARDED_FORMAT:
        from kdpipe.pipeline.train.sharded_checkpoint import load_shards

        load_shards(folder / DCP_FOLDER, model, optimizer)
        torch.set_rng_state(torch.load(folder / "rng" / f"rank{rank}.pt", weights_only=True)["torch"])
        return
    load_state_dict_into(model, folder / "model.safetensors")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True)["torch"])


def _torch_save(obj, path: Path) -> None:
    """``torch.save`` through a Python file, so a full disk surfaces as an ``OSError`` with its errno."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _checkpoint_write_errors(out: Path, tmp: Path, *, step: int):
    """Turn a failed write of the checkpoint of ``step`` (disk full, unwritable --out) into a one-line
    :class:`WriteError` naming the checkpoint kept; the half-written ``tmp`` is deleted."""
    try:
        yield
    except Exception as exc:
        problem = _write_problem(exc)
        if problem is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        kept = _kept_step(out)
        then = (f"resume: train-student --out {out} --resume (its checkpoint of step {kept} is intact)"
                if kept is not None else "run the same command again (the run had no checkpoint yet)")
        raise WriteError(f"cannot write the checkpoint of step {step} to --out {out}: {problem}; "
                         f"{_fix(exc)} and {then}") from exc


def _write_problem(exc: BaseException) -> str | None:
    """``[Errno 28] No space left on device`` for a failed write (an ``OSError``, safetensors' error
    with its ``os error N``, or torch.save's writer failing); None for anything else."""
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    errno_in_text = re.search(r"os error (\d+)", str(exc))
    if type(exc).__name__ == "SafetensorError" and errno_in_text:
        return describe_os_error(OSError(int(errno_in_text[1]), os.strerror(int(errno_in_text[1]))))
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in str(exc) or "inline_container" in str(exc)):
        return f"torch.save failed ({str(exc).splitlines()[0][:160]})"
    return None


def _fix(exc: BaseException) -> str:
    errno_in_text = re.search(r"os error (\d+)", str(exc))
    if isinstance(exc, OSError):
        return fix_for_os_error(exc)
    return fix_for_os_error(OSError(int(errno_in_text[1]), "")) if errno_in_text else "free space"


def _kept_step(out: Path) -> int | None:
    for folder in checkpoint_folders(out):
        with contextlib.suppress(DamagedCheckpoint, OSError, ValueError, KeyError):
            return verify_checkpoint(folder)["step"]
    return None

