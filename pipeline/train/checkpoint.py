"""The run directory of ``train-student``: run manifest, metrics log and resumable checkpoints.

``run.json`` is written when a run starts (status ``running``): the cache's hashes, every resolved
setting, the number of steps, a ``run_id`` that stays with the run. A resumed run reads its settings
back from it (:func:`recorded_settings`) and must share the ones that decide what is computed
(:func:`run_identity`), except that a larger ``steps`` or ``epochs`` extends the run -- also a finished
one: run.json then lists the extension under ``extensions`` and goes back to ``running``.

``checkpoint/`` (and ``checkpoint.previous/``) are written and verified by
:mod:`kdpipe.pipeline.train.checkpoint_files`: a resume refuses a checkpoint whose files do not match
its ``checkpoint.json``, naming the previous checkpoint when that one is intact.
:func:`finished_already` tells a resume that has nothing to do (a finished run, no longer length asked)
before anything is read or written; ``metrics.jsonl`` is :mod:`kdpipe.pipeline.train.metrics_log`'s.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch

from kdpipe.pipeline.cache.manifest import manifest_checksum, software_versions, utc_now
from kdpipe.pipeline.errors import ConfigError, IntegrityError
from kdpipe.pipeline.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from kdpipe.pipeline.provenance import PACKAGES_FILE, command_record, first_difference, packages_text
from kdpipe.pipeline.train.checkpoint_files import DamagedCheckpoint, checkpoint_folders, load_checkpoint_files, verify_checkpoint
from kdpipe.pipeline.train.metrics_log import METRICS, read_metrics, truncate_metrics

RUN_MANIFEST = "run.json"
# Settings that may differ when resuming: they do not change what is computed. The cache is known by
# the hashes of its manifest and shards (checked apart), not by its path: it may have moved.
RESUMABLE_SETTINGS = {"out", "cache", "device", "num_workers", "log_every", "eval_every", "checkpoint_every",
              "local_cache", "local_cache_gb", "read_ahead", "report_to", "gradient_checkpointing"}
# Settings a resumed run may raise: it then goes on to the new length.
_EXTENDABLE = ("steps", "epochs")
_FINISHED_KEYS = ("finished_at", "final_train_metrics", "final_eval_metrics", "model_dir")


def run_identity(cache, config, *, world_size: int = 1, cross_tokenizer: bool = False) -> dict:
    """What a resumed run must share with the one it continues (the number of ranks included: it
    decides the global batch, so the order rows are seen in; the cross-tokenizer loss only for a student
    with another tokenizer)."""
    settings = {k: v for k, v in config.recorded().items() if k not in RESUMABLE_SETTINGS}  # no storage options
    settings["world_size"] = world_size
    if not cross_tokenizer or settings.get("cross_tokenizer_loss") == "prefix-map":  # it does not apply, or is
        settings.pop("cross_tokenizer_loss", None)  # prefix-map: runs from before prefix-groups did not record it
    if settings.get("sharding") == "ddp" and not settings.get("cpu_offload"):  # as runs from before --sharding
        settings.pop("sharding", None)
        settings.pop("cpu_offload", None)
    if settings.get("lora_r") is None:  # no LoRA: the identity of runs from before LoRA existed
        for key in ("lora_r", "lora_alpha", "lora_targets"):
            settings.pop(key, None)
    return {
        "cache_path": cache.location.record(),  # resolved local path, or the URL without user info
        "cache_manifest_sha256": cache.manifest_sha256,
        "cache_shards": {s["name"]: s["sha256"] for s in cache.shards},
        "settings": settings,
    }


def check_new_run_dir(out: Path) -> None:
    """Refuse a run dir holding a run with a checkpoint or a model (one that stopped before its first
    checkpoint may start over)."""
    if (out / RUN_MANIFEST).is_file() and (checkpoint_folders(out) or (out / "model").is_dir()):
        raise ConfigError(f"--out {out} already holds a training run; pass --resume to continue it or choose a new --out")


def start_run_dir(out: Path, identity: dict, *, resolved_settings: dict, total_steps: int, task: str,
                  seq_len: int | None = None, distributed: dict | None = None,
                  loss_implementation: str | None = None, device: str | None = None,
                  teacher_vocab_size: int | None = None, lora: dict | None = None,
                  cross_tokenizer: dict | None = None) -> None:
    """Create the run dir and its ``run.json`` (status running, every resolved setting; ``seq_len``: the
    training rows' length, which ``evaluate`` uses for this model's data rows; ``teacher_vocab_size``:
    the teacher's V_t, to which ``evaluate`` cuts a larger (padded) student's logits as training did;
    ``lora``: a LoRA run's settings, adapted layers, trainable parameters and base weights' sha256;
    ``cross_tokenizer``: a student with another tokenizer: its loss, tokenizers, shared ids, aligned share;
    ``command``: the kdpipe command line, which ``kdpipe reproduce`` re-runs)."""
    check_new_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS).unlink(missing_ok=True)
    atomic_write_bytes(out / PACKAGES_FILE, packages_text().encode())
    write_run_json(out, {"status": "running", "run_id": uuid.uuid4().hex[:16], "started_at": utc_now(),
                         "command": command_record(), "task": task, "seq_len": seq_len,
                         "teacher_vocab_size": teacher_vocab_size, **identity,
                         "resolved_settings": resolved_settings, "total_steps": total_steps,
                         "distributed": distributed or {"world_size": 1}, "device": device,
                         "loss_implementation": loss_implementation, "software": software_versions(),
                         **({"lora": lora} if lora else {}),
                         **({"cross_tokenizer": cross_tokenizer} if cross_tokenizer else {})})


def describe_device(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``: what computed the run (recorded in run.json)."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def write_run_json(out: Path, manifest: dict) -> None:
    """Write ``run.json`` atomically with a ``checksum`` of its canonical JSON (as a cache manifest has),
    so that ``kdpipe reproduce`` can tell an edited run directory."""
    manifest = {k: v for k, v in manifest.items() if k != "checksum"}
    atomic_write_json(out / RUN_MANIFEST, {**manifest, "checksum": manifest_checksum(manifest)})


def read_run(out: Path) -> dict:
    """The ``run.json`` of the run in ``out``."""
    path = out / RUN_MANIFEST
    if not path.is_file():
        raise ConfigError(f"--resume: {out} holds no kdpipe training run (no {RUN_MANIFEST}); drop --resume to start one")
    try:
        recorded = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        recorded = None
    if not isinstance(recorded, dict) or ("checksum" in recorded and recorded["checksum"] != manifest_checksum(recorded)):
        raise IntegrityError(f"--resume refused: {path} is damaged or was edited (not JSON, or its checksum does not match); "
                             "restore it, or start a new run")
    return recorded


def recorded_settings(out: Path) -> dict:
    """The settings to resume the run in ``out`` with: every setting its run.json records, the cache
    by its resolved path (the run may resume from another working directory)."""
    recorded = read_run(out)
    settings = dict(recorded.get("resolved_settings") or recorded.get("settings") or {})  # older runs: settings
    settings.pop("world_size", None)
    if recorded.get("cache_path"):
        settings["cache"] = recorded["cache_path"]
    return settings


def check_resumable(out: Path, identity: dict) -> dict:
    """Refuse to resume ``out`` with another cache or other settings than it recorded, except a larger
    ``steps``/``epochs``; returns its run.json."""
    recorded = read_run(out)
    if recorded.get("cache_manifest_sha256") != identity["cache_manifest_sha256"] or \
            recorded.get("cache_shards") != identity["cache_shards"]:
        raise IntegrityError(
            f"--resume refused: the cache's manifest or shard hashes differ from those {out} was trained on; "
            "resume with the same cache, or start a new run"
        )
    old = {k: v for k, v in (recorded.get("settings") or {}).items() if k not in RESUMABLE_SETTINGS}  # older runs had more
    new = identity["settings"]
    for key in _EXTENDABLE:
        if old.get(key) is not None and new.get(key) is not None and new[key] >= old[key]:
            old[key] = new[key]  # a longer run goes on
    diff = first_difference(old, new)
    if diff:
        raise ConfigError(f"--resume: {out} is another run: settings.{diff}; {_resume_fix(diff.split(' ', 1)[0], old)}")
    return recorded


def _resume_fix(key: str, old: dict) -> str:
    """How to resume when setting ``key`` differs from the recorded ``old`` ones."""
    if key in _EXTENDABLE:
        return ("a run can be extended (a larger --steps, or --epochs, of the kind it recorded), not shortened; "
                "choose a new --out for a shorter run")
    if key == "world_size":
        return f"resume it with {old.get(key)} processes under torchrun, or choose a new --out"
    return f"drop --{key.replace('_', '-')} to continue with the run's setting, or choose a new --out"


def resume_run_dir(out: Path, identity: dict, config, *, step: int, total_steps: int) -> None:
    """Record in run.json that the run goes on from ``step`` to ``total_steps`` (status running; an
    extension listed under ``extensions``) and drop the metrics logged after ``step``."""
    truncate_metrics(out, step)
    recorded = read_run(out)
    extensions = list(recorded.get("extensions", []))
    if recorded.get("total_steps") not in (None, total_steps):
        extensions.append({"at_step": step, "from_total_steps": recorded["total_steps"],
                           "to_total_steps": total_steps, "at": utc_now(), "command": command_record()})
    manifest = {k: v for k, v in recorded.items() if k not in _FINISHED_KEYS}
    manifest |= {**identity, "status": "running", "run_id": recorded.get("run_id") or uuid.uuid4().hex[:16],
                 "resolved_settings": config.recorded(), "total_steps": total_steps, "extensions": extensions}
    write_run_json(out, manifest)


def finished_already(out: Path, recorded: dict, total_steps: int) -> bool:
    """Whether a resume of the run in ``out`` (``recorded``: its run.json, checked by
    :func:`check_resumable`) to ``total_steps`` has nothing to do: the run finished at that length and
    its model is there."""
    return recorded.get("status") == "finished" and recorded.get("total_steps") == total_steps and \
        (out / "model").is_dir()


def load_checkpoint(out: Path, model, optimizer, *, rank: int = 0) -> dict:
    """Load the latest checkpoint of ``out`` into ``model``, ``optimizer`` and the torch RNG (of
    ``rank``) once it is verified (after :func:`check_resumable`); returns its trainer state (step,
    epoch, batches_in_epoch). A damaged checkpoint is refused, naming the previous one when that is
    intact. A sharded checkpoint (``--sharding fsdp``) loads into the FSDP root ``model`` on every rank."""
    folders = checkpoint_folders(out)
    if not folders:
        if (out / "model").is_dir():
            raise ConfigError(f"--resume: {out} finished without a checkpoint (it ran with --checkpoint-every 0), "
                              f"so it cannot go on; train a new run from its model: --student {out / 'model'} --out NEW_DIR")
        raise ConfigError(f"--resume: {out} has no checkpoint yet; drop --resume and start over")
    try:
        state = verify_checkpoint(folders[0])
    except DamagedCheckpoint as damage:
        raise IntegrityError(f"--resume refused: checkpoint {damage.folder} is damaged: {damage.reason}; "
                             f"{_previous_good(folders[1:], damage.folder)}") from None
    read_metrics(out)  # a damaged metrics.jsonl is refused before anything is loaded or written
    load_checkpoint_files(folders[0], model, optimizer, rank=rank)
    return state


def _previous_good(older: list[Path], damaged: Path) -> str:
    """What to do about a damaged latest checkpoint: resume from the previous one if it is intact."""
    for folder in older:
        try:
            step = verify_checkpoint(folder)["step"]
        except DamagedCheckpoint:
            continue
        return (f"the previous checkpoint {folder} (step {step}) is intact: delete {damaged} to resume from it, "
                "or start a new run")
    return "no intact earlier checkpoint is kept: start a new run (or restore the checkpoint from a backup)"


def write_run_manifest(out: Path, identity: dict, config, *, final_metrics: dict, eval_metrics, total_steps: int) -> dict:
    recorded = json.loads((out / RUN_MANIFEST).read_text())
    atomic_write_bytes(out / PACKAGES_FILE, packages_text().encode())  # the finishing process's packages
    manifest = {
        **recorded, **identity, "status": "finished", "finished_at": utc_now(),
        "resolved_settings": config.recorded(), "total_steps": total_steps,
        "final_train_metrics": final_metrics, "final_eval_metrics": eval_metrics,
        "software": software_versions(), "model_dir": "model", "outputs": output_hashes(out),
    }
    write_run_json(out, manifest)
    return read_run(out)


def output_hashes(out: Path) -> dict[str, str]:
    """sha256 of each file of the final model (and a LoRA run's adapter) and of metrics.jsonl, by path
    relative to ``out``."""
    files = sorted(p for folder in ("model", "adapter") for p in (out / folder).rglob("*") if p.is_file())
    files.append(out / METRICS)
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in files if p.is_file()}
