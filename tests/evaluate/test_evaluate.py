"""Tests for kdpipe.pipeline.evaluate.run, kdpipe.pipeline.evaluate.plots and the ``evaluate``/``plot`` stages.

The end-to-end checks: a teacher evaluated against its own cache agrees with it exactly
(top-1 agreement 1, KL ~ 0), and its hard-label numbers equal Hugging Face's own loss; with
``--teacher`` the full-vocabulary KL equals a dense computation on the teacher's and student's own
logits, and the cache's (k+1)-bin KL stays below it (a lower bound), each under its own name.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe.pipeline import data as datalib
from kdpipe.pipeline.errors import ConfigError, DataError
from kdpipe.pipeline.evaluate.run import evaluate_model
from kdpipe.pipeline.evaluate.plots import plot_training_curves
from kdpipe.stages.cli import main
from kdpipe.stages.evaluate import plot

SEQ_LEN, ROWS = 48, 12


def cli(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def capture(teacher, data, out, *extra):
    result = cli(main, "cache-teacher", "--teacher", teacher, "--data", data, "--out", out,
                 "--temperature", 1.0, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def lm_cache(tiny_lm_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_lm_cache") / "cache"
    return capture(tiny_lm_dir, text_dir, out, "--top-k", 16, "--seq-len", SEQ_LEN, "--limit-rows", ROWS,
                   "--batch-size", 4)


def save_llama_like(teacher_dir, out, *, seed, **overrides):
    """A random Llama with the teacher's config (plus overrides) and the teacher's tokenizer files."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(teacher_dir)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def other_lm_dir(tiny_lm_dir, tmp_path_factory):
    return save_llama_like(tiny_lm_dir, tmp_path_factory.mktemp("other_lm"), seed=1)


# ----------------------------------------------------------------------------- causal LM
def test_teacher_against_its_own_cache_agrees_exactly(tiny_lm_dir, lm_cache):
    result = evaluate_model(tiny_lm_dir, cache=lm_cache, batch_size=5)
    assert result["evaluated_on"] == "cache" and result["rows"] == ROWS
    assert result["top1_agreement"] == 1.0
    assert abs(result["kl_topk_bins"]) < 1e-3  # 0 up to the cache's value rounding
    assert "kl_full" not in result and "kl_to_teacher" not in result  # top-16 of 300: only the lower bound
    assert result["perplexity"] == pytest.approx(math.exp(result["ce"]))
    assert result["tokens_per_s"] > 0


def test_another_model_disagrees_with_the_cache(other_lm_dir, lm_cache):
    result = evaluate_model(other_lm_dir, cache=lm_cache)
    assert result["kl_topk_bins"] > 0.1
    assert result["top1_agreement"] < 0.5


def test_data_ce_equals_hugging_face_loss(tiny_lm_dir, text_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = evaluate_model(tiny_lm_dir, data=text_dir, seq_len=SEQ_LEN, max_rows=4, batch_size=3)
    spec = datalib.PackingSpec("causal-lm", SEQ_LEN, AutoTokenizer.from_pretrained(tiny_lm_dir))
    rows = datalib.pack(spec, list(datalib.data_documents(datalib.resolve_source(text_dir), datalib.Fields()))).rows
    ids = torch.from_numpy(rows.inputs[:4])  # full rows: every position is real text
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss  # mean next-token CE over 4 * (L - 1) tokens
    assert result["tokens"] == 4 * (SEQ_LEN - 1)
    assert result["ce"] == pytest.approx(float(expected), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["ce"]))
    assert not {"kl_full", "kl_topk_bins", "kl_full_estimate", "kl_to_teacher"} & set(result)


def test_cache_rows_and_data_rows_score_the_same(tiny_lm_dir, text_dir, lm_cache):
    on_data = evaluate_model(tiny_lm_dir, data=text_dir, seq_len=SEQ_LEN, max_rows=ROWS)
    on_cache = evaluate_model(tiny_lm_dir, cache=lm_cache, data=text_dir)  # inputs from data, hash-checked
    assert on_cache["ce"] == pytest.approx(on_data["ce"], rel=1e-5)
    assert on_cache["tokens"] == on_data["tokens"]


def test_data_other_than_the_caches_is_refused_naming_the_row(tiny_lm_dir, lm_cache, tmp_path):
    (tmp_path / "other.txt").write_text("Not the text the cache was made from. " * 400)
    with pytest.raises(DataError, match="cache row 0 .*pass the data the cache was made from"):
        evaluate_model(tiny_lm_dir, cache=lm_cache, data=tmp_path / "other.txt")


