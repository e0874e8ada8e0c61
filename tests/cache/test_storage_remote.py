"""Caches on an object store, end to end through the CLI, against a real S3 API on localhost
(moto's server, ``tests/s3_server.py``; credentials are dummies, ``AWS_ENDPOINT_URL`` points at it):
capture to s3://, kill and resume, a finished capture rerun, verify and inspect, train-student and
evaluate streaming from s3://, a damaged object, and storage errors that are one line and fast."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from s3_server import client

from kdpipe import open_cache
from kdpipe.pipeline.cache.reader import TeacherCache
from kdpipe.pipeline.train.dataset import CacheDataset
from kdpipe.pipeline.errors import IntegrityError
from kdpipe.stages.cli import main

KDPIPE = [sys.executable, "-c", "from kdpipe.stages.cli import main; main()"]
BUCKET = "kdpipe-test"
# 3 rows of seq-len 32 per shard: many small shards.
SETTINGS = ["--top-k", "8", "--seq-len", "32", "--batch-size", "3", "--shard-size-mb", "0.0035",
            "--temperature", "1", "--temperature", "2"]
TIMESTAMPS = {"started_at", "finished_at", "checksum", "software", "command"}  # and the command line: its --out differs
STUDENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
SECRET = "testing-secret-not-real"  # the dummy secret key: must never be written or shown


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def keys(prefix: str) -> dict[str, int]:
    """Object key (relative to ``prefix``) -> size."""
    pages = client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:]: o["Size"] for page in pages for o in page.get("Contents", [])}


def get(prefix: str, key: str) -> bytes:
    return client().get_object(Bucket=BUCKET, Key=f"{prefix}/{key}")["Body"].read()


def prefix_of(url: str) -> str:
    return url.removeprefix(f"s3://{BUCKET}/")


def copy_prefix(url: str, new: str) -> str:
    for key in keys(prefix_of(url)):
        client().copy_object(Bucket=BUCKET, Key=f"{new}/{key}", CopySource={"Bucket": BUCKET, "Key": f"{prefix_of(url)}/{key}"})
    return f"s3://{BUCKET}/{new}"


def assert_same_cache(actual: str | Path, expected: Path) -> None:
    """Every field of every row equal; manifests equal but for timestamps."""
    a, b = open_cache(actual), open_cache(expected)
    assert len(a) == len(b) > 0
    a.schedule(list(range(len(a.shards))))
    for i in range(len(b)):
        row_a, row_b = a.read_raw(i), b.read_raw(i)
        for field, value in row_b.items():
            assert row_a[field].dtype == value.dtype, (i, field)
            np.testing.assert_array_equal(row_a[field], value, err_msg=f"row {i} field {field}")
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMESTAMPS}  # noqa: E731
    assert strip(a.manifest) == strip(b.manifest)
    a.close()


@pytest.fixture(scope="module")
def capture_args(tiny_lm_dir, text_dir):
    return lambda out, *extra: ["cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", out,
                                *SETTINGS, "--limit-rows", "48", *extra]


@pytest.fixture(scope="module")
def local_cache(capture_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote") / "local"
    result = run_cli(*capture_args(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def remote_cache(s3_server, capture_args) -> str:
    """The same capture, written to s3://."""
    url = f"s3://{BUCKET}/module-remote/cache"
    result = run_cli(*capture_args(url))
    assert result.exit_code == 0, result.output
    assert f"wrote {url}: 48 rows" in result.output
    return url


# ---------------------------------------------------------------------------- capture
def test_capture_to_s3_equals_the_local_capture(remote_cache, local_cache):
    assert_same_cache(remote_cache, local_cache)
    stored = keys(prefix_of(remote_cache))
    # the local capture's rank lock (_progress/r00000.lock) has no remote twin: a store has no lock a killed owner releases
    local = {p.relative_to(local_cache).as_posix() for p in local_cache.rglob("*") if p.is_file() and p.suffix != ".lock"}
    assert set(stored) == local
    record = json.loads(get(prefix_of(remote_cache), "_progress/r00000.json"))
    assert all(e["etag"] for e in record["shards"].values())  # resume bookkeeping
    assert "etag" not in json.dumps(json.loads(get(prefix_of(remote_cache), "manifest.json")))


