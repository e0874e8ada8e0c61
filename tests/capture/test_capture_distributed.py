"""Stage one on several processes, on CPU: real ``torchrun`` (gloo), ranks started by hand, and
``--device-map auto``. Each cache must equal the capture of one process: the same shard names, the
same sha256 per shard, the same rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdpipe.pipeline.capture.plan import CaptureSettings
from kdpipe.pipeline.distributed import launch_from_env
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.capture.progress import RankProgress
from kdpipe.stages.cli import main

REPO = Path(__file__).resolve().parents[2]
KDPIPE = Path(sys.executable).parent / "kdpipe"  # the console script, as torchrun is given it
# The shipped demo teacher and chat set: 100 conversations (33 kB) in 8 blocks of 4 kB, 2 shards each.
SETTINGS = ["--teacher", str(REPO / "data" / "teacher"), "--data", str(REPO / "data" / "chat" / "heldout.jsonl"),
            "--top-k", "8", "--seq-len", "32", "--batch-size", "16", "--targets", "all", "--block-mb", "0.004",
            "--shard-size-mb", "0.01", "--num-workers", "0", "--temperature", "1", "--temperature", "2",
            "--device", "cpu"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def env() -> dict:
    """This environment without any torchrun variables (a test run under torchrun must not leak them)."""
    clean = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    return clean | {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    # --standalone: a local rendezvous on a free port, so tests never collide on one.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(KDPIPE), "cache-teacher", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env(), timeout=300)


def run_cli(*args, **kwargs):
    return CliRunner().invoke(main, ["cache-teacher", *map(str, args)], catch_exceptions=False, **kwargs)


def manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def shards(cache: Path) -> list[tuple[str, str, int]]:
    """(name, sha256, rows) of every shard, as the manifest lists them; each file's sha256 checked."""
    from kdpipe.pipeline.fileio import sha256_file

    listed = [(s["name"], s["sha256"], s["rows"]) for s in manifest(cache)["shards"]]
    assert all(sha256_file(cache / name) == sha for name, sha, _ in listed)
    assert sorted(p.relative_to(cache).as_posix() for p in (cache / "shards").iterdir()) == sorted(n for n, _, _ in listed)
    return listed


@pytest.fixture(scope="module", autouse=True)
def _console_script():
    if not KDPIPE.is_file():
        pytest.skip(f"the kdpipe console script is not installed next to {sys.executable} (pip install -e .)")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The capture of one process."""
    out = tmp_path_factory.mktemp("single") / "cache"
    result = run_cli(*SETTINGS, "--out", out)
    assert result.exit_code == 0, result.output
    m = manifest(out)
    assert m["data"]["blocks"] >= 4 and m["totals"]["shards"] > m["data"]["blocks"]  # several parts a block
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("torchrun") / "cache"
    result = torchrun(*SETTINGS, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


@pytest.mark.slow
def test_torchrun_capture_equals_one_process(single, two_ranks):
    out, result = two_ranks
    assert shards(out) == shards(single)
    m = manifest(out)
    assert m["totals"] == manifest(single)["totals"] and m["capture"]["world_size"] == 2
    assert {s["rank"] for s in m["shards"]} == {0, 1} and all(s["rank"] == s["block"] % 2 for s in m["shards"])
    assert sorted(p.name for p in out.rglob("manifest.json*")) == ["manifest.json"]  # one, and no stray tmp
    assert sorted(p.name for p in (out / "_progress").iterdir()) == ["r00000.json", "r00000.lock", "r00001.json",
                                                                     "r00001.lock"]  # a record and a lock per rank
    assert not list(out.rglob("*.tmp"))
    # Rank 0 alone reports; the other rank stays quiet (no bar, no summary).
    assert result.stdout.count("wrote ") == 1 and "by 2 ranks" in result.stdout
    assert result.stderr.count("cache-teacher:") >= 1 and "error:" not in result.stderr
    # Its display counts every rank's rows and tokens, not its own share (issue 28 item 7).
    last = [line for line in result.stderr.splitlines() if line.startswith("cache-teacher:")][-1]
    assert f"rows {m['totals']['rows']}, tokens {m['totals']['tokens']:,}" in last, last


@pytest.mark.slow
def test_torchrun_progress_has_the_whole_capture_as_its_total(tmp_path):
    """Under torchrun with --limit-rows, rank 0 shows rows of every rank out of the limit (it showed
    ``cache-teacher: 0 rows |`` and its own share, no total)."""
    result = torchrun(*SETTINGS, "--limit-rows", 40, "--out", tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("cache-teacher:")]
    assert lines[0].startswith("cache-teacher: 0/40 rows (0%)"), lines
    assert lines[-1].startswith("cache-teacher: 40/40 rows (100%) | tokens 1,240"), lines
    assert manifest(tmp_path / "cache")["totals"]["rows"] == 40


@pytest.mark.slow
def test_rerun_of_a_torchrun_capture_is_a_no_op(two_ranks):
    out, _ = two_ranks
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = torchrun(*SETTINGS, "--out", out)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already holds this finished capture; nothing to do") == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.slow
def test_ranks_started_by_hand_make_the_same_cache(single, tmp_path):
    """--rank/--world-size for schedulers that start the processes (Slurm arrays, Kubernetes jobs):
    rank 1 in a process of its own while rank 0 runs in this one."""
    out = tmp_path / "cache"
    other = subprocess.Popen([str(KDPIPE), "cache-teacher", *SETTINGS, "--out", str(out), "--rank", "1", "--world-size", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        here = run_cli(*SETTINGS, "--out", out, "--rank", 0, "--world-size", 2, env={k: None for k in TORCHRUN_VARS})
    finally:
        stdout, stderr = other.communicate(timeout=300)
    assert here.exit_code == 0 and other.returncode == 0, (here.output, stdout, stderr)
    # The last rank to finish wrote the manifest (both may have: the same content, written atomically).
    said = [here.output, stdout]
    assert any("wrote " in s for s in said) and all("wrote " in s or "manifest is written when every rank" in s for s in said)
    assert shards(out) == shards(single) and manifest(out)["capture"]["world_size"] == 2


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="compares with a CPU capture; a GPU box places the teacher on its GPUs")
def test_device_map_auto_without_gpus_gives_the_same_cache(single, tmp_path):
    out = tmp_path / "cache"
    settings = list(SETTINGS)
    del settings[settings.index("--device"): settings.index("--device") + 2]  # --device-map places it
    result = run_cli(*settings, "--device-map", "auto", "--out", out)
    assert result.exit_code == 0, result.output
    assert shards(out) == shards(single)
    assert manifest(out)["capture"]["device_map"] == "auto" and manifest(out)["device"] == "cpu"


def test_world_size_contradicting_torchrun_is_one_error_line(tmp_path):
    torchrun_env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    result = run_cli(*SETTINGS, "--out", tmp_path / "cache", "--world-size", "3", env=torchrun_env)
    assert result.exit_code == 2
    assert result.output == ("error: --world-size 3 contradicts WORLD_SIZE=2 set by torchrun; drop --rank and "
                             "--world-size under torchrun (it sets both), or start the processes without torchrun\n")
    assert not (tmp_path / "cache").exists()


NAN_MODEL = """
import torch

