"""``kdpipe train-student`` as a user runs it: resume from the run directory alone, extending a finished
run, the settings flags and --help, --report-to tensorboard, curves.png. Real runs with tiny settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kdpipe.pipeline.train.schedule import warmup_cosine
from kdpipe.pipeline.train.trainer import Trainer
from kdpipe.pipeline.train.config import merge_config
from kdpipe.stages.cli import main
from kdpipe.stages.train_student import train_student

STUDENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def run_cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def lm_cache(tiny_lm_dir, text_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_cli") / "cache"
    result = run_cli("cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", out, "--top-k", 16,
                     "--seq-len", 32, "--limit-rows", 120, "--shard-size-mb", 0.1, "--temperature", 1)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("student") / "student.json"
    path.write_text(json.dumps(STUDENT))
    return path


def train_args(cache, student, out, *extra) -> list:
    return ["train-student", "--cache", cache, "--student", student, "--out", out, "--batch-size", 4,
            "--lr", 3e-3, "--seed", 1, "--shuffle-buffer", 8, "--log-every", 1, "--eval-every", 0,
            "--device", "cpu", *extra]


def records(out: Path, split: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def crash_after(monkeypatch, step: int) -> None:
    """Make the run stop (KeyboardInterrupt) right after it logged its training metrics of ``step``."""
    log = Trainer.log

    def log_then_crash(self, record):
        log(self, record)
        if record["step"] == step and record["split"] == "train":
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "log", log_then_crash)


# ----------------------------------------------------------------------------- resume
def test_resume_needs_only_the_run_directory(lm_cache, student, tmp_path, monkeypatch):
    full = run_cli(*train_args(lm_cache, student, tmp_path / "full", "--steps", 6, "--checkpoint-every", 2))
    assert full.exit_code == 0, full.output
    crash_after(monkeypatch, 5)  # after the checkpoint at 4 and the metrics of step 5
    monkeypatch.chdir(lm_cache.parent)
    cut = run_cli(*train_args(lm_cache.name, student, tmp_path / "cut", "--steps", 6, "--checkpoint-every", 2))
    assert cut.exit_code == 130 and not (tmp_path / "cut" / "model").exists()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)  # --cache was relative: run.json's resolved cache_path finds it from here
    resumed = run_cli("train-student", "--out", tmp_path / "cut", "--resume", "--batch-size", 4)  # equal: fine
    assert resumed.exit_code == 0, resumed.output
    assert_same_weights(weights(tmp_path / "full" / "model"), weights(tmp_path / "cut" / "model"))
    assert [r["step"] for r in records(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]
    run = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert run["status"] == "finished" and run["resolved_settings"]["shuffle_buffer"] == 8


def test_resume_refuses_a_changed_setting_naming_it(lm_cache, student, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*train_args(lm_cache, student, out, "--steps", 4, "--checkpoint-every", 2)).exit_code == 0
    finished = weights(out / "model")
    again = run_cli("train-student", "--out", out, "--resume")  # finished, nothing to add: the model stays
    assert again.exit_code == 0 and "already holds this finished run (4 steps); nothing to do" in again.stdout
    assert_same_weights(finished, weights(out / "model"))
    assert json.loads((out / "run.json").read_text())["final_train_metrics"]["step"] == 4
    changed = run_cli("train-student", "--out", out, "--resume", "--lr", 0.01)
    assert changed.exit_code == 2
    assert "is another run: settings.lr (was 0.003, now 0.01); drop --lr" in changed.stderr
    shorter = run_cli("train-student", "--out", out, "--resume", "--steps", 3)
    assert shorter.exit_code == 2 and "settings.steps (was 4, now 3)" in shorter.stderr and "not shortened" in shorter.stderr
    other_kind = run_cli("train-student", "--out", out, "--resume", "--epochs", 5)
    assert other_kind.exit_code == 2 and "settings.steps (was 4, now null)" in other_kind.stderr
    no_out = run_cli("train-student", "--resume")
    assert no_out.exit_code == 2 and "--resume needs --out RUN_DIR" in no_out.stderr


# ----------------------------------------------------------------------------- extension
def test_a_finished_run_extended_from_60_to_80_steps(lm_cache, student, tmp_path):
    out = tmp_path / "run"
    first = run_cli(*train_args(lm_cache, student, out, "--steps", 60, "--checkpoint-every", 30,
                                "--warmup", 5, "--eval-every", 20, "--eval-rows", 4))
    assert first.exit_code == 0, first.output
    finished = weights(out / "model")
    shutil.copytree(out, tmp_path / "copy")

    # the extension starts from the finished model (and its optimizer, data position and step)
    trainer = Trainer(merge_config(None, {"out": str(tmp_path / "copy"), "steps": 80}, resume=True), resume=True)
    try:
        trainer.setup()
        assert (trainer.step, trainer.total_steps) == (60, 80)
        assert_same_weights(finished, {k: v.cpu() for k, v in trainer.model.state_dict().items()})
    finally:
        trainer.close()

    more = run_cli("train-student", "--out", out, "--resume", "--steps", 80)
    assert more.exit_code == 0, more.output
    train = records(out)
    assert [r["step"] for r in train] == list(range(1, 81))
    assert [r["step"] for r in records(out, "eval")] == [20, 40, 60, 80]
    # steps 61..80 follow the cosine of the new total from the step reached (schedule.warmup_cosine)
    for r in train[60:]:
        assert r["lr"] == pytest.approx(3e-3 * warmup_cosine(r["step"] - 1, total=80, warmup=5, min_ratio=0.1))
    assert train[59]["lr"] == pytest.approx(3e-3 * warmup_cosine(59, total=60, warmup=5, min_ratio=0.1))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["total_steps"] == 80 and run["settings"]["steps"] == 80
    assert [(e["at_step"], e["from_total_steps"], e["to_total_steps"]) for e in run["extensions"]] == [(60, 60, 80)]
    assert not torch.equal(weights(out / "model")["lm_head.weight"], finished["lm_head.weight"])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_with_a_constant_learning_rate_an_extended_run_equals_the_longer_run(lm_cache, student, tmp_path):
    constant = ("--min-lr-ratio", 1, "--checkpoint-every", 5)  # the LR no longer depends on the total
    assert run_cli(*train_args(lm_cache, student, tmp_path / "long", "--steps", 14, *constant)).exit_code == 0
    assert run_cli(*train_args(lm_cache, student, tmp_path / "ext", "--steps", 10, *constant)).exit_code == 0
    extended = run_cli("train-student", "--out", tmp_path / "ext", "--resume", "--steps", 14)
    assert extended.exit_code == 0, extended.output
    assert_same_weights(weights(tmp_path / "long" / "model"), weights(tmp_path / "ext" / "model"))
    assert [r["loss"] for r in records(tmp_path / "long")] == [r["loss"] for r in records(tmp_path / "ext")]


def test_a_run_without_checkpoints_cannot_be_extended(lm_cache, student, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*train_args(lm_cache, student, out, "--steps", 2, "--checkpoint-every", 0)).exit_code == 0
    result = run_cli("train-student", "--out", out, "--resume", "--steps", 4)
    assert result.exit_code == 2
    assert f"--checkpoint-every 0), so it cannot go on; train a new run from its model: --student {out / 'model'}" in result.stderr


# ----------------------------------------------------------------------------- settings and --help
SIX = {"weight_decay": ("--weight-decay", 0.05), "clip": ("--clip", 0.5), "log_every": ("--log-every", 2),
       "min_lr_ratio": ("--min-lr-ratio", 0.2), "eval_rows": ("--eval-rows", 5), "shuffle_buffer": ("--shuffle-buffer", 16)}


def test_the_former_toml_only_settings_are_flags_and_override_the_file(lm_cache, student, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text("weight-decay = 0.3\nclip = 0.7\nwarmup = 2\n")
    flags = [x for flag, value in SIX.values() for x in (flag, value)]
    result = run_cli(*train_args(lm_cache, student, tmp_path / "run", "--steps", 4, "--eval-every", 4),
                     *flags, "--config", config)
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["resolved_settings"]
    assert {key: settings[key] for key in SIX} == {key: value for key, (_, value) in SIX.items()}
    assert settings["warmup"] == 2  # from the file: no flag given
    assert [r["step"] for r in records(tmp_path / "run")] == [2, 4]  # --log-every 2
    assert records(tmp_path / "run", "eval")[0]["rows"] == 5  # --eval-rows 5


def test_help_marks_required_options_and_shows_defaults():
    result = CliRunner().invoke(main, ["train-student", "--help"])
    assert result.exit_code == 0
    ctx = train_student.make_context("train-student", ["--help"], resilient_parsing=True)
    help_of = {p.name: p.get_help_record(ctx)[1] for p in train_student.params if p.get_help_record(ctx)}
    for name in ("cache", "student"):
        assert "[required unless in --config or restored by --resume]" in help_of[name]
    assert "[required unless in --config]" in help_of["out"]
    assert "[this or --epochs required" in help_of["steps"]
    for name, (flag, _) in SIX.items():
        assert flag in result.output and "[default: " in help_of[name], name
    assert "[default: 0.01]" in help_of["weight_decay"] and "[default: none]" in help_of["report_to"]
    assert "(default" not in result.output  # defaults are click's [default: ...], not prose


# ----------------------------------------------------------------------------- --report-to
def test_report_to_tensorboard_writes_what_metrics_jsonl_holds(lm_cache, student, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = train_args(lm_cache, student, out, "--steps", 6, "--checkpoint-every", 2, "--eval-every", 3,
                      "--eval-rows", 4, "--report-to", "tensorboard")
    crash_after(monkeypatch, 5)  # step 5 is logged twice: before the crash and after resuming from step 4
    assert run_cli(*args).exit_code == 130
    monkeypatch.undo()
    result = run_cli("train-student", "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [r for split in ("train", "eval") for r in records(out, split)]
    expected = {(f"{r['split']}/{k}", r["step"]): v for r in logged for k, v in r.items()
                if k not in ("step", "split") and isinstance(v, (int, float)) and v is not None}
    found = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert found.keys() == expected.keys()
    assert sum(len(events.Scalars(tag)) for tag in events.Tags()["scalars"]) == len(expected)  # no step twice
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key  # event files hold float32


def test_report_to_an_uninstalled_tracker_or_an_unknown_name_is_one_line(lm_cache, student, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        result = run_cli(*train_args(lm_cache, student, tmp_path / "w", "--steps", 2, "--report-to", "tensorboard,wandb"))
        assert result.exit_code == 2 and not (tmp_path / "w").exists()
        assert result.stderr == "error: --report-to wandb needs the wandb package: pip install wandb\n"
    unknown = run_cli(*train_args(lm_cache, student, tmp_path / "u", "--steps", 2, "--report-to", "tensorbord"))
    assert unknown.exit_code == 2 and "unknown --report-to 'tensorbord'; use none or any of tensorboard" in unknown.stderr


# ----------------------------------------------------------------------------- curves
def test_train_student_writes_curves_saying_how_many_rows_the_eval_points_use(lm_cache, student, tmp_path):
    from kdpipe.pipeline.evaluate.plots import _eval_rows_note, read_metrics

    out = tmp_path / "run"
    result = run_cli(*train_args(lm_cache, student, out, "--steps", 4, "--eval-every", 2, "--eval-rows", 3))
    assert result.exit_code == 0, result.output
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    note = _eval_rows_note({"run": read_metrics(out / "metrics.jsonl")})
    assert "each on the first 3 held-out rows (--eval-rows)" in note
