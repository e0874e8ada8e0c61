"""CUDA paths: capture with fp32 and bf16 teachers, a training run with bf16 autocast."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe import open_cache
from kdpipe.stages.cli import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def capture(teacher, data, out, *extra):
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--device", "cuda",
        "--top-k", "16", "--seq-len", "48", "--limit-rows", "24", "--temperature", "1", "--temperature", "2", *extra,
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return open_cache(out)


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-3), ("bfloat16", 0.1)])
def test_cuda_capture_matches_dense_recomputation(tiny_lm_dir, text_dir, tmp_path, dtype, atol):
    from transformers import AutoModelForCausalLM

    cache = capture(tiny_lm_dir, text_dir, tmp_path / "c", "--dtype", dtype)
    assert cache.manifest["teacher"]["dtype"] == dtype and cache.manifest["device"] != "cpu"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=getattr(torch, dtype)).cuda().eval()
    for i in (0, 23):
        row = cache.read_stored(i, temperature=2.0)
        with torch.no_grad():
            logits = model(torch.from_numpy(row["input_ids"])[None].cuda()).logits[0].float().cpu()
        dense = torch.log_softmax(logits / 2.0, dim=-1).numpy()
        got = row["topk_logprobs"][row["mask"]]
        expected = np.take_along_axis(dense[row["mask"]], row["topk_ids"][row["mask"]], axis=1)
        np.testing.assert_allclose(got, expected, atol=atol)


def test_cuda_training_with_bf16_autocast(tiny_lm_dir, text_dir, tmp_path):
    capture(tiny_lm_dir, text_dir, tmp_path / "c")
    student = tmp_path / "student.json"
    student.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
    }))
    result = CliRunner().invoke(main, [
        "train-student", "--cache", str(tmp_path / "c"), "--student", str(student), "--out", str(tmp_path / "s"),
        "--steps", "5", "--batch-size", "4", "--device", "cuda", "--eval-every", "5",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    assert np.isfinite(run["final_eval_metrics"]["kl_topk_bins"])
