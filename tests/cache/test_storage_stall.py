"""An object store that stops answering mid-capture (issue 27.6): moto's S3 server in a process of its
own (``tests/s3_server.py``) is paused with SIGSTOP while ``kdpipe cache-teacher`` writes to it. The
capture reports each stalled attempt on stderr within the reply timeout, makes the bounded number of
attempts, then ends with one ``error:`` line; resumed, it finishes the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_server import client, s3_environment

from kdpipe.pipeline.cache.storage.location import CacheLocation
from kdpipe.pipeline.cache.storage.object_store import ATTEMPTS, READ_TIMEOUT_S, retry_policy
from kdpipe.pipeline.errors import ConfigError

KDPIPE = [sys.executable, "-c", "from kdpipe.stages.cli import main; main()"]
BUCKET = "kdpipe-stall"
SERVER = Path(__file__).resolve().parents[1] / "s3_server.py"
READ_TIMEOUT = 2
STALL_OPTIONS = json.dumps({"config_kwargs": {"read_timeout": READ_TIMEOUT, "retries": {"max_attempts": 2}}})


@pytest.fixture()
def paused_server():
    """``(endpoint, pid)`` of an S3 server process, 30 ms per request (SIGCONT'd and killed at the end)."""
    server = subprocess.Popen([sys.executable, str(SERVER), BUCKET, "0.03"], stdout=subprocess.PIPE, text=True,
                              cwd=SERVER.parent)
    try:
        endpoint = server.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:"), endpoint
        with s3_environment(endpoint):
            yield endpoint, server.pid
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait()


def _recorded_shards(prefix: str) -> int:
    try:
        body = client().get_object(Bucket=BUCKET, Key=f"{prefix}/_progress/r00000.json")["Body"].read()
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    return len(json.loads(body)["shards"])


@pytest.mark.slow
def test_a_capture_to_a_paused_store_reports_the_stall_then_fails_in_one_line(paused_server, tiny_lm_dir, text_dir):
    endpoint, server_pid = paused_server
    url = f"s3://{BUCKET}/cache"
    args = ["cache-teacher", "--teacher", str(tiny_lm_dir), "--data", str(text_dir), "--out", url, "--top-k", "4",
            "--seq-len", "32", "--batch-size", "3", "--shard-size-mb", "0.0035", "--num-workers", "0", "--limit-rows", "60",
            "--storage-options", STALL_OPTIONS]
    capture = subprocess.Popen(KDPIPE + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while capture.poll() is None and _recorded_shards("cache") < 3:
            assert time.monotonic() < deadline, "the capture wrote no shard"
            time.sleep(0.05)
        assert capture.poll() is None, "the capture finished before the store was paused"
        os.kill(server_pid, signal.SIGSTOP)
        paused_at = time.monotonic()
        lines, error_after = [], None
        for line in capture.stderr:  # the child's stderr is line-buffered
            lines.append(line.rstrip("\n"))
            if line.startswith("error:"):
                error_after = time.monotonic() - paused_at
        capture.wait(timeout=60)
        exited_after = time.monotonic() - paused_at
    finally:
        os.kill(server_pid, signal.SIGCONT)
        if capture.poll() is None:
            capture.kill()
    stderr = "\n".join(lines)
    # attempt 1 stalls (2 s), a 0.5 s pause, attempt 2 stalls (2 s): the error comes after ~4.5 s
    assert capture.returncode == 2 and error_after is not None, stderr[-3000:]
    assert error_after < 2 * READ_TIMEOUT + 4 and exited_after < 30, (error_after, exited_after)
    assert "Traceback" not in stderr
    # the stalled operation: a shard's upload, or the look at what the store kept of it
    stalls = [line for line in lines if "did not answer within 2 s to" in line and "/shards/" in line]
    assert len(stalls) == 1 and stalls[0].startswith(f"the object store at {endpoint} did not answer"), stderr[-3000:]
    assert stalls[0].endswith("(attempt 1 of 2); trying again in 0.5 s")
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    assert errors[0].startswith(f"error: the object store at {endpoint} stopped answering: no reply within 2 s to ")
    assert f" {url}/shards/" in errors[0]
    assert "(2 attempts)" in errors[0] and '"read_timeout": 60' in errors[0]

    resumed = subprocess.run(KDPIPE + args, capture_output=True, text=True, timeout=120)  # the store is back
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr and f"wrote {url}: 60 rows" in resumed.stdout


def test_stall_knobs_come_from_the_storage_options():
    assert retry_policy("s3", None).attempts == ATTEMPTS and retry_policy("s3", {}).read_timeout_s == READ_TIMEOUT_S
    policy = retry_policy("s3", json.loads(STALL_OPTIONS))
    assert (policy.attempts, policy.read_timeout_s) == (2, READ_TIMEOUT)
    with pytest.raises(ConfigError, match=r"config_kwargs.retries.max_attempts must be a whole number >= 1, got 0"):
        retry_policy("s3", {"config_kwargs": {"retries": {"max_attempts": 0}}})
    with pytest.raises(ConfigError, match=r"config_kwargs.read_timeout must be a number of seconds > 0, got 'x'"):
        CacheLocation("s3://bucket/x", {"config_kwargs": {"read_timeout": "x"}}).fs  # noqa: B018
