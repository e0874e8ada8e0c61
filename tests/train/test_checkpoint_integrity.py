"""``train-student --resume`` trusts nothing it has not verified (issue 27 items 4 and 7, issue 28 item 6):
a damaged or edited checkpoint is refused in one line naming the previous intact one, a torn last line
of metrics.jsonl is dropped (damage elsewhere refused), a failed checkpoint write is one line and
leaves the checkpoints already written intact, and resuming a finished run changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kdpipe.pipeline.train.checkpoint_files import verify_checkpoint
from kdpipe.pipeline.train.trainer import Trainer
from kdpipe.stages.cli import main

STUDENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
FILE_SIZE_LIMIT = str(Path(__file__).with_name("file_size_limit.py"))


def run_cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def lm_cache(tiny_lm_dir, text_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "cache"
    result = run_cli("cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", out, "--top-k", 16,
                     "--seq-len", 32, "--limit-rows", 80, "--shard-size-mb", 0.1, "--temperature", 1)
    assert result.exit_code == 0, result.output
    return out


def train_args(cache, student, out) -> list:
    return ["train-student", "--cache", cache, "--student", student, "--out", out, "--batch-size", 4, "--steps", 6,
            "--checkpoint-every", 2, "--lr", 3e-3, "--seed", 1, "--log-every", 1, "--eval-every", 3,
            "--eval-rows", 4, "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(lm_cache, tmp_path_factory) -> dict:
    """An uninterrupted 6-step run, and the same run stopped right after logging step 5 (checkpoints
    at steps 4, kept as checkpoint/, and 2, as checkpoint.previous/)."""
    folder = tmp_path_factory.mktemp("runs")
    student = folder / "student.json"
    student.write_text(json.dumps(STUDENT))
    full = run_cli(*train_args(lm_cache, student, folder / "full"))
    assert full.exit_code == 0, full.output
    with pytest.MonkeyPatch.context() as patch:
        log = Trainer.log

        def log_then_crash(self, record):
            log(self, record)
            if record["step"] == 5 and record["split"] == "train":
                raise KeyboardInterrupt

        patch.setattr(Trainer, "log", log_then_crash)
        cut = run_cli(*train_args(lm_cache, student, folder / "cut"))
    assert cut.exit_code == 130 and not (folder / "cut" / "model").exists()
    assert verify_checkpoint(folder / "cut" / "checkpoint")["step"] == 4
    assert verify_checkpoint(folder / "cut" / "checkpoint.previous")["step"] == 2
    return {"full": folder / "full", "cut": folder / "cut"}


@pytest.fixture()
def cut(runs, tmp_path) -> Path:
    """A fresh copy of the stopped run."""
    return Path(shutil.copytree(runs["cut"], tmp_path / "run"))


def resume(out: Path) -> object:
    return run_cli("train-student", "--out", out, "--resume")


def records(out: Path) -> list[dict]:
    """metrics.jsonl without the timing field (the only one that differs between equal runs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out: Path, reference: Path) -> None:
    """The same model, metrics and last checkpoint (its RNG state included) as the uninterrupted run."""
    for name in ("model/model.safetensors", "checkpoint/model.safetensors", "checkpoint/optimizer.pt",
                 "checkpoint/rng.pt", "checkpoint/trainer_state.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert records(out) == records(reference)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its bytes and modification time."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- damaged checkpoints
def set_step_back(folder: Path) -> None:
    state = folder / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 4', '"step": 2'))


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


MISMATCH = " does not match the size and sha256 its checkpoint.json records (edited or damaged)"
DAMAGE = {
    "trainer_state.json set back from step 4 to 2": (set_step_back, "trainer_state.json" + MISMATCH),
    "model.safetensors zeroed": (lambda f: zero(f / "model.safetensors"), "model.safetensors" + MISMATCH),
    "optimizer.pt truncated": (lambda f: truncate(f / "optimizer.pt"), "optimizer.pt" + MISMATCH),
    "rng.pt deleted": (lambda f: (f / "rng.pt").unlink(), "rng.pt is missing"),
    "checkpoint.json deleted": (lambda f: (f / "checkpoint.json").unlink(), "it has no checkpoint.json (written "
                                "last: the checkpoint is incomplete, or from a kdpipe that did not write one)"),
    "checkpoint.json edited": (lambda f: (f / "checkpoint.json").write_text(
        (f / "checkpoint.json").read_text().replace('"step": 4', '"step": 6')),
        "its checkpoint.json was edited (its checksum does not match)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_naming_the_previous_one(cut, runs, damage):
    spoil, reason = DAMAGE[damage]
    spoil(cut / "checkpoint")
    before = snapshot(cut)
    result = resume(cut)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: --resume refused: checkpoint {cut / 'checkpoint'} is damaged: {reason}; the previous checkpoint "
        f"{cut / 'checkpoint.previous'} (step 2) is intact: delete {cut / 'checkpoint'} to resume from it, "
        "or start a new run\n")
    assert snapshot(cut) == before  # nothing written
    shutil.rmtree(cut / "checkpoint")  # the fix the message gives
    resumed = resume(cut)
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(cut, runs["full"])


def test_without_an_intact_earlier_checkpoint_the_refusal_says_so(cut):
    zero(cut / "checkpoint" / "model.safetensors")
    truncate(cut / "checkpoint.previous" / "optimizer.pt")
    result = resume(cut)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.endswith("model.safetensors does not match the size and sha256 its checkpoint.json records "
                                  "(edited or damaged); no intact earlier checkpoint is kept: start a new run "
                                  "(or restore the checkpoint from a backup)\n")


# ----------------------------------------------------------------------------- metrics.jsonl
def test_a_torn_last_metrics_line_is_dropped_and_the_resumed_run_equals_the_uninterrupted_one(cut, runs):
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "split": "train", "loss": 5.')  # the append a SIGKILL cut short
    result = resume(cut)
    assert result.exit_code == 0, result.output
    assert_same_run(cut, runs["full"])


def test_damage_in_the_middle_of_metrics_jsonl_is_refused_in_one_line(cut):
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"step": 2, "split": "train", "lo\n'
    (cut / "metrics.jsonl").write_text("".join(lines))
    before = snapshot(cut)
    result = resume(cut)
    assert result.exit_code == 2 and result.stderr == (
        f"error: {cut / 'metrics.jsonl'} line 2 is not a metrics record (damaged, and not by a crash, which can "
        "only cut the last line); repair or delete that line, then resume again\n")
    assert snapshot(cut) == before


# ----------------------------------------------------------------------------- a failed checkpoint write
def test_a_write_failing_like_a_full_disk_is_one_line_and_keeps_the_checkpoints(cut, runs):
    """The resumed process may write no file over 60 kB: the checkpoint of step 6 fails in the real
    safetensors writer with the operating system's error."""
    limited = subprocess.run([sys.executable, FILE_SIZE_LIMIT, "60000", "all", "train-student", "--out", str(cut),
                              "--resume"], capture_output=True, text=True, timeout=300)
    assert limited.returncode == 2, limited.stderr[-3000:]
    assert limited.stderr.splitlines()[-1] == (
        f"error: cannot write the checkpoint of step 6 to --out {cut}: [Errno 27] File too large; fix that and "
        f"resume: train-student --out {cut} --resume (its checkpoint of step 4 is intact)")
    assert "Traceback" not in limited.stderr and "error:" not in limited.stderr.splitlines()[-2]
    assert not (cut / "checkpoint.tmp").exists() and not (cut / "model").exists()
    assert verify_checkpoint(cut / "checkpoint")["step"] == 4  # the latest checkpoint is intact
    assert not (cut / "checkpoint.previous").exists()  # the older one went first, to make room
    resumed = resume(cut)
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(cut, runs["full"])


def test_safetensors_no_space_left_is_named_with_its_fix(cut, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(model, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # what was written before the disk filled up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    result = resume(cut)
    assert result.exit_code == 2 and result.stderr.splitlines()[-1] == (
        f"error: cannot write the checkpoint of step 6 to --out {cut}: [Errno 28] No space left on device; free space "
        f"and resume: train-student --out {cut} --resume (its checkpoint of step 4 is intact)")
    assert result.stderr.count("error:") == 1
    assert verify_checkpoint(cut / "checkpoint")["step"] == 4 and not (cut / "checkpoint.tmp").exists()


# ----------------------------------------------------------------------------- a finished run
def test_resuming_a_finished_run_is_a_no_op_that_says_so(lm_cache, tmp_path):
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    out = tmp_path / "run"
    done = run_cli(*train_args(lm_cache, student, out), "--steps", 2, "--report-to", "tensorboard")
    assert done.exit_code == 0, done.output
    before = snapshot(out)
    again = resume(out)
    assert again.exit_code == 0 and again.stderr == ""
    assert again.stdout == f"{out} already holds this finished run (2 steps); nothing to do (a larger --steps or --epochs extends it)\n"
    assert snapshot(out) == before  # model, run.json, metrics, curves, TensorBoard events: same bytes, same times
    weights = load_file(out / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_finished_run_with_a_damaged_checkpoint_is_refused_when_extended(runs, tmp_path):
    out = Path(shutil.copytree(runs["full"], tmp_path / "run"))
    zero(out / "checkpoint" / "optimizer.pt")
    assert resume(out).exit_code == 0  # nothing to do: the checkpoint is not read
    longer = run_cli("train-student", "--out", out, "--resume", "--steps", 8)
    assert longer.exit_code == 2 and "optimizer.pt does not match" in longer.stderr
    assert f"the previous checkpoint {out / 'checkpoint.previous'} (step 4) is intact" in longer.stderr
    assert os.listdir(out / "checkpoint") and json.loads((out / "run.json").read_text())["total_steps"] == 6
