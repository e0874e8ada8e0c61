"""kdpipe.pipeline.train.reporting: --report-to names, the scalars of a metrics record, and each tracker fed
the records of metrics.jsonl (TensorBoard for real; wandb and mlflow through stand-in modules that
record the calls, since neither is a dependency)."""

from __future__ import annotations

import sys
import types

import pytest

from kdpipe.pipeline.train import reporting
from kdpipe.pipeline.errors import ConfigError

RECORDS = [
    {"step": 1, "split": "train", "loss": 2.5, "kd": 1.0, "ce": 4.0, "lr": 1e-3, "grad_norm": None},
    {"step": 2, "split": "train", "loss": 2.0, "kd": 0.8, "ce": 3.2, "lr": 1e-3, "grad_norm": 0.5},
    {"step": 2, "split": "eval", "kl_to_teacher": 0.7, "ce": 3.5, "rows": 48, "temperature": 1.0},
]


@pytest.mark.parametrize("given, names", [
    (("none",), []),
    ((), []),
    (("tensorboard",), ["tensorboard"]),
    (("tensorboard,wandb",), ["tensorboard", "wandb"]),
    (("tensorboard", "wandb", "TensorBoard"), ["tensorboard", "wandb"]),
    ("mlflow, tensorboard", ["mlflow", "tensorboard"]),
])
def test_report_to_takes_repeated_and_comma_separated_names(given, names):
    assert reporting.parse_report_to(given) == names


def test_report_to_refuses_unknown_names_and_none_with_a_tracker():
    with pytest.raises(ConfigError, match="unknown --report-to 'tb'; use none or any of tensorboard, wandb, mlflow"):
        reporting.parse_report_to(["tb"])
    with pytest.raises(ConfigError, match="--report-to none cannot be combined"):
        reporting.parse_report_to(["none,wandb"])


def test_a_missing_package_is_named_with_its_install_command(monkeypatch):
    real = reporting.importlib.util.find_spec
    monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError, match=r"^--report-to mlflow needs the mlflow package: pip install mlflow$"):
        reporting.check_installed(["tensorboard", "mlflow"])


def test_scalars_are_the_finite_numbers_of_a_record_under_split_slash_name():
    assert reporting.scalars(RECORDS[0]) == {"train/loss": 2.5, "train/kd": 1.0, "train/ce": 4.0, "train/lr": 1e-3}
    assert reporting.scalars({"step": 3, "split": "eval", "ce": float("nan"), "kl_to_teacher": 0.1, "ok": True}) == \
        {"eval/kl_to_teacher": 0.1}


def test_tensorboard_reads_back_the_records_and_a_resume_hides_the_steps_it_redoes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with reporting.open_reporters(["tensorboard"], out=tmp_path, run_id="r1", settings={}) as reporters:
        for record in RECORDS:
            reporters.log(record)
        reporters.log({"step": 3, "split": "train", "loss": 9.0})  # logged, then lost with the process
    with reporting.open_reporters(["tensorboard"], out=tmp_path, run_id="r1", settings={}, resumed_at=2) as reporters:
        reporters.log({"step": 3, "split": "train", "loss": 1.5})  # the resumed run redoes step 3
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/rows")] == [(2, 48.0)]
    assert pytest.approx(events.Scalars("eval/kl_to_teacher")[0].value) == 0.7


def fake_module(monkeypatch, name: str, **attributes) -> list:
    """A stand-in module ``name`` whose functions record their calls in the returned list."""
    calls: list = []
    module = types.ModuleType(name)
    for attribute, result in attributes.items():
        def function(*args, _name=attribute, _result=result, **kwargs):
            calls.append((_name, args, kwargs))
            return _result(calls) if callable(_result) else _result
        setattr(module, attribute, function)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(reporting, "check_installed", lambda names: None)
    return calls


def test_wandb_gets_one_run_per_kdpipe_run_and_the_records_by_step(monkeypatch, tmp_path):
    class Run:
        def log(self, data, step):
            calls.append(("log", (data,), {"step": step}))

        def finish(self):
            calls.append(("finish", (), {}))

    calls = fake_module(monkeypatch, "wandb", init=lambda calls: Run())
    monkeypatch.setenv("WANDB_PROJECT", "distill")
    with reporting.open_reporters(["wandb"], out=tmp_path / "s1", run_id="abc123", settings={"lr": 1e-3}) as reporters:
        for record in RECORDS:
            reporters.log(record)
    init = calls[0]
    assert init[0] == "init" and init[2] == {"project": "distill", "name": "s1", "id": "abc123", "resume": "allow",
                                             "dir": str(tmp_path / "s1"), "config": {"lr": 1e-3}}
    logged = [(kwargs["step"], args[0]) for name, args, kwargs in calls if name == "log"]
    assert logged == [(r["step"], reporting.scalars(r)) for r in RECORDS]
    assert calls[-1][0] == "finish"


def test_mlflow_starts_a_tagged_run_and_a_resume_continues_it(monkeypatch, tmp_path):
    found: list = []
    calls = fake_module(monkeypatch, "mlflow", search_runs=lambda calls: found, start_run=None, log_params=None,
                        log_metrics=None, end_run=None)
    with reporting.open_reporters(["mlflow"], out=tmp_path / "s1", run_id="abc123",
                                  settings={"lr": 1e-3, "schedule": None}) as reporters:
        reporters.log(RECORDS[0])
    names = [name for name, _, _ in calls]
    assert names == ["search_runs", "start_run", "log_params", "log_metrics", "end_run"]
    assert calls[0][2]["filter_string"] == "tags.`kdpipe.run_id` = 'abc123'"
    assert calls[1][2] == {"run_name": "s1", "tags": {"kdpipe.run_id": "abc123"}}
    assert calls[2][1] == ({"lr": "0.001", "schedule": ""},)
    assert calls[3] == ("log_metrics", (reporting.scalars(RECORDS[0]),), {"step": 1})

    calls.clear()
    found.append(types.SimpleNamespace(info=types.SimpleNamespace(run_id="mlflow-run-7")))
    with reporting.open_reporters(["mlflow"], out=tmp_path / "s1", run_id="abc123", settings={"lr": 1e-3}):
        pass
    assert [name for name, _, _ in calls] == ["search_runs", "start_run", "end_run"]  # no parameters again
    assert calls[1][2] == {"run_id": "mlflow-run-7"}
