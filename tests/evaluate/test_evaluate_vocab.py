"""evaluate scores a student whose head is larger than the teacher's vocabulary (a padded head) as
training does: its logits are cut to the teacher's V_t columns before any softmax, whether V_t comes
from the cache, the teacher run on the rows or the run's ``run.json``. Before, the extra columns
counted in the student's normaliser: a padded student's CE and KL were silently worse than the model
training optimised."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from kdpipe.pipeline.evaluate.run import evaluate_model
from kdpipe.stages.cli import main

V, PAD = 300, 64  # the tiny teacher's vocabulary (tests/conftest.py); the student's extra rows
STUDENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "vocab_size": V + PAD,
}
QUALITY = ("ce", "kl_topk_bins", "top1_agreement", "ece")


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def padded_run(tiny_lm_dir, text_dir, tmp_path_factory):
    """A cache of the tiny teacher, a V + 64-row student trained on it, and the same student with its
    head (and embeddings: input ids are < V) cut to the teacher's V rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("padded")
    cache = root / "cache"
    cli("cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", cache, "--top-k", 16,
        "--temperature", 1.0, "--seq-len", 48, "--limit-rows", 12, "--batch-size", 4)
    student = root / "student.json"
    student.write_text(json.dumps(STUDENT))
    run = root / "run"
    cli("train-student", "--cache", cache, "--student", student, "--tokenizer", tiny_lm_dir, "--out", run,
        "--steps", 3, "--batch-size", 4, "--eval-every", 0, "--device", "cpu")
    assert json.loads((run / "run.json").read_text())["teacher_vocab_size"] == V
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    with torch.no_grad():  # random logits far above the trained ones on the extra rows: they would dominate
        model.get_output_embeddings().weight[V:] = model.get_output_embeddings().weight[:V].abs().max() * 5
    model.save_pretrained(run / "model", safe_serialization=True)
    cut = root / "cut"
    model.resize_token_embeddings(V)
    model.save_pretrained(cut, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(cut)
    return cache, run, cut


def test_against_the_cache_the_padded_student_scores_as_its_first_v_columns(padded_run):
    cache, run, cut = padded_run
    padded, reference = evaluate_model(run, cache=cache), evaluate_model(cut, cache=cache)
    for key in QUALITY:
        assert padded[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key


def test_on_data_the_run_json_gives_the_teacher_vocabulary(padded_run, text_dir):
    _, run, cut = padded_run
    padded, reference = (evaluate_model(m, data=text_dir, max_rows=6, seq_len=48) for m in (run, cut))
    assert padded["tokens"] == reference["tokens"]
    for key in ("ce", "accuracy", "ece"):
        assert padded[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key


def test_with_the_teacher_run_on_the_rows(padded_run, text_dir, tiny_lm_dir, tmp_path):
    _, run, cut = padded_run
    alone = tmp_path / "model"  # the model without its run.json: V_t comes from the teacher
    shutil.copytree(run / "model", alone)
    padded = evaluate_model(alone, data=text_dir, teacher=tiny_lm_dir, max_rows=6, seq_len=48)
    reference = evaluate_model(cut, data=text_dir, teacher=tiny_lm_dir, max_rows=6, seq_len=48)
    for key in ("ce", "kl_full", "top1_agreement"):
        assert padded[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key
