"""Re-run a recorded capture or training run and compare what comes out with what was recorded.

A cache's manifest and a run's ``run.json`` record the kdpipe command line that made them, the
installed package set and the machine (:mod:`kdpipe.pipeline.provenance`). :func:`load_recorded`
reads them back and refuses a cache or run directory changed since it was written (checksums);
:func:`rerun_commands` gives the commands that make it again in a new place; :func:`compare` tells,
output by output, whether the bytes are the same; :func:`environment_differences` lists the recorded
versions that differ from the running environment, the usual reason when they are not.

Bit-reproducible, as tested: capture and training on the CPU, with the same packages, machine type and
torch thread count. Not: GPU kernels (cuBLAS/cuDNN choose algorithms by GPU model, driver and library
version, and some reductions use atomics), other torch builds, other thread counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from kdpipe.pipeline.cache.manifest import MANIFEST_NAME, manifest_checksum, software_versions
from kdpipe.pipeline.cache.storage.location import CacheLocation, is_url
from kdpipe.pipeline.errors import ConfigError, IntegrityError
from kdpipe.pipeline.fileio import sha256_file
from kdpipe.pipeline.provenance import PACKAGES_FILE, installed_packages, parse_packages
from kdpipe.pipeline.train.checkpoint import RESUMABLE_SETTINGS

RUN_MANIFEST = "run.json"
# Options that place a capture's writer among several: a re-run is one process (shards do not depend on it).
_SPLIT_OPTIONS = ("--rank", "--world-size")
# Final metrics that measure time, not what was computed.
_TIMING_KEYS = ("tokens_per_s",)
# Recorded software entries that are not installed packages (those are compared through packages.txt).
_MACHINE_KEYS = ("python", "kdpipe_git_commit", "machine", "system", "torch_threads", "torch_cuda")


@dataclasses.dataclass
class Recorded:
    """A cache or training run as recorded: ``record`` is its manifest or run.json."""

    kind: str  # "cache" or "run"
    path: str
    record: dict
    packages: dict[str, str] | None  # from packages.txt; None for outputs of kdpipe before it wrote one

    @property
    def device(self) -> str:
        return str(self.record.get("device") or "unknown")

    @property
    def on_gpu(self) -> bool:
        return "cuda" in self.device or (self.kind == "cache" and self.device not in ("cpu", "unknown"))


@dataclasses.dataclass
class Command:
    """One kdpipe command to run: ``kdpipe ARGS`` in ``cwd``, under torchrun when ``nproc`` > 1."""

    args: list[str]
    cwd: str
    nproc: int = 1

    def argv(self) -> list[str]:
        if self.nproc > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                    "-m", "kdpipe", *self.args]
        return [sys.executable, "-m", "kdpipe", *self.args]

    def shown(self) -> str:
        prefix = f"torchrun --nproc-per-node {self.nproc} " if self.nproc > 1 else ""
        return prefix + "kdpipe " + shlex.join(self.args)


@dataclasses.dataclass
class Comparison:
    matched: list[str]
    differed: list[str]

    @property
    def identical(self) -> bool:
        return not self.differed and bool(self.matched)


# ---------------------------------------------------------------- reading what was recorded
def load_recorded(path: str, *, storage_options: dict | None = None) -> Recorded:
    """The cache or finished run at ``path``, after checking that nothing in it changed since it was
    written; raises :class:`IntegrityError` (tampered) or :class:`ConfigError` (not reproducible)."""
    local = None if is_url(path) else Path(path)
    if local is not None and (local / RUN_MANIFEST).is_file():
        return _load_run(local)
    if local is not None and not (local / MANIFEST_NAME).is_file():
        raise ConfigError(f"{path} is neither a kdpipe cache (no {MANIFEST_NAME}) nor a training run (no {RUN_MANIFEST}); "
                          "give the folder cache-teacher or train-student wrote")
    return _load_cache(path, storage_options)


def _load_cache(path: str, storage_options: dict | None) -> Recorded:
    from kdpipe.pipeline.cache.reader import read_manifest
    from kdpipe.pipeline.cache.verify import verify_cache

    location = CacheLocation(path, storage_options)
    manifest = read_manifest(location)[0]  # refuses a manifest that does not match its checksum
    problems = verify_cache(path, storage_options=storage_options)
    if problems:
        raise IntegrityError(f"reproduce refused: {path} changed after it was written ({problems[0]}); "
                             "restore the cache, or capture it again")
    packages = _read_packages(lambda: location.read_bytes(PACKAGES_FILE), manifest.get("software") or {}, path)
    return Recorded("cache", path, manifest, packages)


def _load_run(root: Path) -> Recorded:
    run = json.loads((root / RUN_MANIFEST).read_text())
    if "checksum" not in run:
        raise ConfigError(f"{root}/{RUN_MANIFEST} has no checksum: the run was made by a kdpipe that recorded "
                          "neither its command nor its outputs' hashes, so it cannot be reproduced; train it again")
    if run["checksum"] != manifest_checksum(run):
        raise IntegrityError(f"reproduce refused: {root}/{RUN_MANIFEST} does not match its checksum (it was edited "
                             "after the run); restore it, or train the run again")
    if run.get("status") != "finished":
        raise ConfigError(f"{root} is a run that has not finished (status {run.get('status')!r}); "
                          "finish it (train-student --resume) before reproducing it")
    for name, digest in (run.get("outputs") or {}).items():
        target = root / name
        actual = sha256_file(target) if target.is_file() else None
        if actual != digest:
            what = "is missing" if actual is None else "does not match the sha256 run.json records"
            raise IntegrityError(f"reproduce refused: {root}/{name} {what} (the run directory changed after the "
                                 "run); restore it, or train the run again")
    packages = _read_packages(lambda: (root / PACKAGES_FILE).read_bytes(), run.get("software") or {}, str(root))
    return Recorded("run", str(root), run, packages)


def _read_packages(read, software: dict, where: str) -> dict[str, str] | None:
    """packages.txt, checked against the sha256 the manifest or run.json records."""
    if not software.get("packages_sha256"):
        return None  # written before kdpipe recorded the package set
    try:
        data = read()
    except (FileNotFoundError, OSError):
        raise IntegrityError(f"reproduce refused: {where} lacks {PACKAGES_FILE}, which its manifest records; "
                             "restore it") from None
    if hashlib.sha256(data).hexdigest() != software["packages_sha256"]:
        raise IntegrityError(f"reproduce refused: {where}/{PACKAGES_FILE} does not match the sha256 its manifest "
                             "records (edited after it was written); restore it")
    return parse_packages(data.decode())


# ---------------------------------------------------------------- the commands
def default_out(path: str) -> str:
    """Beside ``path``: ``runs/c`` -> ``runs/c-reproduced`` (also for a URL)."""
    return path.rstrip("/") + "-reproduced"


def check_new_out(out: str, *, storage_options: dict | None = None) -> None:
    """Refuse an output place that already holds something: a re-run there would resume, not redo."""
    location = CacheLocation(out, storage_options)
    if location.exists() and not location.is_empty():
        raise ConfigError(f"--out {out} already exists and is not empty; reproduce writes a fresh copy: "
                          "choose another --out or remove it")


def rerun_commands(recorded: Recorded, out: str, *, storage_options: str | None = None) -> list[Command]:
    """The commands that make ``recorded`` again in ``out``: a cache's capture (one process); a run's
    start and then each extension (``--resume`` with a larger length), under torchrun as recorded."""
    record = recorded.record
    if recorded.kind == "cache":
        steps = [record.get("command")]
        nproc = 1
    else:
        steps = [record.get("command")] + [e.get("command") for e in record.get("extensions") or []]
        nproc = int((record.get("distributed") or {}).get("world_size") or 1)
    if any(not step for step in steps):
        where = "manifest" if recorded.kind == "cache" else "run.json"
        raise ConfigError(f"{recorded.path} records no kdpipe command line in its {where} (it was made from Python, or "
                          "by a kdpipe that did not record one), so there is nothing to re-run")
    expected = "cache-teacher" if recorded.kind == "cache" else "train-student"
    made_by = subcommand(steps[0]["args"])
    if made_by != expected:
        raise ConfigError(f"{recorded.path} was made by 'kdpipe {made_by}', not by 'kdpipe {expected}'; reproduce "
                          f"re-runs {expected} commands only (re-run 'kdpipe {made_by}' into a new --out yourself)")
    out = out if is_url(out) else str(Path(out).resolve())
    commands = []
    for step in steps:
        args = _with_out(_without(step["args"], _SPLIT_OPTIONS if recorded.kind == "cache" else ()), out)
        args = _with_threads(_with_storage_options(args, storage_options), record)
        if recorded.kind == "cache":
            args = _with_recorded_targets(args, record)
        elif record.get("cross_tokenizer") and not _given(args, "--cross-tokenizer-loss"):
            args = [*args, "--cross-tokenizer-loss", record["cross_tokenizer"]["loss"]]  # as a later default may differ
        cwd = step.get("cwd") if step.get("cwd") and Path(step["cwd"]).is_dir() else os.getcwd()
        commands.append(Command(args, cwd, nproc))
    return commands


def subcommand(args: list[str]) -> str | None:
    """The kdpipe subcommand in ``args`` (after the global options ``-q`` and ``--log-level LEVEL``)."""
    it = iter(args)
    for arg in it:
        if arg == "--log-level":
            next(it, None)
        elif not arg.startswith("-"):
            return arg
    return None


def run_command(command: Command) -> int:
    """Run ``command`` (its output goes to this process's stdout and stderr); its exit code."""
    return subprocess.run(command.argv(), cwd=command.cwd).returncode


def _without(args: list[str], options: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.split("=", 1)[0] in options:
            out.append(arg)
    return out


def _with_out(args: list[str], out: str) -> list[str]:
    """``args`` with its ``--out`` value replaced by ``out`` (added when it came from a --config file)."""
    args = _without(args, ("--out",))
    return [*args, "--out", out]


def _with_threads(args: list[str], record: dict) -> list[str]:
    """``args`` with the recorded torch thread count made explicit (``--threads N``) where the command left it
    to torch's default, which differs between machines: the CPU bits depend on it."""
    threads = (record.get("software") or {}).get("torch_threads")
    if not threads or any(arg.split("=", 1)[0] == "--threads" for arg in args):
        return args
    return [*args, "--threads", str(threads)]


def _given(args: list[str], *options: str) -> bool:
    return any(arg.split("=", 1)[0] in options for arg in args)


def _with_recorded_targets(args: list[str], manifest: dict) -> list[str]:
    """``args`` with what the capture kept made explicit where the command left it to defaults that a later
    kdpipe may have changed: ``--top-k``/``--sample`` (the default was top-64 alone, then top-12 + 16
    draws, now top-6 + 8), ``--sample-temperature`` (draws at one temperature before they were split over all of them)
    and ``--no-text`` (rows without their text before causal-LM caches recorded it)."""
    capture, schema = manifest.get("capture") or {}, manifest.get("schema") or {}
    added: list[str] = []
    if not _given(args, "--top-k", "--sample") and "top_k" in capture:
        added += ["--top-k", str(capture["top_k"]), "--sample", str(capture.get("sample") or 0)]
    if schema.get("sample_draws") and schema.get("sample_temperature") is not None and not schema.get("sample_scheme") \
            and not _given(args, "--sample-temperature"):
        added += ["--sample-temperature", repr(float(schema["sample_temperature"]))]
    packing = (manifest.get("data") or {}).get("packing") or {}
    if schema.get("task", "causal-lm") == "causal-lm" and "text" not in packing and not _given(args, "--text", "--no-text"):
        added.append("--no-text")
    return [*args, *added]


def _with_storage_options(args: list[str], storage_options: str | None) -> list[str]:
    """The storage options given now in place of the ones never recorded (dropped when none are given:
    credentials then come from the environment)."""
    args = _without(args, ("--storage-options",))
    return [*args, "--storage-options", storage_options] if storage_options else args


# ---------------------------------------------------------------- comparing
def compare(recorded: Recorded, rerun: Recorded) -> Comparison:
    """Output by output, whether what the re-run wrote (read back with :func:`load_recorded`) equals
    what was recorded."""
    if recorded.kind == "cache":
        return _compare_caches(recorded.record, rerun.record)
    return _compare_runs(recorded.record, rerun.record)


def _compare_caches(old: dict, new: dict) -> Comparison:
    matched, differed = [], []
    for key in ("teacher", "tokenizer"):  # inputs: when they differ, the shards cannot match
        if (old.get(key) or {}).get("sha256") != (new.get(key) or {}).get("sha256"):
            differed.append(f"input {key}: its fingerprint differs from the recorded one (another model or tokenizer)")
    if (old.get("data") or {}).get("sha256") != (new.get("data") or {}).get("sha256"):
        differed.append("input data: its file hashes differ from the recorded ones (the data changed)")
    old_shards = {s["name"]: s["sha256"] for s in old["shards"]}
    new_shards = {s["name"]: s["sha256"] for s in new["shards"]}
    for name in sorted(old_shards.keys() | new_shards.keys()):
        a, b = old_shards.get(name), new_shards.get(name)
        if a == b:
            matched.append(f"shard {name}: sha256 {a[:12]}")
        elif b is None or a is None:
            differed.append(f"shard {name}: {'missing from the re-run' if b is None else 'not in the recorded cache'}")
        else:
            differed.append(f"shard {name}: sha256 {a[:12]} recorded, {b[:12]} now")
    return Comparison(matched, differed)


def _compare_runs(old: dict, new: dict) -> Comparison:
    matched, differed = [], []
    for key in ("cache_manifest_sha256", "cache_shards"):
        if old.get(key) != new.get(key):
            differed.append(f"input cache: {key} differs from the recorded one (trained on another cache)")
    old_settings, new_settings = (_comparable_settings(r) for r in (old, new))
    for key in sorted(old_settings.keys() | new_settings.keys()):
        if old_settings.get(key) != new_settings.get(key):
            differed.append(f"setting {key}: {old_settings.get(key)!r} recorded, {new_settings.get(key)!r} now")
    new_outputs = new.get("outputs") or {}
    for name, digest in sorted((old.get("outputs") or {}).items()):
        if not name.startswith("model/"):
            continue  # metrics.jsonl holds timings; its metrics are compared below
        now = new_outputs.get(name)
        if now == digest:
            matched.append(f"{name}: sha256 {digest[:12]}")
        else:
            differed.append(f"{name}: sha256 {digest[:12]} recorded, {now[:12] if now else 'missing'} now")
    for key in ("final_train_metrics", "final_eval_metrics"):
        a, b = (_without_timings(r.get(key)) for r in (old, new))
        if a == b:
            matched.append(f"{key}: {len(a or {})} values equal")
        else:
            diffs = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted((a or {}).keys() | (b or {}).keys())
                     if (a or {}).get(k) != (b or {}).get(k)]
            differed.append(f"{key}: " + "; ".join(diffs[:4]))
    return Comparison(matched, differed)


def _comparable_settings(run: dict) -> dict:
    """Resolved settings less the ones that name places or pace the work (not what is computed), and less
    the cross-tokenizer loss of a run whose student has the cache's tokenizer (it computes nothing there)."""
    unused = RESUMABLE_SETTINGS if run.get("cross_tokenizer") else {*RESUMABLE_SETTINGS, "cross_tokenizer_loss"}
    return {k: v for k, v in (run.get("resolved_settings") or {}).items() if k not in unused}


def _without_timings(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: v for k, v in metrics.items() if k not in _TIMING_KEYS}


# ---------------------------------------------------------------- the environment
def environment_differences(recorded: Recorded, rerun: Recorded | None = None) -> list[str]:
    """``name: X recorded, Y now`` for every recorded package version, machine fact and image identity
    that differs from what the re-run recorded (from this process when there is no re-run: it failed)."""
    found = []
    if rerun is not None and rerun.packages is not None:
        now_packages, now = rerun.packages, rerun.record.get("software") or {}
    else:
        now_packages, now = parse_packages("\n".join(installed_packages())), software_versions()
    if recorded.packages is not None:
        for name in sorted(recorded.packages.keys() | now_packages.keys()):
            a, b = recorded.packages.get(name), now_packages.get(name)
            if a != b:
                found.append(f"{name}: {a or 'not installed'} recorded, {b or 'not installed'} now")
    software = recorded.record.get("software") or {}
    keys = _MACHINE_KEYS if recorded.packages is not None else tuple(k for k in software if k not in ("image",))
    for key in keys:
        if key in software and software.get(key) != now.get(key):
            found.append(f"{key}: {software.get(key)} recorded, {now.get(key)} now")
    old_image, new_image = software.get("image") or {}, now.get("image") or {}
    for key in sorted(old_image.keys() | new_image.keys()):
        if key != "info_sha256" and old_image.get(key) != new_image.get(key):
            found.append(f"image {key}: {old_image.get(key)} recorded, {new_image.get(key)} now")
    return found


def reproducibility_notes(recorded: Recorded) -> list[str]:
    """What the recorded run's circumstances let one expect, said before re-running it."""
    import torch

    notes = []
    if recorded.on_gpu:
        gpu_now = torch.cuda.is_available()
        notes.append(f"it was computed on {recorded.device}: GPU kernels are not bit-reproducible across GPU models, "
                     "drivers and CUDA library versions (and some reductions not even run to run), so expect close "
                     "rather than identical bytes" + ("" if gpu_now else "; this machine has no GPU, so the re-run "
                                                       "computes on the CPU and will differ"))
    software = recorded.record.get("software") or {}
    if software.get("torch") and software["torch"] != torch.__version__:
        notes.append(f"it was computed with torch {software['torch']}, this is torch {torch.__version__}: "
                     "other torch builds compute other bits")
    return notes