def test_rerun_of_a_finished_s3_capture_is_a_no_op(s3_server, remote_cache, capture_args):
    writes = s3_server.count("PUT") + s3_server.count("POST") + s3_server.count("DELETE")
    result = run_cli(*capture_args(remote_cache))
    assert result.exit_code == 0, result.output
    assert f"{remote_cache} already holds this finished capture; nothing to do" in result.output
    assert s3_server.count("PUT") + s3_server.count("POST") + s3_server.count("DELETE") == writes


@pytest.mark.slow
def test_foreign_prefix_refused_other_settings_refused_then_overwritten(s3_url, remote_cache, capture_args, local_cache):
    client().put_object(Bucket=BUCKET, Key=f"{prefix_of(s3_url)}/notes.txt", Body=b"keep me")
    result = run_cli(*capture_args(s3_url))
    assert result.exit_code == 2 and f"--out {s3_url} exists and is not a kdpipe cache" in result.output
    url = copy_prefix(remote_cache, prefix_of(s3_url) + "/cache")
    changed = run_cli(*capture_args(url, "--top-k", "4"))
    assert changed.exit_code == 2 and "capture.top_k (was 8, now 4)" in changed.output
    replaced = run_cli(*capture_args(url, "--top-k", "4", "--overwrite"))
    assert replaced.exit_code == 0, replaced.output
    assert open_cache(url).manifest["capture"]["top_k"] == 4
    assert get(prefix_of(s3_url), "notes.txt") == b"keep me"


def _recorded_shards(url: str) -> int:
    with contextlib.suppress(Exception):
        return len(json.loads(get(prefix_of(url), "_progress/r00000.json"))["shards"])
    return 0


