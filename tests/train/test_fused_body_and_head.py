"""fused_kd.body_and_head / kdpipe.body_and_head: the body and the lm-head of common Hugging Face causal
LMs (tiny random configs, no hub), such that head(body(x)) is the model's own logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import kdpipe
from kdpipe.pipeline.train.fused_kd import body_and_head, output_head

V = 96
SMALL = dict(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
LLAMA_LIKE = dict(SMALL, intermediate_size=32, num_key_value_heads=2)
CONFIGS = {  # architecture: (config class, settings, where transformers keeps the body)
    "gpt2": (transformers.GPT2Config, dict(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                           bos_token_id=0, eos_token_id=0), "transformer"),
    "llama": (transformers.LlamaConfig, LLAMA_LIKE, "model"),
    "gpt-neox": (transformers.GPTNeoXConfig, dict(SMALL, intermediate_size=32), "gpt_neox"),
    "qwen2": (transformers.Qwen2Config, LLAMA_LIKE, "model"),
    "mistral": (transformers.MistralConfig, LLAMA_LIKE, "model"),
    "gemma": (transformers.GemmaConfig, dict(LLAMA_LIKE, num_key_value_heads=1, head_dim=8), "model"),
    "opt": (transformers.OPTConfig, dict(SMALL, ffn_dim=32, word_embed_proj_dim=8, bos_token_id=0, eos_token_id=0,
                                         pad_token_id=1), "model.decoder"),
    "falcon": (transformers.FalconConfig, dict(SMALL, bos_token_id=0, eos_token_id=0), "transformer"),
    "phi": (transformers.PhiConfig, dict(SMALL, intermediate_size=32), "model"),
    "bloom": (transformers.BloomConfig, dict(vocab_size=V, hidden_size=16, n_layer=1, n_head=2), "transformer"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def tiny(name: str) -> torch.nn.Module:
    config_class, settings, _ = CONFIGS[name]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config_class(**settings)).eval()


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0  # a right-padded row
    return {"input_ids": torch.randint(2, V, (2, 10), generator=g), "attention_mask": attention_mask}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_head_of_body_is_the_models_own_logits(name):
    model = tiny(name)
    parts = body_and_head(model)
    assert parts is not None
    where = CONFIGS[name][2]
    assert parts.body is model.get_submodule(where)  # the module transformers' own forward runs
    assert (parts.weight, parts.bias) == output_head(model)
    x = inputs()
    with torch.no_grad():
        hidden = parts.body(**x).last_hidden_state  # [B, P, H]
        logits = model(**x).logits
    torch.testing.assert_close(F.linear(hidden, parts.weight, parts.bias), logits, rtol=1e-5, atol=1e-5)


def test_a_head_the_fused_loss_cannot_take_gives_none():
    settings = dict(LLAMA_LIKE, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    torch.manual_seed(0)
    gemma2 = transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(**settings))
    assert output_head(gemma2) is None and body_and_head(gemma2) is None  # soft-capped logits
    assert body_and_head(torch.nn.Linear(4, 4)) is None  # not a language model


@pytest.mark.parametrize("name", ["gpt2", "gpt-neox"])
def test_fused_loss_through_the_body_equals_the_unfused_loss(name):
    """The docs' fused example with a GPT-2 / GPT-NeoX student (whose body is not ``student.model``)."""
    model = tiny(name)  # eval(): no dropout, so the two forward passes agree
    x = inputs(1)
    n = x["input_ids"].numel()
    g = torch.Generator().manual_seed(2)
    logprobs = torch.log_softmax(torch.randn(n, V, generator=g) * 2, dim=-1)
    top = logprobs.topk(8, dim=-1)
    teacher = {"topk_ids": top.indices, "topk_logprobs": top.values,
               "tail_logprob": torch.logsumexp(logprobs.scatter(1, top.indices, float("-inf")), dim=-1),
               "kd_mask": x["attention_mask"].reshape(-1).bool(), "labels": torch.randint(0, V, (n,), generator=g),
               "ce_mask": x["attention_mask"].reshape(-1).bool()}
    loss_fn = kdpipe.DistillationLoss(alpha=0.5, temperature=2.0)
    body, weight, bias = kdpipe.body_and_head(model)
    fused = loss_fn(teacher, hidden=body(**x).last_hidden_state, head_weight=weight, head_bias=bias)
    unfused = loss_fn(teacher, model(**x).logits)
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(fused[key], unfused[key], rtol=1e-5, atol=1e-6)
