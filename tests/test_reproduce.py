"""``kdpipe reproduce``: a recorded capture or training run, re-run in a new place, gives the same bytes;
what differs (outputs, package versions) is named; a changed cache or run directory is refused.

Every kdpipe command here runs as its own process (``python -m kdpipe``), as a user runs it: what is
recorded is the real command line and the real installed package set of that process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdpipe.pipeline.provenance import NOT_RECORDED, packages_text, redact_args

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "data" / "teacher"
STUDENT = REPO / "data" / "students" / "lm-student.json"
FIXTURE_V1 = REPO / "tests" / "fixtures" / "cache_v1"
SECRET = "s3cr3t-never-recorded"


def kdpipe(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdpipe", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def capture_args(data: Path, out: str = "cache") -> list:
    return ["-q", "cache-teacher", "--teacher", TEACHER, "--data", data, "--out", out, "--top-k", 8, "--seq-len", 64,
            "--limit-rows", 24, "--shard-size-mb", 0.05]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_hashes(cache: Path) -> dict:
    return {s["name"]: sha256(cache / s["name"]) for s in json.loads((cache / "manifest.json").read_text())["shards"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a copy of some real text (the data may be edited by a test) and a capture of it."""
    folder = tmp_path_factory.mktemp("reproduce")
    shutil.copytree(REPO / "data" / "shakespeare" / "heldout", folder / "text")
    done = kdpipe(*capture_args(Path("text")), "--storage-options", json.dumps({"secret": SECRET}), cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture(scope="module")
def run(work) -> Path:
    """A training run of 4 steps, then extended to 6 (so reproduce replays a start and a --resume)."""
    common = ["-q", "train-student", "--cache", "cache", "--student", STUDENT, "--out", "run", "--batch-size", 4,
              "--eval-every", 2]
    for extra in (["--steps", 4], ["--resume", "--steps", 6]):
        done = kdpipe(*common, *extra, cwd=work)
        assert done.returncode == 0, done.stderr
    return work / "run"


@pytest.mark.slow  # re-runs a capture: 12-22 s on 2 cores
def test_capture_reproduces_bit_for_bit(work):
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    assert manifest["command"]["args"][:2] == ["-q", "cache-teacher"]
    assert NOT_RECORDED in manifest["command"]["args"] and SECRET not in (work / "cache" / "manifest.json").read_text()
    assert manifest["software"]["packages_sha256"] == sha256(work / "cache" / "packages.txt")
    shown = kdpipe("inspect", "cache", cwd=work).stdout
    assert "command:         kdpipe -q cache-teacher --teacher" in shown and "packages.txt sha256" in shown

    done = kdpipe("reproduce", "cache", cwd=work)

    assert done.returncode == 0, done.stdout + done.stderr
    assert shard_hashes(work / "cache-reproduced") == shard_hashes(work / "cache")  # beside it, by default
    assert len(shard_hashes(work / "cache")) >= 2
    assert done.stdout.count("same     shard") == len(shard_hashes(work / "cache"))
    assert "identical: " in done.stdout and "environment: every recorded package version" in done.stdout


@pytest.mark.slow  # trains twice: 12-22 s on 2 cores
def test_training_run_reproduces_model_bytes_and_metrics(run, tmp_path):
    recorded = json.loads((run / "run.json").read_text())
    assert [e["to_total_steps"] for e in recorded["extensions"]] == [6]
    assert "--resume" in recorded["extensions"][0]["command"]["args"]

    done = kdpipe("reproduce", "run", "--out", tmp_path / "again", cwd=run.parent)

    assert done.returncode == 0, done.stdout + done.stderr
    again = json.loads((tmp_path / "again" / "run.json").read_text())
    assert sha256(tmp_path / "again" / "model" / "model.safetensors") == sha256(run / "model" / "model.safetensors")
    assert again["final_eval_metrics"] == recorded["final_eval_metrics"]
    assert [e["to_total_steps"] for e in again["extensions"]] == [6]  # replayed as it happened: 4 steps, then 6
    assert "same     model/model.safetensors" in done.stdout
    assert "same     final_eval_metrics" in done.stdout and "identical: " in done.stdout


@pytest.mark.slow  # two torchrun trainings: 12-22 s on 2 cores
def test_torchrun_run_is_reproduced_under_torchrun(work, tmp_path):
    """A run of 2 processes (gloo) is re-run under torchrun with 2 processes: same model bytes."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "kdpipe"]
    done = subprocess.run([*launch, "-q", "train-student", "--cache", str(work / "cache"), "--student", str(STUDENT),
                           "--out", str(tmp_path / "ddp"), "--steps", "3", "--batch-size", "2", "--eval-every", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    done = kdpipe("reproduce", "ddp", cwd=tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "torchrun --nproc-per-node 2 kdpipe -q train-student" in done.stderr
    assert sha256(tmp_path / "ddp-reproduced" / "model" / "model.safetensors") == \
        sha256(tmp_path / "ddp" / "model" / "model.safetensors")
    assert "environment: every recorded package version and machine fact is the same" in done.stdout


@pytest.mark.slow  # re-runs a capture: 12-22 s on 2 cores
def test_recorded_versions_that_differ_are_named(work, tmp_path):
    """The capture ran with a package ``kdpipe-probe`` 1.0 installed, the re-run with 2.0: the outputs are
    the same, and the difference is reported by name."""
    def probe_package(version: str) -> str:
        site = tmp_path / f"site-{version}"
        info = site / f"kdpipe_probe-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kdpipe-probe\nVersion: {version}\n")
        return str(site)

    done = kdpipe(*capture_args(Path("text"), out=str(tmp_path / "c")), cwd=work, env={"PYTHONPATH": probe_package("1.0")})
    assert done.returncode == 0, done.stderr
    assert "kdpipe-probe==1.0" in (tmp_path / "c" / "packages.txt").read_text()

    done = kdpipe("reproduce", tmp_path / "c", cwd=work, env={"PYTHONPATH": probe_package("2.0")})

    assert done.returncode == 0, done.stdout + done.stderr
    assert "environment: 1 recorded versions differ" in done.stdout
    assert "kdpipe-probe: 1.0 recorded, 2.0 now" in done.stdout


@pytest.mark.slow  # re-runs a capture: 12-22 s on 2 cores
def test_changed_outputs_are_reported_and_fail(work, tmp_path):
    """Data edited after the capture: the re-run's shards differ, and reproduce says which and why."""
    shutil.copytree(work / "text", tmp_path / "text")
    done = kdpipe(*capture_args(Path("text")), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    first = sorted((tmp_path / "text").glob("*.txt"))[0]
    first.write_text(first.read_text()[::-1])

    done = kdpipe("reproduce", "cache", cwd=tmp_path)

    assert done.returncode == 1
    assert "DIFFERS  input data" in done.stdout and "DIFFERS  shard" in done.stdout
    assert "not identical:" in done.stdout


def test_tampered_run_directory_is_refused(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))

    done = kdpipe("reproduce", copy, cwd=tmp_path)

    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model/model.safetensors does not match the sha256 run.json records" in done.stderr
    assert not (tmp_path / "run-reproduced").exists()

    shutil.copy(run / "model" / "model.safetensors", weights)
    recorded = json.loads((copy / "run.json").read_text())
    recorded["resolved_settings"]["lr"] *= 2  # an edited setting: what reproduce would re-run is not what ran
    (copy / "run.json").write_text(json.dumps(recorded))
    done = kdpipe("reproduce", copy, cwd=tmp_path)
    assert done.returncode == 2 and "run.json does not match its checksum" in done.stderr


def test_tampered_cache_is_refused(work, tmp_path):
    shutil.copytree(work / "cache", tmp_path / "cache")
    (tmp_path / "cache" / "packages.txt").write_text("torch==0.0.1\n")
    done = kdpipe("reproduce", "cache", cwd=tmp_path)
    assert done.returncode == 2 and "packages.txt does not match the sha256" in done.stderr

    shutil.copy(work / "cache" / "packages.txt", tmp_path / "cache" / "packages.txt")
    shard = tmp_path / "cache" / json.loads((work / "cache" / "manifest.json").read_text())["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    done = kdpipe("reproduce", "cache", cwd=tmp_path)
    assert done.returncode == 2 and "changed after it was written" in done.stderr


def test_what_cannot_be_reproduced_says_why(work, tmp_path):
    done = kdpipe("reproduce", FIXTURE_V1, "--out", tmp_path / "v1", cwd=tmp_path)  # written before commands were recorded
    assert done.returncode == 2 and "records no kdpipe command line" in done.stderr

    done = kdpipe("reproduce", "cache", "--out", "cache", cwd=work)
    assert done.returncode == 2 and "already exists and is not empty" in done.stderr


def test_secrets_are_never_recorded():
    args = ["cache-teacher", "--storage-options", '{"key": "A", "secret": "B"}', "--out", "s3://user:pw@bucket/c",
            "--storage-options={\"token\": \"T\"}", "--hf-token", "hf_x", "--api-key=K", "--top-k", "8"]
    assert redact_args(args) == ["cache-teacher", "--storage-options", NOT_RECORDED, "--out", "s3://***@bucket/c",
                                 f"--storage-options={NOT_RECORDED}", "--hf-token", NOT_RECORDED,
                                 f"--api-key={NOT_RECORDED}", "--top-k", "8"]


def test_package_list_is_this_environment():
    from importlib.metadata import version

    lines = packages_text().splitlines()
    names = [line.split("==")[0] for line in lines]
    assert names == sorted(set(names))  # one line a package, by name
    assert f"torch=={version('torch')}" in lines and f"numpy=={version('numpy')}" in lines


def test_an_older_capture_re_runs_with_the_targets_it_kept(work):
    """A command that left --top-k, --sample and the text to the defaults of the kdpipe that ran it re-runs with
    what that capture kept, made explicit: the defaults have changed since (top-64 alone, then mixed top-12 +
    16 draws; draws at one temperature, then split over all; no text, then the rows' text)."""
    from kdpipe.pipeline.reproduce import Recorded, rerun_commands

    old = json.loads((FIXTURE_V1 / "manifest.json").read_text())  # what an older kdpipe wrote
    old["command"] = {"args": ["cache-teacher", "--teacher", "t", "--data", "d", "--out", "c"], "cwd": None}
    old["capture"].update(top_k=64, sample=16)
    old["schema"].update(top_k=64, sample_draws=16, sample_temperature=1.0)
    args = rerun_commands(Recorded("cache", "c", old, None), str(work / "again"))[0].args
    assert args[args.index("--top-k") + 1] == "64" and args[args.index("--sample") + 1] == "16"
    assert args[args.index("--sample-temperature") + 1] == "1.0" and "--no-text" in args

    new = json.loads((work / "cache" / "manifest.json").read_text())  # this kdpipe's: given flags are kept as given
    args = rerun_commands(Recorded("cache", "cache", new, None), str(work / "again"))[0].args
    assert args.count("--top-k") == 1 and "--no-text" not in args and "--sample-temperature" not in args


def test_a_cross_tokenizer_run_re_runs_with_its_loss_and_a_same_tokenizer_run_ignores_it(tmp_path):
    """The default --cross-tokenizer-loss changed (prefix-map, then prefix-groups): a run that left it to the
    default re-runs with the loss it used; for a student with the cache's tokenizer the setting computes
    nothing and is not compared."""
    from kdpipe.pipeline.reproduce import Recorded, _compare_runs, rerun_commands

    command = {"args": ["train-student", "--cache", "c", "--student", "s", "--out", "r"], "cwd": None}
    crossed = {"command": command, "cross_tokenizer": {"loss": "prefix-map"},
               "resolved_settings": {"cross_tokenizer_loss": "prefix-map", "steps": 2}}
    args = rerun_commands(Recorded("run", "r", crossed, None), str(tmp_path / "again"))[0].args
    assert args[args.index("--cross-tokenizer-loss") + 1] == "prefix-map"
    same = {"command": command, "cross_tokenizer": None, "resolved_settings": {"cross_tokenizer_loss": "prefix-map"}}
    assert "--cross-tokenizer-loss" not in rerun_commands(Recorded("run", "r", same, None), str(tmp_path / "x"))[0].args
    now = {"cross_tokenizer": None, "resolved_settings": {"cross_tokenizer_loss": "prefix-groups"}}
    assert _compare_runs(same, now).differed == []
    crossed_now = {"cross_tokenizer": {"loss": "prefix-groups"},
                   "resolved_settings": {"cross_tokenizer_loss": "prefix-groups", "steps": 2}}
    assert _compare_runs(crossed, crossed_now).differed == [
        "setting cross_tokenizer_loss: 'prefix-map' recorded, 'prefix-groups' now"]