@pytest.mark.slow
def test_sigkill_of_a_capture_to_s3_then_resume_equals_uninterrupted(s3_url, capture_args, local_cache, tmp_path):
    url = f"{s3_url}/cache"
    args = [str(a) for a in capture_args(url)]
    recorded = []
    for target in (5,):  # kill once 5 shards (of 16) are recorded, a moment later
        with open(tmp_path / "log", "w") as log:
            proc = subprocess.Popen(KDPIPE + args, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 90
            while proc.poll() is None and _recorded_shards(url) < target:
                assert time.monotonic() < deadline, "capture made no progress"
                time.sleep(0.05)
            time.sleep(0.1)
            assert proc.poll() is None, "the capture finished before it could be killed"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        recorded.append(_recorded_shards(url))
        assert "manifest.json" not in keys(prefix_of(url))
    assert 0 < recorded[-1] < 16, recorded
    done = subprocess.run(KDPIPE + args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr
    assert_same_cache(url, local_cache)
    assert SECRET not in done.stderr + done.stdout


# ---------------------------------------------------------------------------- verify, inspect
@pytest.mark.slow
def test_reproduce_an_s3_cache_into_s3(remote_cache):
    """``kdpipe reproduce`` re-runs the recorded capture into s3://.../cache-reproduced (its process
    reads the endpoint and credentials from the environment) and finds every shard identical."""
    result = run_cli("reproduce", remote_cache)
    assert result.exit_code == 0, result.output
    shards = json.loads(get(prefix_of(remote_cache), "manifest.json"))["shards"]
    assert result.output.count("same     shard") == len(shards) and "identical: " in result.output
    again = json.loads(get(prefix_of(remote_cache) + "-reproduced", "manifest.json"))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in shards]


def test_verify_and_inspect_read_from_s3(remote_cache):
    ok = run_cli("verify", remote_cache)
    assert ok.exit_code == 0 and f"OK {remote_cache}: every shard matches" in ok.output
    summary = json.loads(run_cli("inspect", remote_cache, "--json").stdout)
    assert summary["path"] == remote_cache and summary["rows"] == 48 and summary["shards"] == 16


def test_a_flipped_byte_in_an_object_is_caught_before_its_rows_are_used(s3_url, remote_cache, student_config, tmp_path):
    url = copy_prefix(remote_cache, prefix_of(s3_url) + "/cache")
    manifest = open_cache(url).manifest
    victim = manifest["shards"][5]
    data = bytearray(get(prefix_of(url), victim["name"]))
    data[len(data) // 2] ^= 0x01
    client().put_object(Bucket=BUCKET, Key=f"{prefix_of(url)}/{victim['name']}", Body=bytes(data))

    verify = run_cli("verify", url)
    assert verify.exit_code == 1
    assert f"FAIL shard {victim['name']}: Checksum failure: sha256 differs from the manifest" in verify.output
    assert verify.output.count("FAIL") == 1

    cache = open_cache(url)
    row = sum(s["rows"] for s in manifest["shards"][:5])
    with pytest.raises(IntegrityError, match=rf"Checksum failure: shard {victim['name']} of {url} .*rows were not used"):
        cache.read_raw(row)
    assert not [p for p in cache.local_copies.folder.iterdir() if not p.name.endswith(".lock")]  # nothing kept

    train = run_cli("train-student", "--cache", url, "--student", student_config, "--out", tmp_path / "run",
                    "--epochs", "1", "--batch-size", "4", "--eval-every", "0", "--checkpoint-every", "0")
    assert train.exit_code == 2
    errors = [line for line in train.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Checksum failure" in errors[0] and "Traceback" not in train.output


# ---------------------------------------------------------------------------- training and evaluation
@pytest.fixture()
def student_config(tmp_path):
    path = tmp_path / "student.json"
    path.write_text(json.dumps(STUDENT))
    return path


def _train(cache, student, out, *extra):
    result = run_cli("train-student", "--cache", cache, "--student", student, "--out", out, "--epochs", "2",
                     "--batch-size", "4", "--lr", "3e-3", "--seed", "1", "--eval-every", "6", "--eval-fraction", "0.1",
                     "--checkpoint-every", "0", *extra)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_train_student_and_evaluate_stream_from_s3(s3_server, remote_cache, local_cache, student_config, tmp_path):
    shards = f"{prefix_of(remote_cache)}/shards/"
    shard_gets = s3_server.count("GET", shards)
    _train(remote_cache, student_config, tmp_path / "remote", "--local-cache", tmp_path / "shards",
           "--local-cache-gb", "1", "--read-ahead", "2", "--storage-options", json.dumps({"secret": SECRET, "key": "testing"}))
    assert s3_server.count("GET", shards) - shard_gets == 16  # two epochs and evaluations: each shard once
    _train(local_cache, student_config, tmp_path / "local")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "remote" / "model" / "model.safetensors")
    b = load_file(tmp_path / "local" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same rows, in the same order

    run = json.loads((tmp_path / "remote" / "run.json").read_text())
    assert run["cache_path"] == remote_cache and "storage_options" not in run["resolved_settings"]
    written = "".join(p.read_text(errors="ignore") for p in (tmp_path / "remote").rglob("*.json*"))
    assert SECRET not in written

    remote_eval = run_cli("evaluate", "--model", tmp_path / "remote", "--cache", remote_cache, "--json")
    local_eval = run_cli("evaluate", "--model", tmp_path / "remote", "--cache", local_cache, "--json")
    assert remote_eval.exit_code == 0, remote_eval.output
    strip = lambda r: {k: v for k, v in json.loads(r.stdout).items() if not k.endswith("_per_s")}  # noqa: E731
    assert strip(remote_eval) == strip(local_eval)


def test_local_cache_folder_keeps_shards_between_epochs_within_its_limit(remote_cache, tmp_path):
    def epochs(cache, n=2):
        dataset = CacheDataset(cache, batch_size=4, seed=0)
        for epoch in range(n):
            dataset.set_epoch(epoch)
            assert sum(len(batch["mask"]) for batch in dataset) == 48
        return cache.local_copies

    unlimited = epochs(TeacherCache(remote_cache, local_cache=tmp_path / "big"))
    assert unlimited.downloads == 16 and unlimited.size_bytes() == open_cache(remote_cache).manifest["totals"]["bytes"]
    limit = 3 * max(s["bytes"] for s in open_cache(remote_cache).shards)
    small = epochs(TeacherCache(remote_cache, local_cache=tmp_path / "small", local_cache_gb=limit / 1e9, read_ahead=1))
    assert small.downloads == 32 and small.size_bytes() <= limit  # the second epoch downloads again
    again = epochs(TeacherCache(remote_cache, local_cache=tmp_path / "big"), n=1)
    assert again.downloads == 0 and again.hits == 16  # another process, the same folder


def test_dataloader_workers_share_the_downloads(s3_server, remote_cache, tmp_path):
    from torch.utils.data import DataLoader

    def epoch(cache):
        dataset = CacheDataset(cache, batch_size=4, seed=0)
        assert sum(len(batch["mask"]) for batch in DataLoader(dataset, batch_size=None, num_workers=2)) == 48
        cache.close()
        return cache

    shards = f"{prefix_of(remote_cache)}/shards/"
    gets = s3_server.count("GET", shards)
    epoch(TeacherCache(remote_cache, read_ahead=2, local_cache=tmp_path / "shared"))
    assert s3_server.count("GET", shards) - gets == 16  # each shard once for both workers
    private = epoch(TeacherCache(remote_cache, read_ahead=2))
    folder = private.local_copies.folder
    assert not [p for p in folder.iterdir() if not p.name.endswith(".lock")]  # nothing kept once read
    del private
    assert not folder.exists()  # the private folder goes with its cache


# ---------------------------------------------------------------------------- one-line errors, fast
def _one_line_error(*args, contains: str, within_s: float = 8.0):
    started = time.monotonic()
    result = run_cli(*args)
    elapsed = time.monotonic() - started
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert contains in errors[0], errors[0]
    assert elapsed < within_s, f"{args[0]} took {elapsed:.1f} s"
    assert SECRET not in result.output
    return errors[0]


def test_bad_credentials_missing_bucket_and_unreachable_endpoint(s3_server, remote_cache, capture_args, student_config,
                                                                 tiny_lm_dir, tmp_path):
    missing = "s3://no-such-bucket-kdpipe/cache"
    _one_line_error("verify", missing, contains="bucket 'no-such-bucket-kdpipe' does not exist")
    _one_line_error(*capture_args(missing), contains="bucket 'no-such-bucket-kdpipe' does not exist", within_s=20)
    _one_line_error("train-student", "--cache", missing, "--student", student_config, "--out", tmp_path / "r",
                    "--steps", "1", contains="bucket 'no-such-bucket-kdpipe' does not exist")
    unreachable = json.dumps({"endpoint_url": "http://127.0.0.1:9"})
    _one_line_error("inspect", remote_cache, "--storage-options", unreachable, contains="cannot reach the object store at http://127.0.0.1:9")
    _one_line_error("evaluate", "--model", tiny_lm_dir, "--cache", remote_cache, "--storage-options", unreachable,
                    contains="cannot reach the object store")
    _one_line_error("verify", remote_cache, "--storage-options", '{"secret": "' + SECRET + '",', contains="--storage-options is not valid JSON")
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():  # the server checks keys now: the dummy ones are unknown to it
        line = _one_line_error("verify", remote_cache, contains="was denied")
        assert "check the credentials" in line


@pytest.mark.slow
def test_storage_errors_in_a_real_process(s3_server):
    started = time.monotonic()
    done = subprocess.run(KDPIPE + ["verify", "s3://no-such-bucket-kdpipe/cache"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: bucket 'no-such-bucket-kdpipe' does not exist")
    assert len(done.stderr.strip().splitlines()) == 1 and time.monotonic() - started < 30