def test_a_different_tokenizer_is_refused(tiny_lm_dir, lm_cache, tmp_path):
    from transformers import AutoTokenizer

    model_dir = shutil.copytree(tiny_lm_dir, tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(ConfigError, match="differs from the cache.s.*must use the teacher.s tokenizer"):
        evaluate_model(model_dir, cache=lm_cache)


def test_a_student_vocabulary_smaller_than_the_teachers_is_refused(tiny_lm_dir, lm_cache, tmp_path):
    small = save_llama_like(tiny_lm_dir, tmp_path / "small", seed=2, vocab_size=100)
    with pytest.raises(ConfigError, match="model has only 100 outputs"):
        evaluate_model(small, cache=lm_cache)


def test_nothing_to_evaluate_on_is_refused(tiny_lm_dir):
    with pytest.raises(ConfigError, match="pass --data, --cache, or both"):
        evaluate_model(tiny_lm_dir)


# ----------------------------------------------------------------------------- CLI
def test_cli_json_is_valid_and_matches_the_library(tiny_lm_dir, lm_cache):
    result = cli(main, "evaluate", "--model", tiny_lm_dir, "--cache", lm_cache, "--max-rows", 4, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["rows"] == 4 and metrics["top1_agreement"] == 1.0
    assert set(metrics) >= {"ce", "perplexity", "tokens", "kl_topk_bins", "ece", "tokens_per_s"}
    assert "lower bound" in metrics["teacher_view"] and "kl_to_teacher" not in metrics


def test_cli_human_output_and_one_line_errors(tiny_lm_dir, lm_cache):
    result = cli(main, "evaluate", "--model", tiny_lm_dir, "--cache", lm_cache, "--max-rows", 2)
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert lines["top1_agreement"].strip() == "1" and "lower bound of the full KL" in lines["kl_topk_bins"]
    failed = cli(main, "evaluate", "--model", tiny_lm_dir)
    assert failed.exit_code == 2 and failed.stderr.strip().startswith("error: nothing to evaluate on")


# ----------------------------------------------------------------------------- module classifier
@pytest.fixture(scope="module")
def module_dir(module_teacher, tmp_path_factory):
    """A train-student style module dir: kdpipe_module.json naming a .py file inside it + weights."""
    folder = tmp_path_factory.mktemp("module_student")
    spec_file = module_teacher["spec"].rpartition(":")[0]
    shutil.copy(spec_file, folder / "tiny_models.py")
    shutil.copy(module_teacher["weights"], folder / "model.safetensors")
    (folder / "kdpipe_module.json").write_text(json.dumps({"factory": "tiny_models.py:tiny_cnn"}))
    return folder


def direct_predictions(module_teacher):
    from safetensors.torch import load_file

    model = module_teacher["build"]()
    model.load_state_dict(load_file(str(module_teacher["weights"])))
    rows = datalib.rows_from_arrays(module_teacher["data"])
    with torch.no_grad():
        return model(torch.from_numpy(rows.inputs)).argmax(-1).numpy(), rows.labels


def test_module_dir_accuracy_and_macro_f1_on_npz(module_dir, module_teacher):
    result = evaluate_model(module_dir, data=module_teacher["data"], batch_size=16)
    pred, labels = direct_predictions(module_teacher)
    assert result["task"] == "classification" and result["rows"] == len(labels)
    assert result["accuracy"] == pytest.approx(float((pred == labels).mean()))
    per_class = []
    for c in np.union1d(pred, labels):
        tp, fp, fn = ((pred == c) & (labels == c)).sum(), ((pred == c) & (labels != c)).sum(), ((pred != c) & (labels == c)).sum()
        per_class.append(2 * tp / (2 * tp + fp + fn))
    assert result["macro_f1"] == pytest.approx(float(np.mean(per_class)))
    assert 0.0 <= result["ece"] <= 1.0 and "tokens_per_s" not in result


def test_module_against_its_own_cache(module_dir, module_teacher, tmp_path):
    cache = capture(module_teacher["spec"], module_teacher["data"], tmp_path / "cache",
                    "--weights", module_teacher["weights"], "--top-k", 4)
    result = evaluate_model(module_dir, cache=cache, data=module_teacher["data"])
    assert result["top1_agreement"] == 1.0 and abs(result["kl_topk_bins"]) < 1e-3
    with pytest.raises(ConfigError, match="pass --data"):
        evaluate_model(module_dir, cache=cache)
    with np.load(module_teacher["data"]) as npz:  # the same labels, but other images
        np.savez(tmp_path / "shuffled.npz", x=npz["x"][::-1], y=npz["y"])
    with pytest.raises(DataError, match=r"cache row 0 \(sample 0\)"):
        evaluate_model(module_dir, cache=cache, data=tmp_path / "shuffled.npz")


def test_a_damaged_module_dir_is_refused_naming_what_it_needs(module_dir, module_teacher, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(module_dir, broken)
    (broken / "kdpipe_module.json").write_text('{"factory_spec": "tiny_models.py:tiny_cnn"}')
    with pytest.raises(ConfigError, match=r'must be JSON like \{"factory": "package.module:factory"\}'):
        evaluate_model(broken, data=module_teacher["data"])
    (broken / "kdpipe_module.json").write_text(json.dumps({"factory": "tiny_models.py:tiny_cnn"}))
    (broken / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has no model.safetensors; it must hold the trained weights"):
        evaluate_model(broken, data=module_teacher["data"])


# ----------------------------------------------------------------------------- plots
def write_metrics(path, *, scale=1.0):
    records = [{"step": s, "split": "train", "loss": scale / s, "kd": 0.5 / s, "ce": 2.0 / s, "lr": 1e-3,
                "tokens_per_s": 1000.0} for s in range(1, 21)]
    records += [{"step": s, "split": "eval", "loss": scale * 1.1 / s, "kl_to_teacher": 0.3 / s, "ce": 2.2 / s}
                for s in (5, 10, 20)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plot_writes_a_png(tmp_path):
    runs = {"a": write_metrics(tmp_path / "a" / "metrics.jsonl"), "b": write_metrics(tmp_path / "b" / "metrics.jsonl", scale=2)}
    out = plot_training_curves(runs, tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert not list(out.parent.glob("*.tmp"))


def test_plot_command_takes_run_dirs(tmp_path):
    write_metrics(tmp_path / "run1" / "metrics.jsonl")
    result = cli(plot, tmp_path / "run1", "--out", tmp_path / "c.png", "--key", "kd")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").stat().st_size > 0
    failed = cli(plot, tmp_path / "run1", "--out", tmp_path / "d.png", "--key", "nope")
    assert failed.exit_code == 2 and "none of nope appear" in failed.stderr
