"""Crash and resume of ``kdpipe cache-teacher``: SIGKILL at random moments, disk full, reruns.

Every test ends by comparing the resumed cache with an uninterrupted one, field by field and row by
row, and their manifests up to timestamps and checksum.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kdpipe import open_cache
from kdpipe.pipeline import fileio
from kdpipe.pipeline.cache.storage import zarr_shard
from kdpipe.stages.cli import main

KDPIPE = [sys.executable, "-c", "from kdpipe.stages.cli import main; main()"]
# 3 rows of seq-len 32 per shard: many small shards, so a kill lands mid-shard, mid-write or between.
SETTINGS = ["--top-k", "8", "--seq-len", "32", "--batch-size", "3", "--shard-size-mb", "0.0035",
            "--temperature", "1", "--temperature", "2"]
# Manifest entries allowed to differ: times, the checksum over them, and the software versions (the
# checkout's git commit moves when someone commits while this runs).
TIMESTAMPS = {"started_at", "finished_at", "checksum", "software", "command"}  # and the command line: its --out differs


def capture_args(teacher, data, out, *extra) -> list[str]:
    return ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *SETTINGS, *extra]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_same_cache(actual: Path, expected: Path) -> None:
    """Every field of every row equal (values and dtypes); manifests equal but for timestamps."""
    a, b = open_cache(actual), open_cache(expected)
    assert len(a) == len(b) > 0
    for i in range(len(b)):
        row_a, row_b = a.read_raw(i), b.read_raw(i)
        assert row_a.keys() == row_b.keys()
        for field, value in row_b.items():
            assert row_a[field].dtype == value.dtype, (i, field)
            np.testing.assert_array_equal(row_a[field], value, err_msg=f"row {i} field {field}")
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMESTAMPS}  # noqa: E731
    assert strip(a.manifest) == strip(b.manifest)
    assert not list(actual.rglob("*.tmp")), "stray temporary files left behind"


def shard_hashes(cache: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((cache / "manifest.json").read_text())["shards"]]


@pytest.fixture(scope="module")
def small_args(tiny_lm_dir, text_dir):
    return lambda out, *extra: capture_args(tiny_lm_dir, text_dir, out, "--limit-rows", "36", *extra)


@pytest.fixture(scope="module")
def reference(small_args, tmp_path_factory) -> Path:
    """An uninterrupted capture of 36 rows in 12 shards."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    result = run_cli(*small_args(out))
    assert result.exit_code == 0, result.output
    assert len(open_cache(out).shards) == 12
    return out


# ---------------------------------------------------------------------------- SIGKILL at random moments
def _progress_shards(out: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return len(json.loads((out / "_progress" / "r00000.json").read_text())["shards"])
    return 0


def _writing(out: Path) -> bool:
    """A shard or the progress record is being written (its temporary file exists)."""
    for folder in (out / "shards", out / "_progress"):
        with contextlib.suppress(FileNotFoundError):
            if any(name.endswith(".tmp") for name in os.listdir(folder)):
                return True
    return False


def _run_and_kill(args: list[str], log: Path, *, after_seconds: float = 0.0, after_shards: int | None = None,
                  jitter: float = 0.0, at_next_write: bool = False) -> bool:
    """Start the capture and SIGKILL it: ``after_seconds`` after its start, or (``after_shards``) once
    its progress bar is up and that many shards are recorded, plus ``jitter`` seconds, then
    (``at_next_write``) inside the next file write. True when it was killed, False when it finished."""
    out = Path(args[args.index("--out") + 1])
    with open(log, "w") as err:
        proc = subprocess.Popen(KDPIPE + args, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 90
        while after_shards is not None and proc.poll() is None and (
            "cache-teacher:" not in log.read_text() or _progress_shards(out) < after_shards  # bar, then shards
        ):
            assert time.monotonic() < deadline, "capture made no progress"
            time.sleep(0.005)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=after_seconds + jitter)
        while at_next_write and proc.poll() is None and not _writing(out):
            time.sleep(0.0005)
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()[-2000:]
            return False
        children = _children(proc.pid)  # tokenizer workers, multiprocessing's resource tracker
        KILLED_CHILDREN.append(len(children))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_gone(children)
        return True
    finally:
        if proc.poll() is None:
            proc.kill()


KILLED_CHILDREN: list[int] = []  # child processes found at each kill


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for task in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
    return []


def _assert_gone(pids: list[int], timeout: float = 15.0) -> None:
    """A killed capture leaves no process behind: its workers notice and exit."""
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and "Z" not in _state(p)]
    assert not alive, f"processes left running after the capture was killed: {alive}"


