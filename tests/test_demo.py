"""The causal-LM demo's table (issue 15): an online dense-KD reference row, the full-vocabulary KL for
every row next to the cache's (k+1)-bin lower bound, and each student's CE gap to the online student.
Run on a tiny teacher, student and text (3 steps) so that it checks the mechanics, not the numbers."""
from __future__ import annotations

import json

import pytest
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
