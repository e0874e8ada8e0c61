"""``evaluate --teacher``: the full-vocabulary KL to the teacher run on the evaluated rows (issue 15).

Checked against a dense computation written out here (the teacher's and the student's logits from
Hugging Face, KL in float64), next to the cache's (k+1)-bin KL, which must be a lower bound of it, and
every KL under the name of what it is: ``kl_full``, ``kl_topk_bins``, ``kl_full_estimate``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import kdpipe
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.evaluate.run import evaluate_model
from kdpipe.stages.cli import main

from conftest import VOCAB
from test_evaluate import save_llama_like

SEQ_LEN, ROWS = 48, 6


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def capture(teacher, data, out, *extra):
    result = cli("cache-teacher", "--teacher", teacher, "--data", data, "--out", out, "--temperature", 1.0,
                 "--seq-len", SEQ_LEN, "--limit-rows", ROWS, "--batch-size", 3, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def caches(tiny_lm_dir, text_dir, tmp_path_factory):
    """The tiny teacher's top-16, k = V (float32 values) and sampled (24 draws) caches of the same rows."""
    root = tmp_path_factory.mktemp("teacher_kl")
    return {
        "top16": capture(tiny_lm_dir, text_dir, root / "top16", "--top-k", 16),
        "full": capture(tiny_lm_dir, text_dir, root / "full", "--top-k", VOCAB, "--values", "float32"),
        "sampled": capture(tiny_lm_dir, text_dir, root / "sampled", "--top-k", 0, "--sample", 24),
    }


@pytest.fixture(scope="module")
def student_dir(tiny_lm_dir, tmp_path_factory):
    return save_llama_like(tiny_lm_dir, tmp_path_factory.mktemp("student"), seed=3)


def dense_reference(teacher_dir, student_dir, cache, rows: int) -> dict:
    """KL(p || q) over all V ids and top-1 agreement, from the two models' own logits on the cache's rows."""
    from transformers import AutoModelForCausalLM

    with kdpipe.open_cache(cache) as c:
        read = [c.read(i, temperature=1.0) for i in range(rows)]
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in read])).long()
    mask = torch.from_numpy(np.stack([r["mask"] for r in read]))
    logits = {}
    for name, path in (("teacher", teacher_dir), ("student", student_dir)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=ids, attention_mask=mask.long()).logits.double()[mask]  # [n, V]
    log_p, log_q = logits["teacher"].log_softmax(-1), logits["student"].log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [n]
    agree = logits["teacher"].argmax(-1) == logits["student"].argmax(-1)
    return {"kl_full": float(kl.mean()), "top1_agreement": float(agree.double().mean()), "positions": int(mask.sum())}


def test_full_kl_equals_a_dense_computation_and_bounds_the_topk_bins_kl(tiny_lm_dir, student_dir, caches):
    result = evaluate_model(student_dir, cache=caches["top16"], teacher=tiny_lm_dir, max_rows=4, batch_size=3,
                            device="cpu")
    expected = dense_reference(tiny_lm_dir, student_dir, caches["top16"], rows=4)
    assert result["positions"] == expected["positions"] == 4 * SEQ_LEN
    assert result["kl_full"] == pytest.approx(expected["kl_full"], rel=1e-5)
    assert result["top1_agreement"] == pytest.approx(expected["top1_agreement"])
    # Merging the 284 ids outside the top-16 into one bin can only lose divergence: a lower bound, here well below.
    assert 0 < result["kl_topk_bins"] < result["kl_full"]
    assert result["kl_topk_bins"] < 0.95 * result["kl_full"]
    assert "kl_to_teacher" not in result and "full vocabulary" in result["teacher_view"]


def test_the_teacher_against_itself_has_zero_full_kl(tiny_lm_dir, caches):
    result = evaluate_model(tiny_lm_dir, cache=caches["top16"], teacher=tiny_lm_dir, max_rows=2, device="cpu")
    assert abs(result["kl_full"]) < 1e-6 and result["top1_agreement"] == 1.0


def test_a_k_equals_v_cache_gives_the_full_kl_without_the_teacher(tiny_lm_dir, student_dir, caches):
    from_cache = evaluate_model(student_dir, cache=caches["full"], max_rows=4, device="cpu")
    assert "kl_topk_bins" not in from_cache and "full vocabulary" in from_cache["teacher_view"]
    expected = dense_reference(tiny_lm_dir, student_dir, caches["full"], rows=4)
    assert from_cache["kl_full"] == pytest.approx(expected["kl_full"], rel=1e-4)


def test_a_sampled_cache_reports_an_estimate_of_the_full_kl(tiny_lm_dir, student_dir, caches):
    alone = evaluate_model(student_dir, cache=caches["sampled"], max_rows=4, device="cpu")
    assert "kl_full_estimate" in alone and not {"kl_full", "kl_topk_bins", "top1_agreement"} & set(alone)
    both = evaluate_model(student_dir, cache=caches["sampled"], teacher=tiny_lm_dir, max_rows=4, device="cpu")
    assert both["kl_full_estimate"] == pytest.approx(alone["kl_full_estimate"])
    assert both["kl_full_estimate"] == pytest.approx(both["kl_full"], rel=0.5)  # 24 draws: an estimate, not noise


def test_data_rows_give_the_same_full_kl_as_the_caches_rows(tiny_lm_dir, student_dir, text_dir, caches):
    on_cache = evaluate_model(student_dir, cache=caches["top16"], teacher=tiny_lm_dir, max_rows=4, device="cpu")
    on_data = evaluate_model(student_dir, data=text_dir, seq_len=SEQ_LEN, teacher=tiny_lm_dir, max_rows=4,
                             device="cpu")
    assert on_data["kl_full"] == pytest.approx(on_cache["kl_full"], rel=1e-5)
    assert "kl_topk_bins" not in on_data


def test_cli_json_names_each_kl(tiny_lm_dir, student_dir, caches):
    result = cli("evaluate", "--model", student_dir, "--cache", caches["top16"], "--teacher", tiny_lm_dir,
                 "--max-rows", 2, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {"kl_full", "kl_topk_bins", "top1_agreement", "positions"} <= set(metrics)
    assert metrics["kl_temperature"] == 1.0 and "kl_to_teacher" not in metrics


def test_a_teacher_other_than_the_caches_is_refused_in_one_line(student_dir, caches, tiny_lm_dir):
    result = cli("evaluate", "--model", student_dir, "--cache", caches["top16"], "--teacher", student_dir)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: teacher {student_dir} is not the teacher cache")
    assert f"pass --teacher {tiny_lm_dir}" in result.stderr and "Traceback" not in result.stderr


def test_a_teacher_with_another_tokenizer_is_refused_on_data(tiny_lm_dir, text_dir, tmp_path):
    from transformers import AutoTokenizer

    other = save_llama_like(tiny_lm_dir, tmp_path / "other", seed=4)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match="use different tokenizers"):
        evaluate_model(tiny_lm_dir, data=text_dir, seq_len=SEQ_LEN, teacher=other, max_rows=2, device="cpu")
