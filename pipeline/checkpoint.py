"""The run directory of ``train-student``: run manifest, metrics log and resumable checkpoints.

``checkpoint/`` holds ``model.safetensors``, ``optimizer.pt`` (tensors only; read with
``weights_only=True``), ``rng.pt`` and ``trainer_state.json`` (step, epoch, batches consumed in the
epoch). A new checkpoint is written to a temporary folder and swapped in, so a crash leaves the
previous checkpoint whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kdpipe.pipeline.errors import ConfigError, IntegrityError
from kdpipe.pipeline.fileio import atomic_write_json
from kdpipe.pipeline.manifest import software_versions, utc_now
from kdpipe.pipeline.progress import first_difference
from kdpipe.pipeline.students import load_state_dict_into, save_state_dict

RUN_MANIFEST = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"
# Settings that may differ when resuming (they do not change what is computed).
_RESUMABLE = {"out", "device", "num_workers", "log_every", "eval_every", "checkpoint_every",
              "local_cache", "local_cache_gb", "read_ahead"}


def run_identity(cache, config, *, world_size: int = 1) -> dict:
    """What a resumed run must share with the one it continues (the number of ranks included: it
    decides the global batch, so the order rows are seen in)."""
    settings = {k: v for k, v in config.recorded().items() if k not in _RESUMABLE}  # no storage options
    settings["world_size"] = world_size
    return {
        "cache_path": cache.location.record(),  # resolved local path, or the URL without user info
        "cache_manifest_sha256": cache.manifest_sha256,
        "cache_shards": {s["name"]: s["sha256"] for s in cache.shards},
        "settings": settings,
    }


def check_new_run_dir(out: Path) -> None:
    """Refuse a run dir holding a run with a checkpoint or a model (one that stopped before its first
    checkpoint may start over)."""
    has_checkpoint = (out / CHECKPOINT).is_dir() or (out / f"{CHECKPOINT}.old").is_dir()
    if (out / RUN_MANIFEST).is_file() and (has_checkpoint or (out / "model").is_dir()):
        raise ConfigError(f"--out {out} already holds a training run; pass --resume to continue it or choose a new --out")


def start_run_dir(out: Path, identity: dict, *, distributed: dict | None = None,
                  loss_implementation: str | None = None) -> None:
    """Create the run dir and its ``run.json`` (status running)."""
    check_new_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS).unlink(missing_ok=True)
    atomic_write_json(out / RUN_MANIFEST, {"status": "running", "started_at": utc_now(), **identity,
                                           "distributed": distributed or {"world_size": 1},
                                           "loss_implementation": loss_implementation,
                                           "software": software_versions()})


def _check_resumable(out: Path, identity: dict) -> dict:
    path = out / RUN_MANIFEST
    if not path.is_file():
        raise ConfigError(f"--resume: {out} holds no kdpipe training run (no {RUN_MANIFEST}); drop --resume to start one")
    recorded = json.loads(path.read_text())
    if recorded.get("cache_manifest_sha256") != identity["cache_manifest_sha256"] or \
            recorded.get("cache_shards") != identity["cache_shards"]:
        raise IntegrityError(
            f"--resume refused: the cache's manifest or shard hashes differ from those {out} was trained on; "
            "resume with the same cache, or start a new run"
        )
    diff = first_difference(recorded.get("settings"), identity["settings"])
    if diff:
        raise ConfigError(f"--resume: {out} is another run: settings.{diff}; use its settings or a new --out")
    return recorded


def save_checkpoint(out: Path, model, optimizer, step: int, epoch: int, batches_in_epoch: int) -> None:
    final, tmp, old = out / CHECKPOINT, out / f"{CHECKPOINT}.tmp", out / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state_dict(model, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    atomic_write_json(tmp / "trainer_state.json", {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch})
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, identity: dict, model, optimizer) -> dict:
    _check_resumable(out, identity)
    folder = out / CHECKPOINT if (out / CHECKPOINT).is_dir() else out / f"{CHECKPOINT}.old"
    if not (folder / "trainer_state.json").is_file():
        raise ConfigError(f"--resume: {out} has no checkpoint yet; drop --resume and start over")
    load_state_dict_into(model, folder / "model.safetensors")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True)["torch"])
    return json.loads((folder / "trainer_state.json").read_text())


def append_metrics(out: Path, record: dict) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_metrics(out: Path) -> list[dict]:
    path = out / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_metrics(out: Path, step: int) -> None:
    """Drop records logged after the checkpoint a run resumes from."""
    kept = [r for r in _read_metrics(out) if r["step"] <= step]
    from kdpipe.pipeline.fileio import atomic_write_bytes

    atomic_write_bytes(out / METRICS, "".join(json.dumps(r) + "\n" for r in kept).encode())


def last_eval(out: Path) -> dict | None:
    evals = [r for r in _read_metrics(out) if r.get("split") == "eval"]
    return evals[-1] if evals else None


def write_run_manifest(out: Path, identity: dict, config, *, final_metrics: dict, eval_metrics, total_steps: int) -> dict:
    recorded = json.loads((out / RUN_MANIFEST).read_text())
    manifest = {
        **recorded, **identity, "status": "finished", "finished_at": utc_now(),
        "resolved_settings": config.recorded(), "total_steps": total_steps,
        "final_train_metrics": final_metrics, "final_eval_metrics": eval_metrics,
        "software": software_versions(), "model_dir": "model",
    }
    atomic_write_json(out / RUN_MANIFEST, manifest)
    return manifest