def _state(pid: int) -> str:
    with contextlib.suppress(OSError):
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    return "Z"


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tiny_lm_dir, text_dir, tmp_path):
    args = capture_args(tiny_lm_dir, text_dir, tmp_path / "killed", "--limit-rows", "180")
    ref = run_cli(*capture_args(tiny_lm_dir, text_dir, tmp_path / "ref", "--limit-rows", "180"))
    assert ref.exit_code == 0, ref.output
    total, out = len(open_cache(tmp_path / "ref").shards), tmp_path / "killed"  # 60 shards
    rng = random.Random(20240607)
    # Kill points: one during start-up (imports, planning), then one at a random shard count in each
    # quarter of the capture, a random fraction of a shard later; the third kills inside a file write
    # (a shard's or the progress record's *.tmp exists).
    killed = [_run_and_kill(args, tmp_path / "log", after_seconds=rng.uniform(0.3, 2.0))]
    states = [_progress_shards(out)]
    targets = [rng.randint(max(2, q * total // 4), (q + 1) * total // 4 - 3) for q in range(4)]
    for n, target in enumerate(targets):
        killed.append(_run_and_kill(args, tmp_path / "log", after_shards=target, jitter=rng.uniform(0, 0.1),
                                    at_next_write=n == 2))
        states.append(_progress_shards(out))
    print("kills killed/recorded shards:", list(zip(killed, states)))
    assert all(killed) and states == sorted(states) and states[-1] < total, list(zip(killed, states))
    assert not (out / "manifest.json").exists()
    done = subprocess.run(KDPIPE + args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr
    assert_same_cache(out, tmp_path / "ref")


# ---------------------------------------------------------------------------- states a kill can leave
def test_restart_removes_stray_tmp_and_redoes_unrecorded_damaged_and_missing_shards(
    reference, small_args, tmp_path
):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()  # killed before the manifest was written
    record_path = out / "_progress" / "r00000.json"
    record = json.loads(record_path.read_text())
    record["complete"] = False
    names = sorted(record["shards"])
    del record["shards"][names[2]]  # renamed, but killed before it was recorded
    record_path.write_text(json.dumps(record))
    damaged = out / names[3]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / names[4]).unlink()
    stray = [out / (names[5] + ".4242.tmp"), out / "_progress" / "r00000.json.4242.tmp",
             out / "manifest.json.4242.tmp"]
    for path in stray:
        path.write_bytes(b"half a file")
    result = run_cli(*small_args(out))
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "redoing 2 damaged or missing" in result.output
    assert "removed 3 stray temporary files" in result.output
    assert_same_cache(out, reference)


def test_same_settings_give_identical_shard_bytes(reference, small_args, tmp_path):
    result = run_cli(*small_args(tmp_path / "again"))
    assert result.exit_code == 0, result.output
    assert shard_hashes(tmp_path / "again") == shard_hashes(reference)


def test_rerun_of_finished_capture_is_a_no_op(reference, small_args, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    result = run_cli(*small_args(out))
    assert result.exit_code == 0, result.output
    assert "already holds this finished capture; nothing to do" in result.output
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "interrupted"])
def test_other_settings_are_refused_naming_the_setting_or_replaced_with_overwrite(
    reference, small_args, tmp_path, finished
):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    if not finished:
        (out / "manifest.json").unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = run_cli(*small_args(out, "--top-k", "4"))
    assert changed.exit_code == 2
    assert "capture.top_k (was 8, now 4)" in changed.output and "--overwrite" in changed.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    replaced = run_cli(*small_args(out, "--top-k", "4", "--overwrite"))
    assert replaced.exit_code == 0, replaced.output
    cache = open_cache(out, verify_hashes=True)
    assert cache.manifest["capture"]["top_k"] == 4 and cache.read_raw(0)["topk_ids"].shape == (32, 4)
    assert run_cli("verify", out).exit_code == 0


# ---------------------------------------------------------------------------- disk full, unwritable --out
def _failing_atomic_path(fail_on, error: int, calls: list):
    """``atomic_path`` that writes the temporary file, then fails like a full disk on call ``fail_on``."""
    real = fileio.atomic_path

    @contextlib.contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            yield tmp
            calls.append(Path(path).name)
            if fail_on(Path(path), len(calls)):
                raise OSError(error, os.strerror(error))

    return atomic_path


def _assert_intact_and_resumable(out: Path, reference: Path, small_args) -> None:
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))
    record = json.loads((out / "_progress" / "r00000.json").read_text())
    assert record["shards"], "the shards finished before the failure are recorded"
    for entry in record["shards"].values():  # nothing already written is damaged
        assert fileio.sha256_file(out / entry["name"]) == entry["sha256"]
    resumed = run_cli(*small_args(out))
    assert resumed.exit_code == 0, resumed.output
    assert_same_cache(out, reference)


