"""What a resumed ``kdpipe cache-teacher`` checks before continuing: the data its finished shards were
made from, the progress record's entries against the shard files, and that no other process is
writing the same ``--out`` (issue 27 items 2, 3 and 7)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_resume_capture import KDPIPE, _progress_shards, _run_and_kill, assert_same_cache, capture_args, run_cli

from kdpipe.pipeline.capture.data_read import DataRead
from kdpipe.pipeline.data import resolve_source

STREAM = ["--block-mb", "0.002", "--shard-size-mb", "0.02", "--num-workers", "0"]  # ~20 blocks of ~2 shards


def snapshot(out: Path) -> dict:
    """Every file's bytes, but the lock file's (it holds the pid of the last process that took it)."""
    return {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def write_docs(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture()
def docs(text_dir, tmp_path) -> tuple[Path, list[str]]:
    """40 JSON Lines documents of 750 characters (blocks of ~2,000 characters: ~3 documents each)."""
    text = "".join(p.read_text() for p in sorted(text_dir.glob("*.txt")))
    texts = [text[i : i + 750] for i in range(0, 30_000, 750)]
    write_docs(tmp_path / "docs.jsonl", texts)
    return tmp_path / "docs.jsonl", texts


def same_size_edit(text: str) -> str:
    """Another text of the same UTF-8 size (its first ASCII letter changed)."""
    i = next(i for i, c in enumerate(text) if c.isascii() and c.isalpha())
    return text[:i] + ("x" if text[i] != "x" else "y") + text[i + 1 :]


@pytest.mark.slow  # a killed capture, its resume and a fresh capture: ~27 s on 2 cores
def test_data_edited_in_place_after_a_kill_is_refused_naming_the_file_unless_not_yet_captured(
    tiny_lm_dir, docs, tmp_path
):
    data, texts = docs
    args = capture_args(tiny_lm_dir, data, tmp_path / "cache", *STREAM)
    assert _run_and_kill(args, tmp_path / "log", after_shards=8)  # a real SIGKILL, 8+ shards recorded
    done = _progress_shards(tmp_path / "cache")
    assert 8 <= done < 30, done
    shutil.copytree(tmp_path / "cache", tmp_path / "cache2")
    original = data.read_bytes()

    # 1. A document the finished shards were made from, edited in place: same size, other content.
    write_docs(data, [same_size_edit(texts[0]), *texts[1:]])
    assert data.stat().st_size == len(original)
    before = snapshot(tmp_path / "cache")
    refused = run_cli(*args)
    assert refused.exit_code == 2
    assert refused.output == (
        f"error: data file docs.jsonl changed since shards in {tmp_path / 'cache'} were made from it (the sha256 "
        f"of its first {_covered_bytes(tmp_path / 'cache')} bytes differs, the size does not); restore it, or "
        "pass --overwrite to capture the data as it is now (or use a new --out)\n")
    assert snapshot(tmp_path / "cache") == before  # nothing written, nothing removed
    replaced = run_cli(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert run_cli("verify", tmp_path / "cache").exit_code == 0

    # 2. The last document, which no finished shard was made from: the resume goes on, and its cache
    # equals an uninterrupted capture of the edited data.
    write_docs(data, [*texts[:-1], same_size_edit(texts[-1])])
    args2 = capture_args(tiny_lm_dir, data, tmp_path / "cache2", *STREAM)
    resumed = run_cli(*args2)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {tmp_path / 'cache2'}: " in resumed.output
    fresh = run_cli(*capture_args(tiny_lm_dir, data, tmp_path / "fresh", *STREAM))
    assert fresh.exit_code == 0, fresh.output
    assert_same_cache(tmp_path / "cache2", tmp_path / "fresh")


def _covered_bytes(out: Path) -> int:
    record = json.loads((out / "_progress" / "r00000.json").read_text())
    return record["data_read"]["files"]["docs.jsonl"]["bytes"]


def test_data_read_covers_what_each_file_kind_allows(tmp_path):
    """JSON Lines: the bytes read; .txt: the whole file the position is in; arrays: every file."""
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n' * 10)  # 160 bytes
    (tmp_path / "b.txt").write_text("two " * 10)
    (tmp_path / "c.jsonl").write_text('{"text": "three"}\n' * 10)
    read = DataRead(resolve_source(str(tmp_path)))
    read.advance(48)
    assert {name: v["bytes"] for name, v in read.record()["files"].items()} == {"a.jsonl": 48}
    read.advance(160)  # the end of a.jsonl: b.txt, one document read whole, starts there
    assert {name: v["bytes"] for name, v in read.record()["files"].items()} == {"a.jsonl": 160, "b.txt": 40}
    read.advance(210)
    assert {name: v["bytes"] for name, v in read.record()["files"].items()} == {"a.jsonl": 160, "b.txt": 40, "c.jsonl": 10}
    assert read.record()["files"]["c.jsonl"]["sha256"] == hashlib.sha256(b'{"text": "three"}\n'[:10]).hexdigest()


# ---------------------------------------------------------------------------- an edited progress record
@pytest.fixture(scope="module")
def reference(tiny_lm_dir, text_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "cache"
    result = run_cli(*capture_args(tiny_lm_dir, text_dir, out, "--limit-rows", "36"))
    assert result.exit_code == 0, result.output
    return out


def _interrupted_copy(reference: Path, out: Path) -> tuple[Path, dict]:
    """``reference`` as a capture killed just before its manifest was written."""
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()
    path = out / "_progress" / "r00000.json"
    record = json.loads(path.read_text())
    record["complete"] = False
    return path, record


def test_edited_progress_record_entries_are_redone_and_the_cache_verifies(reference, tiny_lm_dir, text_dir, tmp_path):
    out = tmp_path / "cache"
    path, record = _interrupted_copy(reference, out)
    names = sorted(record["shards"])
    record["shards"][names[1]]["rows"] -= 1  # 3 -> 2: the file still has its sha256 and 3 rows
    record["shards"][names[4]]["sha256"] = "0" * 64
    record["shards"][names[6]]["tokens"] = "many"  # not a number: redone, not a traceback
    record["blocks"]["0"]["parts"] -= 1  # the block would be skipped with a shard missing
    path.write_text(json.dumps(record))
    result = run_cli(*capture_args(tiny_lm_dir, text_dir, out, "--limit-rows", "36"))
    assert result.exit_code == 0, result.output
    assert "redoing 3 damaged or missing" in result.output
    verified = run_cli("verify", out)
    assert verified.exit_code == 0, verified.output
    assert_same_cache(out, reference)


def test_a_record_naming_shards_of_another_block_is_not_trusted(reference, tiny_lm_dir, text_dir, tmp_path):
    out = tmp_path / "cache"
    path, record = _interrupted_copy(reference, out)
    names = sorted(record["shards"])
    record["shards"][names[2]]["part"] = 7  # no longer the part its name says
    path.write_text(json.dumps(record))
    result = run_cli(*capture_args(tiny_lm_dir, text_dir, out, "--limit-rows", "36"))
    assert result.exit_code == 0 and "redoing 1 damaged or missing" in result.output, result.output
    assert run_cli("verify", out).exit_code == 0
    assert_same_cache(out, reference)


# ---------------------------------------------------------------------------- two writers, one --out
def test_a_second_capture_into_an_out_held_by_a_live_process_is_refused_and_a_killed_holder_leaves_no_lock(
    tiny_lm_dir, docs, tmp_path
):
    data, _ = docs
    out = tmp_path / "cache"
    args = capture_args(tiny_lm_dir, data, out, *STREAM)
    with open(tmp_path / "log", "w") as err:
        holder = subprocess.Popen(KDPIPE + args, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 90
        while _progress_shards(out) < 2:
            assert holder.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-2000:]
            time.sleep(0.01)
        holder.send_signal(signal.SIGSTOP)  # alive, holding --out, and not moving while we look
        before = snapshot(out)
        for extra in ([], ["--overwrite"]):
            second = run_cli(*args, *extra)
            assert second.exit_code == 2
            assert second.output == (
                f"error: another process (pid {holder.pid}) is writing to --out {out} (it holds _progress/r00000.lock); "
                "wait for it to finish or stop it, or choose another --out\n")
            assert snapshot(out) == before  # its temporary files and records untouched
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (out / "_progress" / "r00000.lock").exists()  # the file stays; its lock died with its owner
    resumed = run_cli(*args)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output
    verified = run_cli("verify", out)
    assert verified.exit_code == 0, verified.output


def test_the_ranks_of_one_capture_each_take_their_own_lock(tmp_path):
    from kdpipe.pipeline.capture.lock import out_lock

    with out_lock(tmp_path, rank=0), out_lock(tmp_path, rank=1), out_lock(tmp_path, rank=0):  # reentrant
        other = subprocess.run(
            [*KDPIPE[:2], "from kdpipe.pipeline.capture.lock import out_lock\n"
             f"with out_lock({str(tmp_path)!r}, rank=1): pass"], capture_output=True, text=True)
        assert other.returncode == 1 and f"another process (pid {os.getpid()}) is writing to --out" in other.stderr
    with out_lock(tmp_path, rank=1):  # released
        pass


@pytest.mark.parametrize("size", ["0", "-1", "nan"])
def test_shard_size_mb_must_be_positive(tiny_lm_dir, text_dir, tmp_path, size):
    out = tmp_path / "cache"
    result = run_cli(*capture_args(tiny_lm_dir, text_dir, out, "--shard-size-mb", size))
    assert result.exit_code == 2
    assert result.output == (f"error: --shard-size-mb {float(size):g} must be a positive size in MiB (the default "
                             "is 256; e.g. 0.5 for small shards)\n")
    assert not out.exists()
