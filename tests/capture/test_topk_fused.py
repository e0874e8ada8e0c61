"""The one-pass sparse view and the head-fused one: exact against a float64 dense recomputation at
every temperature, with ties, bf16, empty tails, tiny tails, masked vocabularies and NaN/inf; and
``Teacher.sparse_view`` (decoder + blocked head) equal to the logits path on real teachers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.pipeline.capture.teachers import Teacher, load_hf_teacher
from kdpipe.pipeline.capture.topk import (
    sparse_view_of_hidden,
    sparse_view_of_logits,
    sparse_view_of_logits_reference,
)

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
DEMO_TEACHER = Path(__file__).resolve().parents[2] / "data" / "teacher"
FIELDS = ("topk_ids", "topk_logits", "logsumexp", "tail_logprob")


def assert_exact(view, logits, temperatures, *, atol=1e-5, tail_rtol=1e-5, logit_err=0.0):
    """``view`` against float64 arithmetic on the same logits ``[N, V]`` (any dtype).

    ``logit_err``: how far the logits the view was made from may be from ``logits`` (a blocked head
    may round a logit differently from the whole matmul)."""
    z = logits.double()
    n, vocab = z.shape
    k = view.topk_ids.shape[1]
    ids = view.topk_ids
    # the top-k set, up to ties: distinct ids holding exactly the k largest values, best first
    assert ids.dtype == torch.int64 and bool(((ids >= 0) & (ids < vocab)).all())
    assert all(len(set(row.tolist())) == k for row in ids)
    chosen = z.gather(1, ids)
    torch.testing.assert_close(chosen, torch.topk(z, k, dim=1).values, atol=2 * logit_err, rtol=0)
    row_max = z.amax(dim=1, keepdim=True)
    torch.testing.assert_close(view.topk_logits.double(), chosen - row_max,
                               atol=1e-6 * (1 + row_max.abs()).max().item() + 2 * logit_err, rtol=0)
    in_top = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
    for j, t in enumerate(temperatures):
        shifted = (z - row_max) / t
        lse = torch.logsumexp(shifted, dim=1)
        torch.testing.assert_close(view.logsumexp[:, j].double(), lse, atol=atol + 2 * logit_err / t, rtol=1e-6)
        logp = shifted - lse[:, None]
        got = view.topk_logits.double() / t - view.logsumexp[:, j : j + 1].double()
        # fp32 storage of z - max z: a unit in the last place of |z - max z|, divided by T
        bound = atol + 4 * logit_err / t + 2.0**-23 * ((chosen - row_max).abs() + lse.abs()[:, None] * t) / t
        error = (got - logp.gather(1, ids)).abs()
        assert bool((error <= bound).all()), float(error.max())
        tail = torch.logsumexp(logp.masked_fill(in_top, float("-inf")), dim=1)  # -inf when k = V
        got_tail = view.tail_logprob[:, j].double()
        finite = torch.isfinite(tail)
        assert torch.equal(torch.isfinite(got_tail), finite), (got_tail, tail)
        # relative precision on the log tail mass: tiny tails keep their digits
        torch.testing.assert_close(got_tail[finite], tail[finite], atol=1e-6 + 4 * logit_err / t, rtol=tail_rtol)


def fp32_rounding(logits: torch.Tensor) -> float:
    """A few units in the last place of the largest fp32 logit."""
    return 4 * 2.0**-24 * float(logits.abs().max())


def lm_logits(n, vocab, *, seed=0, scale=6.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    z[:, :: max(1, vocab // 50)] += 3 * scale  # a few strong candidates, as a trained LM has
    return z.to(dtype)


# ----------------------------------------------------------------------------- materialised logits
@pytest.mark.parametrize("vocab,k", [(500, 20), (3001, 16), (3001, 200), (97, 97), (64, 1)])
def test_logits_view_is_exact_at_every_temperature(vocab, k):
    logits = lm_logits(23, vocab)
    view = sparse_view_of_logits(logits, top_k=k, temperatures=TEMPERATURES)
    assert_exact(view, logits, TEMPERATURES)
    ref = sparse_view_of_logits_reference(logits, top_k=k, temperatures=TEMPERATURES)
    assert torch.equal(view.topk_ids, ref.topk_ids) and torch.equal(view.topk_logits, ref.topk_logits)


def test_logits_view_does_not_depend_on_chunking():
    logits = lm_logits(41, 2000, seed=1)
    one = sparse_view_of_logits(logits, top_k=24, temperatures=TEMPERATURES)
    for chunk_rows in (1, 5, 40):
        many = sparse_view_of_logits(logits, top_k=24, temperatures=TEMPERATURES, chunk_bytes=4 * 2048 * chunk_rows)
        for name in FIELDS:
            assert torch.equal(getattr(one, name), getattr(many, name)), (chunk_rows, name)


def test_k_equal_to_vocab_has_an_empty_tail():
    logits = lm_logits(9, 40)
    view = sparse_view_of_logits(logits, top_k=40, temperatures=TEMPERATURES)
    assert bool((view.tail_logprob == float("-inf")).all())
    assert_exact(view, logits, TEMPERATURES)


@pytest.mark.parametrize("vocab", [300, 4000])  # plain top-k and the group-maxima top-k
def test_ties_give_a_tied_top_k(vocab):
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 6, (17, vocab), generator=g).float()  # every value tied many times
    view = sparse_view_of_logits(logits, top_k=32, temperatures=TEMPERATURES)
    assert_exact(view, logits, TEMPERATURES)


def test_bf16_logits():
    logits = lm_logits(19, 5000, dtype=torch.bfloat16)  # ties too: bf16 keeps 8 bits
    view = sparse_view_of_logits(logits, top_k=50, temperatures=TEMPERATURES)
    assert_exact(view, logits, TEMPERATURES)


def test_huge_logit_ranges_keep_tiny_tails_precise():
    logits = lm_logits(6, 3000, scale=1.0)
    logits[0, :10] = 300.0  # tail ~ exp(-300 / T): far below fp32's smallest normal
    logits[1] = torch.linspace(-5000, 5000, 3000)
    logits[2, 7] = 1e4
    logits[3] *= 1000
    view = sparse_view_of_logits(logits, top_k=10, temperatures=TEMPERATURES)
    assert_exact(view, logits, TEMPERATURES, tail_rtol=2e-6)
    assert float(view.tail_logprob[0, 1]) < -280  # not rounded to -inf, not to 0


def test_masked_vocabulary_with_fewer_finite_logits_than_k():
    logits = lm_logits(8, 2000)
    logits[:, 100:] = float("-inf")
    logits[3, 5:] = float("-inf")  # only 5 finite logits in this row, k = 20
    view = sparse_view_of_logits(logits, top_k=20, temperatures=(1.0, 2.0))
    others = torch.arange(8) != 3
    assert bool((view.topk_ids[others] < 100).all()) and torch.isfinite(view.logsumexp).all()
    assert all(len(set(row.tolist())) == 20 for row in view.topk_ids)  # distinct, -inf ones too
    assert set(view.topk_ids[3, :5].tolist()) == set(range(5)) and bool((view.topk_ids[3] < 2000).all())
    finite = torch.isfinite(logits[:, :100]).all(dim=1)
    assert_exact(view.__class__(*(getattr(view, f)[finite] for f in FIELDS)), logits[finite], (1.0, 2.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("vocab", [50, 4000])
def test_non_finite_logits_name_the_first_bad_position(bad, vocab):
    logits = torch.randn(20, vocab)
    logits[12, 3] = bad
    logits[7, vocab - 1] = bad
    with pytest.raises(FloatingPointError, match="position 7$"):
        sparse_view_of_logits(logits, top_k=4, temperatures=(1.0, 2.0), chunk_bytes=4 * vocab * 3)
    all_minus_inf = torch.randn(5, vocab)
    all_minus_inf[2] = float("-inf")
    with pytest.raises(FloatingPointError, match="position 2$"):
        sparse_view_of_logits(all_minus_inf, top_k=4, temperatures=(1.0,))


def test_top_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="top_k"):
        sparse_view_of_logits(torch.zeros(3, 10), top_k=11, temperatures=(1.0,))


# ----------------------------------------------------------------------------- head-fused
def head(n, hidden, vocab, *, seed=0, dtype=torch.float32, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g) * scale
    w = torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 4
    b = torch.randn(vocab, generator=g) if bias else None
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


@pytest.mark.parametrize("vocab,k,block", [(1000, 16, 64), (1000, 16, 333), (1000, 16, 1000), (1000, 16, 4096),
                                           (5003, 40, 700), (300, 300, 64), (77, 5, 3)])
def test_head_fused_view_is_exact(vocab, k, block):
    h, w, b = head(29, 24, vocab)
    logits = torch.nn.functional.linear(h, w, b)
    view = sparse_view_of_hidden(h, w, b, top_k=k, temperatures=TEMPERATURES, vocab_block=block, chunk_bytes=4 * block * 7)
    assert_exact(view, logits, TEMPERATURES, logit_err=fp32_rounding(logits))
    dense = sparse_view_of_logits(logits, top_k=k, temperatures=TEMPERATURES)
    assert torch.equal(view.topk_ids, dense.topk_ids)
    for name in FIELDS[1:]:  # (a block of F.linear may round a logit differently from the whole)
        torch.testing.assert_close(getattr(view, name), getattr(dense, name), atol=1e-5, rtol=1e-5)


def test_head_fused_bf16_matches_the_bf16_logits():
    h, w, b = head(21, 32, 3000, dtype=torch.bfloat16, seed=3)
    logits = torch.nn.functional.linear(h, w, b)  # bf16, as the teacher's head gives them
    view = sparse_view_of_hidden(h, w, b, top_k=30, temperatures=TEMPERATURES, vocab_block=512)
    assert_exact(view, logits, TEMPERATURES)


def test_head_fused_huge_ranges_and_ties():
    h, w, _ = head(12, 16, 2500, scale=60.0, bias=False)  # logits in the thousands
    h[3] = 0.0  # a row of ties: every logit is 0
    logits = torch.nn.functional.linear(h, w)
    view = sparse_view_of_hidden(h, w, top_k=12, temperatures=TEMPERATURES, vocab_block=256)
    assert_exact(view, logits, TEMPERATURES, tail_rtol=2e-6, logit_err=fp32_rounding(logits))


def test_head_fused_masked_vocabulary():
    h, w, b = head(6, 8, 900, seed=4)
    b[50:] = float("-inf")  # only ids < 50 can be predicted
    view = sparse_view_of_hidden(h, w, b, top_k=60, temperatures=(1.0, 2.0), vocab_block=128)
    assert bool((view.topk_ids[:, :50] < 50).all()) and torch.isfinite(view.logsumexp).all()
    assert all(len(set(row.tolist())) == 60 for row in view.topk_ids)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_head_fused_names_the_first_bad_position(bad):
    h, w, b = head(30, 8, 700)
    h[21, 2] = bad
    h[9, 5] = bad
    with pytest.raises(FloatingPointError, match="position 9$"):
        sparse_view_of_hidden(h, w, b, top_k=5, temperatures=(1.0, 2.0), vocab_block=128, chunk_bytes=4 * 128 * 4)


def test_head_fused_empty_input():
    h, w, b = head(0, 8, 100)
    view = sparse_view_of_hidden(h, w, b, top_k=5, temperatures=(1.0, 2.0))
    assert view.topk_ids.shape == (0, 5) and view.logsumexp.shape == (0, 2)


# ----------------------------------------------------------------------------- Teacher.sparse_view
def assert_same_columns(a, b, *, atol=2e-5):
    assert torch.equal(a.topk_ids, b.topk_ids)
    for name in FIELDS[1:]:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=1e-5)


def tiny_llama(*, vocab=777, tie=False, dtype=torch.float32, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, **extra)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a sharp teacher: real top-k, small tails
    return Teacher(kind="hf", task="causal-lm", vocab_size=vocab, max_positions=64, fingerprint={}, model=model)


def batch(vocab, *, rows=3, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocab, (rows, length), generator=g)
    attention = torch.ones(rows, length, dtype=torch.long)
    attention[1, 17:] = 0  # a padded row
    mask = attention.bool().numpy().copy()
    mask[0, :5] = False  # prompt positions that are not targets
    return inputs, attention, mask


def test_demo_teacher_fused_head_gives_the_same_columns():
    teacher = load_hf_teacher(str(DEMO_TEACHER), device=torch.device("cpu"), dtype=torch.float32)
    inputs, attention, mask = batch(teacher.vocab_size, rows=4, length=64)
    fused = teacher.sparse_view(inputs, attention, mask, top_k=32, temperatures=TEMPERATURES)
    assert teacher.fused_head is True and teacher.fused_head_reason is None
    plain = teacher.sparse_view(inputs, attention, mask, top_k=32, temperatures=TEMPERATURES, fused=False)
    assert teacher.fused_head is False
    assert fused.topk_ids.shape == (int(mask.sum()), 32)
    assert_same_columns(fused, plain)
    logits = teacher.logits(inputs, attention).reshape(-1, teacher.vocab_size)[torch.from_numpy(mask.reshape(-1))]
    assert_exact(fused, logits, TEMPERATURES)


@pytest.mark.parametrize("tie,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_tiny_llama_fused_head_gives_the_same_columns(tie, dtype):
    teacher = tiny_llama(tie=tie, dtype=dtype)
    assert teacher.fused_head_problem() is None
    for seed in (0, 1):  # the first call checks, the second does not
        inputs, attention, mask = batch(teacher.vocab_size, seed=seed)
        fused = teacher.sparse_view(inputs, attention, mask, top_k=16, temperatures=TEMPERATURES)
        assert teacher.fused_head is True
        plain = teacher.sparse_view(inputs, attention, torch.from_numpy(mask), top_k=16, temperatures=TEMPERATURES, fused=False)
        if dtype == torch.float32:
            assert_same_columns(fused, plain)
        else:  # bf16 logits tie: the same values, ids up to ties
            logits = teacher.logits(inputs, attention).reshape(-1, teacher.vocab_size)[torch.from_numpy(mask.reshape(-1))]
            assert_exact(fused, logits, TEMPERATURES)
            assert_exact(plain, logits, TEMPERATURES)


def test_logit_soft_capping_in_the_config_refuses_the_fused_head():
    teacher = tiny_llama()
    teacher.model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in teacher.fused_head_problem()
    inputs, attention, mask = batch(teacher.vocab_size)
    teacher.sparse_view(inputs, attention, mask, top_k=8, temperatures=(1.0,))
    assert teacher.fused_head is False and "final_logit_softcapping" in teacher.fused_head_reason
    from kdpipe.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        teacher.sparse_view(inputs, attention, mask, top_k=8, temperatures=(1.0,), fused=True)


def test_a_forward_that_rescales_the_logits_is_caught_by_the_first_call():
    teacher = tiny_llama()
    model = teacher.model
    forward = model.forward

    def scaled(*args, **kwargs):  # what a Cohere-style logit_scale does, unannounced
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    inputs, attention, mask = batch(teacher.vocab_size)
    empty = teacher.sparse_view(inputs, attention, np.zeros_like(mask), top_k=8, temperatures=(1.0, 2.0))
    assert empty.topk_ids.shape == (0, 8)  # no position to check on: the check waits for one
    first = teacher.sparse_view(inputs, attention, mask, top_k=8, temperatures=(1.0, 2.0))
    assert teacher.fused_head is False and "output head" in teacher.fused_head_reason
    logits = teacher.logits(inputs, attention).reshape(-1, teacher.vocab_size)[torch.from_numpy(mask.reshape(-1))]
    assert_exact(first, logits, (1.0, 2.0))
    teacher.sparse_view(inputs, attention, mask, top_k=8, temperatures=(1.0, 2.0))
    assert teacher.fused_head is False  # and stays off


def test_module_teachers_take_the_logits_path():
    model = torch.nn.Linear(6, 10)
    teacher = Teacher(kind="module", task="classification", vocab_size=10, max_positions=None, fingerprint={}, model=model)
    x = torch.randn(4, 6)
    view = teacher.sparse_view(x, None, np.array([[True], [False], [True], [True]]), top_k=3, temperatures=(1.0,))
    assert teacher.fused_head is False and view.topk_ids.shape == (3, 3)
    assert_exact(view, model(x)[[0, 2, 3]].detach(), (1.0,))


def test_top_k_in_the_ungrouped_last_columns():
    logits = lm_logits(7, 3001)  # g = 13: 230 groups of 13 and 11 columns left over
    logits[:, -6:] += 100.0
    view = sparse_view_of_logits(logits, top_k=16, temperatures=TEMPERATURES)
    assert set(view.topk_ids[0, :6].tolist()) == set(range(2995, 3001))
    assert_exact(view, logits, TEMPERATURES)


@pytest.mark.parametrize("fused", [False, True])
def test_unchecked_views_mark_bad_positions_with_nan(fused):
    h, w, b = head(10, 8, 600)
    h[4, 1] = float("nan")
    logits = torch.nn.functional.linear(h, w, b)
    if fused:
        view = sparse_view_of_hidden(h, w, b, top_k=5, temperatures=(1.0, 2.0), vocab_block=128, check_finite=False)
    else:
        view = sparse_view_of_logits(logits, top_k=5, temperatures=(1.0, 2.0), check_finite=False)
    bad = ~torch.isfinite(view.logsumexp).all(dim=1)
    assert bad.tolist() == [i == 4 for i in range(10)]
    good = ~bad
    assert_exact(view.__class__(*(getattr(view, f)[good] for f in FIELDS)), logits[good], (1.0, 2.0),
                 logit_err=fp32_rounding(logits[good]))
