"""The causal-LM demo's table (issue 15): an online dense-KD reference row, the full-vocabulary KL for
every row next to the cache's (k+1)-bin lower bound, and each student's CE gap to the online student.
Run on a tiny teacher, student and text (3 steps) so that it checks the mechanics, not the numbers.

The classification demo (issue 28): several seeds, each metric's mean and sd over them, the per-seed KD
gain, and quality numbers that do not depend on torch's thread count; on the real digits and teacher,
reduced to 200 training digits and 20 steps."""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe.pipeline import demo as demolib
from kdpipe.stages.cli import main


@pytest.fixture(scope="module")
def lm_demo(tiny_lm_dir, text_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    text = folder / "text.txt"
    text.write_text((text_dir / "doc0.txt").read_text()[:4000])
    task = demolib.DemoTask(
        teacher=str(tiny_lm_dir), weights=None, train_data=str(text), heldout_data=str(text), student=str(tiny_lm_dir),
        top_k=8, temperatures=(1.0, 2.0), seq_len=32, train=dict(steps=3, warmup=0, eval_every=3, batch_size=4,
                                                                 lr=1e-3, eval_rows=8),
        kd=dict(alpha=0.9, temperature=1.0), online=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(demolib.TASKS, "causal-lm", task)
        result = CliRunner().invoke(main, ["demo", "--device", "cpu", "--out", str(folder / "out")],
                                    prog_name="kdpipe", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result, json.loads((folder / "out" / "results.json").read_text())


def test_every_row_has_the_full_kl_and_the_topk_bins_kl_below_it(lm_demo):
    _, results = lm_demo
    table = results["table"]
    assert list(table) == ["teacher", "kd student", "hard-label student", "online KD student"]
    assert abs(table["teacher"]["kl_full"]) < 1e-6
    for label, row in table.items():
        assert "kl_to_teacher" not in row
        # the (k+1)-bin view is a lower bound, up to the quantized cache values (KL ~1e-4 for the teacher itself)
        assert row["kl_topk_bins"] <= row["kl_full"] + 1e-3, label


def test_each_student_has_its_ce_gap_to_the_online_student(lm_demo):
    table = lm_demo[1]["table"]
    online = table["online KD student"]
    assert online["ce_gap_to_online"] == 0.0
    for label in ("kd student", "hard-label student"):
        assert table[label]["ce_gap_to_online"] == pytest.approx(table[label]["ce"] - online["ce"])
        assert table[label]["ce_gap_to_online_pct"] == pytest.approx(100 * (table[label]["ce"] / online["ce"] - 1))


def test_the_online_student_trained_like_the_cached_one(lm_demo, tmp_path):
    _, results = lm_demo
    out = results["out"]
    runs = {name: json.loads(open(f"{out}/{name}/run.json").read()) for name in ("kd", "online")}
    assert runs["online"]["loss_implementation"].startswith("online dense KD")
    for key in ("seed", "steps", "batch_size", "lr", "alpha", "temperature", "cache"):
        assert runs["online"]["resolved_settings"][key] == runs["kd"]["resolved_settings"][key], key


def test_the_printed_table_carries_the_readme_columns(lm_demo):
    result, _ = lm_demo
    header = next(line for line in result.stdout.splitlines() if line.startswith("model"))
    for title in ("held-out CE", "CE vs online", "KL (k+1)-bin", "KL full vocab", "top-1 agree"):
        assert title in header
    assert "online KD student" in result.stdout and "lower bound of the full KL" in result.stdout
    assert "train online student" in result.stderr and "evaluate online KD student" in result.stderr


# ----------------------------------------------------------------------------- classification: seeds
@pytest.fixture(scope="module")
def digits_task(tmp_path_factory):
    """The classification demo's task, reduced: 200 training digits, 100 held-out ones, 20 steps."""
    folder = tmp_path_factory.mktemp("digits")
    heldout = np.load(demolib.DATA / "mnist" / "heldout.npz")
    np.savez(folder / "heldout-100.npz", x=heldout["x"][:100], y=heldout["y"][:100])
    real = demolib.TASKS["classification"]
    return folder, dataclasses.replace(real, heldout_data=str(folder / "heldout-100.npz"), train_rows=200,
                                       train={**real.train, "steps": 20, "batch_size": 32, "eval_every": 10,
                                              "eval_rows": 100})


def run_digits(task, out, *args) -> tuple:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(demolib.TASKS, "classification", task)
        result = CliRunner().invoke(main, ["demo", "--task", "classification", "--device", "cpu", "--out", str(out),
                                           *args], prog_name="kdpipe", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def digits_demo(digits_task):
    folder, task = digits_task
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as OMP_NUM_THREADS=2 would start the process
    try:
        result, results = run_digits(task, folder / "out", "--seeds", "3")
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return result, results, threads_after


def test_each_seed_trains_both_students_with_its_seed(digits_demo):
    _, results, _ = digits_demo
    assert results["seeds"] == [0, 1, 2] and results["train_rows"] == 200
    for seed in results["seeds"]:
        for name in ("kd", "hard-label"):
            run = json.loads((Path(results["out"]) / f"seed-{seed}" / name / "run.json").read_text())
            assert run["resolved_settings"]["seed"] == seed and run["resolved_settings"]["steps"] == 20
            assert run["resolved_settings"]["alpha"] == (0.0 if name == "hard-label" else results["kd"]["alpha"])
    kd = [results["per_seed"][str(s)]["kd student"]["kl_full"] for s in results["seeds"]]
    assert len(set(kd)) == 3  # three different students, not one trained three times


def test_the_table_is_mean_and_sd_of_the_per_seed_numbers(digits_demo):
    _, results, _ = digits_demo
    table, per_seed = results["table"], results["per_seed"]
    assert list(table) == ["teacher", "kd student", "hard-label student"]
    for label in ("kd student", "hard-label student"):
        for key in ("accuracy", "ece", "kl_full", "macro_f1"):
            values = [per_seed[str(s)][label][key] for s in results["seeds"]]
            assert table[label][key] == pytest.approx(statistics.fmean(values))
            assert table[label][f"{key}_sd"] == pytest.approx(statistics.stdev(values))
    gain = results["accuracy_gain"]
    kd, hard = ([per_seed[str(s)][label]["accuracy"] for s in results["seeds"]]
                for label in ("kd student", "hard-label student"))
    assert gain["per_seed"] == pytest.approx([k - h for k, h in zip(kd, hard)])
    assert gain["mean"] == pytest.approx(statistics.fmean(gain["per_seed"]))
    assert gain["sd"] == pytest.approx(statistics.stdev(gain["per_seed"]))
    spread = max(statistics.stdev(kd), statistics.stdev(hard), 2 * gain["sd"])
    assert gain["exceeds_spread"] == (gain["mean"] > spread)


def test_the_printed_table_has_mean_sd_per_seed_gains_and_the_verdict(digits_demo):
    result, results, _ = digits_demo
    out = result.stdout
    assert "3 seeds x 20 steps per student, 200 training digits" in out
    kd_row = next(line for line in out.splitlines() if line.startswith("kd student") and "±" in line)
    kd = results["table"]["kd student"]
    assert f"{kd['accuracy']:.4f} ± {kd['accuracy_sd']:.4f}" in kd_row
    gain_row = next(line for line in out.splitlines() if line.startswith("KD gain "))
    assert gain_row.split()[2:5] == [f"{100 * g:+.2f}" for g in results["accuracy_gain"]["per_seed"]]
    verdict = "exceeds the spread" if results["accuracy_gain"]["exceeds_spread"] else "does NOT exceed the spread"
    assert verdict in out and "same for any OMP_NUM_THREADS" in out
    assert "train kd student (seed 2)" in result.stderr and "evaluate hard-label student (seed 1)" in result.stderr


def test_quality_numbers_do_not_depend_on_the_thread_count(digits_task, digits_demo):
    """The fixture ran with torch on 2 threads, this run on 1 (as OMP_NUM_THREADS=1 would): the demo trains
    and evaluates on its own single thread, so every quality number is bit for bit the same."""
    folder, task = digits_task
    _, first, threads_after = digits_demo
    assert threads_after == 2  # the demo gave torch its thread count back
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, again = run_digits(task, folder / "again", "--seeds", "3")
    finally:
        torch.set_num_threads(before)
    quality = ("accuracy", "ece", "kl_full", "macro_f1", "top1_agreement")
    for seed in first["seeds"]:
        for label in ("kd student", "hard-label student"):
            rows = (first["per_seed"][str(seed)][label], again["per_seed"][str(seed)][label])
            assert {k: rows[0][k] for k in quality} == {k: rows[1][k] for k in quality}, (seed, label)
    assert first["accuracy_gain"] == again["accuracy_gain"]


def test_seeds_is_refused_for_the_causal_lm_demo(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--seeds", "3", "--out", str(tmp_path / "lm"), "--device", "cpu"],
                                prog_name="kdpipe", catch_exceptions=False)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: --seeds 3: the causal-lm demo trains one seed; leave --seeds out")