def nan_on_white():  # 8x8 images -> 10 classes; NaN logits for an image whose first pixel is white
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 10)

        def forward(self, x):
            logits = self.linear(x.flatten(1))
            return torch.where(x.flatten(1)[:, :1] > 0.99, torch.nan, logits)
    return Net()
"""


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    (tmp_path / "nan_model.py").write_text(NAN_MODEL)
    namespace: dict = {}
    exec(NAN_MODEL, namespace)
    save_file(namespace["nan_on_white"]().state_dict(), str(tmp_path / "w.safetensors"))
    x = np.random.default_rng(0).integers(0, 200, (40, 8, 8), dtype=np.uint8)
    x[15, 0, 0] = 255  # row 15: block 1 of 4 blocks of 10 rows, rank 1's
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 10)
    out = tmp_path / "cache"
    result = torchrun("--teacher", f"{tmp_path / 'nan_model.py'}:nan_on_white", "--weights", tmp_path / "w.safetensors",
                      "--data", tmp_path / "d.npz", "--out", out, "--top-k", 3, "--shard-size-mb", 0.0005, "--device", "cpu")
    assert result.returncode != 0
    assert result.stderr.count("error: teacher logits are NaN or infinite in row 15") == 1
    # Rank 0 either stopped waiting with its own one-line error or was ended by torchrun; no kdpipe traceback.
    assert "pipeline/capture" not in result.stderr and "stages/cache_teacher" not in result.stderr
    assert not (out / "manifest.json").exists()


def test_device_map_with_a_device_is_refused(tmp_path):
    result = run_cli(*SETTINGS, "--device-map", "auto", "--out", tmp_path / "cache")  # SETTINGS say --device cpu
    assert result.exit_code == 2 and result.output == (
        "error: --device-map auto places the teacher on the GPUs itself (or the CPU without GPUs); "
        "drop --device cpu, or drop --device-map to run on cpu\n")


def test_launch_from_env():
    torchrun_env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    launch = launch_from_env(env=torchrun_env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, launch.torchrun) == (3, 4, 1, 2, True)
    assert launch_from_env(rank=3, world_size=4, env=torchrun_env) == launch  # the same values may be given
    alone = launch_from_env(rank=2, world_size=5, env={"RANK": "0"})  # no LOCAL_RANK: not torchrun
    assert (alone.rank, alone.world_size, alone.torchrun) == (2, 5, False)
    with pytest.raises(ConfigError, match="--rank 0 contradicts RANK=3"):
        launch_from_env(rank=0, env=torchrun_env)


def test_device_map_needs_an_hf_teacher(module_teacher, tmp_path):
    result = run_cli("--teacher", module_teacher["spec"], "--weights", module_teacher["weights"], "--data",
                     module_teacher["data"], "--out", tmp_path / "cache", "--device-map", "auto")
    assert result.exit_code == 2 and result.output.startswith("error: --device-map auto places a Hugging Face")
    assert result.output.count("\n") == 1


def test_a_rank_removes_only_the_stale_temporary_files_of_its_blocks(tmp_path):
    (tmp_path / "shards").mkdir()
    names = ["b0000000-p000.zarr.zip.11.tmp", "b0000001-p000.zarr.zip.12.tmp", "b0000003-p001.parquet.13.tmp",
             "r00000-b0000004-p000.zarr.zip.14.tmp"]  # the last: a cache from before names lost the rank
    for name in names:
        (tmp_path / "shards" / name).write_bytes(b"partial")
    (tmp_path / "manifest.json.15.tmp").write_text("{}")
    log = RankProgress(tmp_path, rank=1, world_size=2)
    assert sorted(p.name for p in log._remove_stale_tmp()) == [names[1], names[2]]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [names[0], names[3]]
    assert (tmp_path / "manifest.json.15.tmp").exists()  # rank 0 may be writing it
    RankProgress(tmp_path, rank=0, world_size=2, writes_manifest=True)._remove_stale_tmp()
    assert not list(tmp_path.rglob("*.tmp"))


def test_capture_settings_keep_the_world_size_as_content():
    assert CaptureSettings(teacher="t", data="d", out="o", rank=1, world_size=2).content_settings()["world_size"] == 2