def test_disk_full_while_writing_a_shard_stops_cleanly_and_resumes(reference, small_args, tmp_path, monkeypatch):
    calls: list = []
    fail = _failing_atomic_path(lambda path, n: n == 5, errno.ENOSPC, calls)
    monkeypatch.setattr(zarr_shard, "atomic_path", fail)
    out = tmp_path / "cache"
    result = run_cli(*small_args(out))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        f"error: cannot write shard shards/b0000000-p004.zarr.zip to --out {out}: [Errno 28] "
        "No space left on device; free space and re-run the same command to resume"
    ) in result.output
    monkeypatch.undo()
    _assert_intact_and_resumable(out, reference, small_args)


def test_disk_full_while_recording_progress_stops_cleanly_and_resumes(reference, small_args, tmp_path, monkeypatch):
    calls: list = []
    fail = _failing_atomic_path(lambda path, n: path.name == "r00000.json" and n > 6, errno.ENOSPC, calls)
    monkeypatch.setattr(fileio, "atomic_path", fail)
    out = tmp_path / "cache"
    result = run_cli(*small_args(out))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: cannot write progress record _progress/r00000.json to --out {out}: [Errno 28]" in result.output
    monkeypatch.undo()
    _assert_intact_and_resumable(out, reference, small_args)


def test_read_only_out_is_one_clear_error(small_args, tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "cache"
    result = run_cli(*small_args(out))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"error: cannot write the cache folder to --out {out}: [Errno 30] Read-only file system; "
            "make it writable (or choose another --out) and re-run the same command to resume") in result.output


def test_out_that_is_a_file_is_refused(small_args, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    result = run_cli(*small_args(out))
    assert result.exit_code == 2 and f"error: --out {out} is a file" in result.output
    assert out.read_text() == "keep me"


@pytest.mark.slow
def test_sigkill_mid_stream_with_tokenizer_workers_then_resume_equals_uninterrupted(tiny_lm_dir, text_dir, tmp_path):
    """Blocks of ~2,000 characters tokenised by 2 worker processes ahead of the teacher: kills land
    while workers hold blocks in flight; the resumed cache equals one made without workers."""
    text = "".join(p.read_text() for p in sorted(text_dir.glob("*.txt")))
    data = tmp_path / "docs.jsonl"  # 40 documents of 750 characters
    data.write_text("".join(json.dumps({"text": text[i : i + 750]}) + "\n" for i in range(0, 30_000, 750)))
    stream = ["--block-mb", "0.002", "--shard-size-mb", "0.02"]
    ref = run_cli(*capture_args(tiny_lm_dir, data, tmp_path / "ref", *stream, "--num-workers", "0"))
    assert ref.exit_code == 0, ref.output
    reference = open_cache(tmp_path / "ref")
    blocks = {s["block"] for s in reference.shards}
    assert len(blocks) >= 10 and len(reference.shards) > len(blocks), "several blocks of several shards"
    args = capture_args(tiny_lm_dir, data, tmp_path / "killed", *stream, "--num-workers", "2")
    out, total, rng = tmp_path / "killed", len(reference.shards), random.Random(8)
    states = []
    for target in sorted(rng.sample(range(2, total - 2), 2)):
        assert _run_and_kill(args, tmp_path / "log", after_shards=target, jitter=rng.uniform(0, 0.05))
        states.append(_progress_shards(out))
    assert min(KILLED_CHILDREN[-2:]) >= 2, "two tokenizer workers were running at each kill, and exited after it"
    assert states == sorted(states) and states[-1] < total, states
    done = subprocess.run(KDPIPE + args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr
    assert_same_cache(out, tmp_path / "ref")


def test_bad_record_found_while_streaming_then_fixed_data_reruns_the_same_command(tiny_lm_dir, tmp_path):
    """A bad record deep in the data stops the capture; once fixed, the same command runs (nothing had
    been finished, so nothing is lost by starting over)."""
    data, out = tmp_path / "docs.jsonl", tmp_path / "cache"
    good = json.dumps({"text": "To be, or not to be, that is the question."}) + "\n"
    data.write_text(good * 3 + "{not json\n")
    result = run_cli(*capture_args(tiny_lm_dir, data, out))
    assert result.exit_code == 2 and f"error: {data}:4 is not valid JSON" in result.output
    assert not (out / "manifest.json").exists()
    data.write_text(good * 4)
    result = run_cli(*capture_args(tiny_lm_dir, data, out))
    assert result.exit_code == 0, result.output
    assert open_cache(out).manifest["data"]["files"] == [{"path": "docs.jsonl", "bytes": len(good) * 4}]
