"""Tests for kdpipe.pipeline.train.fused_kd: the fused lm-head + sparse KD loss equals the unfused loss on
``hidden @ W.T + b`` in value and gradient, and never makes an ``[N, V]`` tensor."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kdpipe.pipeline.train.fused_kd import default_chunk_rows, fused_linear_distillation_loss, output_head
from kdpipe.pipeline.train.losses import KINDS, distillation_loss
from kdpipe.pipeline.train.targets import TeacherTargets, fold_padded_vocab

N, H, V = 37, 16, 50
TEMPS = (1.0, 2.0, 4.0)
ALPHAS = (0.0, 0.5, 1.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def make_case(seed=0, n=N, h=H, v=V, k=7, temperature=2.0, teacher_vocab=None, scale=0.5):
    """Student inputs (hidden, W, b), teacher targets from a teacher of ``teacher_vocab`` logits, labels, masks."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * scale
    bias = torch.randn(v, generator=g) * 0.1
    tv = teacher_vocab or v
    z = torch.randn(n, tv, generator=g) * 3.0
    logp = F.log_softmax(z / temperature, dim=-1)
    ids = z.topk(k, dim=-1).indices
    top = logp.gather(1, ids)
    tail = torch.full((n,), float("-inf")) if k == tv else torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    kd_mask = torch.rand(n, generator=g) < 0.7
    ce_mask = torch.rand(n, generator=g) < 0.8
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, ids=ids, top=top, tail=tail,
                kd_mask=kd_mask, ce_mask=ce_mask)


def unfused(c, *, bias=True, vocab_size=None, **kw):
    """Reference: the unfused loss on materialised logits; returns (outputs, grads of hidden, W, b)."""
    leaves = [c["hidden"].clone().requires_grad_(True), c["weight"].clone().requires_grad_(True),
              c["bias"].clone().requires_grad_(True)]
    logits = F.linear(leaves[0], leaves[1], leaves[2] if bias else None)
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    out = distillation_loss(logits, c["labels"], c["ids"], c["top"], c["tail"], **kw)
    return out, _grads(out["loss"], leaves if bias else leaves[:2])


def fused(c, *, bias=True, **kw):
    leaves = [c["hidden"].clone().requires_grad_(True), c["weight"].clone().requires_grad_(True),
              c["bias"].clone().requires_grad_(True)]
    out = fused_linear_distillation_loss(leaves[0], leaves[1], c["labels"], c["ids"], c["top"], c["tail"],
                                         head_bias=leaves[2] if bias else None, **kw)
    return out, _grads(out["loss"], leaves if bias else leaves[:2])


def _grads(loss, leaves):
    if loss.grad_fn is None:
        return [torch.zeros_like(t) for t in leaves]
    return list(torch.autograd.grad(loss, leaves, allow_unused=True))


def assert_same(got, want, rtol=1e-5, atol=1e-6):
    (out_f, grads_f), (out_u, grads_u) = got, want
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(out_f[key], out_u[key], rtol=rtol, atol=atol, msg=key)
    for name, gf, gu in zip(("hidden", "weight", "bias"), grads_f, grads_u):
        gu = torch.zeros_like(gf) if gu is None else gu
        scale = max(gu.abs().max().item(), 1e-3)  # gradients compared at the scale of their largest entry
        torch.testing.assert_close(gf, gu, rtol=rtol, atol=atol * scale * 10, msg=name)


@pytest.mark.parametrize("k", [7, V])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("kind", KINDS)
def test_equals_unfused_value_and_grad(kind, temperature, alpha, k):
    seed = 100 * KINDS.index(kind) + 10 * TEMPS.index(temperature) + ALPHAS.index(alpha) + (k == V) * 1000
    c = make_case(seed=seed, k=k, temperature=temperature)
    kw = dict(alpha=alpha, temperature=temperature, kind=kind, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    assert_same(fused(c, chunk_rows=8, **kw), unfused(c, **kw))


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_three_takes_the_cube_of_the_tempered_exponential(kind):
    """KD + CE at T = 3: the CE's exp(x - m) is the KD's exp((x - m) / 3) cubed (fused_draws.untempered_exp)."""
    c = make_case(seed=14, k=6, temperature=3.0)
    kw = dict(alpha=0.5, temperature=3.0, kind=kind, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    assert_same(fused(c, chunk_rows=9, **kw), unfused(c, **kw))


@pytest.mark.parametrize("chunk_rows", [1, 5, 8, 36, 37, 1000, None])
def test_chunk_sizes_including_ones_that_do_not_divide_n(chunk_rows):
    c = make_case(seed=1, k=9, temperature=2.0)
    kw = dict(alpha=0.5, temperature=2.0, kind="js", kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    assert_same(fused(c, chunk_rows=chunk_rows, **kw), unfused(c, **kw))


@pytest.mark.parametrize("kind", KINDS)
def test_no_masks_no_bias_skew_lambda(kind):
    c = make_case(seed=2, k=4, temperature=1.0)
    kw = dict(alpha=0.3, temperature=1.0, kind=kind, skew_lambda=0.4)
    assert_same(fused(c, bias=False, chunk_rows=6, **kw), unfused(c, bias=False, **kw))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_all_false_masks_give_connected_zero_and_zero_grads(alpha):
    c = make_case(seed=3)
    none = torch.zeros(N, dtype=torch.bool)
    out, grads = fused(c, alpha=alpha, temperature=2.0, kd_mask=none, ce_mask=none, chunk_rows=8)
    assert out["loss"].item() == 0.0 and out["kd"].item() == 0.0 and out["ce"].item() == 0.0
    assert out["loss"].requires_grad
    assert all((g == 0).all() for g in grads)
    # only the KD mask empty: the CE part still counts
    kw = dict(alpha=0.5, temperature=2.0, kd_mask=none, ce_mask=c["ce_mask"])
    assert_same(fused(c, chunk_rows=8, **kw), unfused(c, **kw))


@pytest.mark.parametrize("kind", KINDS)
def test_masked_rows_get_exactly_zero_gradient_whatever_they_hold(kind):
    c = make_case(seed=4, k=6)
    kw = dict(alpha=0.5, temperature=2.0, kind=kind, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    ref_out, _ = fused(c, chunk_rows=8, **kw)
    out_rows = ~(c["kd_mask"] | (c["ce_mask"] & (c["labels"] != -100)))
    assert out_rows.any()
    garbage = dict(c, hidden=c["hidden"].clone(), top=c["top"].clone())
    garbage["hidden"][out_rows] = 1e4 * torch.randn(int(out_rows.sum()), H)
    garbage["top"][~c["kd_mask"]] = 0.0  # nonsense teacher rows where KD does not count
    out, (g_hidden, _, _) = fused(garbage, chunk_rows=8, **kw)
    torch.testing.assert_close(out["loss"], ref_out["loss"])
    assert (g_hidden[out_rows] == 0).all() and (g_hidden[~out_rows] != 0).any()
    # KD-only rows (no CE) with masked KD: zero gradient too
    kd_only = dict(kw, alpha=1.0)
    _, (g_hidden, _, _) = fused(garbage, chunk_rows=8, **kd_only)
    assert (g_hidden[~c["kd_mask"]] == 0).all()


def _padded_case(seed, k, *, student_vocab=V, teacher_vocab=V + 10, all_outside_row=True):
    c = make_case(seed=seed, v=student_vocab, k=k, teacher_vocab=teacher_vocab)
    if all_outside_row and k <= teacher_vocab - student_vocab:
        # one row whose whole top-k lies in the padded part of the teacher's vocabulary
        c["ids"][0] = torch.arange(student_vocab, student_vocab + k)
    return c


def _fold_reference(c, **kw):
    """fold_padded_vocab + unfused loss: the behaviour the fused loss must reproduce."""
    leaves = [c["hidden"].clone().requires_grad_(True), c["weight"].clone().requires_grad_(True),
              c["bias"].clone().requires_grad_(True)]
    targets = TeacherTargets(c["ids"], c["top"], c["tail"], c["kd_mask"], c["labels"], c["ce_mask"])
    logits, t = fold_padded_vocab(F.linear(*leaves), targets)
    out = distillation_loss(logits, t.labels, t.topk_ids, t.topk_logprobs, t.tail_logprob,
                            kd_mask=t.kd_mask, ce_mask=t.ce_mask, **kw)
    return out, _grads(out["loss"], leaves)


@pytest.mark.parametrize("k", [3, 12, 55, V + 10])
@pytest.mark.parametrize("kind", KINDS)
def test_padded_vocab_ids_fold_like_fold_padded_vocab(kind, k):
    c = _padded_case(seed=5 + k, k=k)
    assert (c["ids"] >= V).any()
    kw = dict(alpha=0.5, temperature=2.0, kind=kind)
    got = fused(c, chunk_rows=8, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"], **kw)
    assert_same(got, _fold_reference(c, **kw))


def test_vocab_size_uses_the_first_rows_of_the_head():
    c = make_case(seed=6, v=V + 6, k=5, teacher_vocab=V)  # a head of V + 6 rows, of which V are used
    c["labels"] = torch.where(c["labels"] >= V, c["labels"] - 6, c["labels"])
    kw = dict(alpha=0.5, temperature=2.0, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    got = fused(c, chunk_rows=8, vocab_size=V, **kw)
    want = unfused(c, vocab_size=V, **kw)
    assert_same(got, want)
    assert (got[1][1][V:] == 0).all() and (got[1][2][V:] == 0).all()


def test_extreme_logits_are_finite_and_equal_unfused():
    # logits of size ~1e4: the student's tail lies ~exp(-1e4) below its head, where 1 - sum(q_S) is 0
    c = make_case(seed=7, k=5, scale=300.0)
    for kind in KINDS:
        kw = dict(alpha=0.5, temperature=2.0, kind=kind, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
        got = fused(c, chunk_rows=8, **kw)
        assert torch.isfinite(got[0]["loss"]) and all(torch.isfinite(g).all() for g in got[1])
        assert_same(got, unfused(c, **kw), rtol=1e-5, atol=1e-5)


def test_teacher_with_zero_probabilities_at_full_k():
    c = make_case(seed=8, k=V)
    c["top"][:, -5:] = float("-inf")  # p = 0 on some ids (a teacher logit of -inf)
    for kind in ("forward-kl", "js", "tvd", "skew-kl"):
        kw = dict(alpha=0.5, temperature=1.0, kind=kind, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
        got = fused(c, chunk_rows=8, **kw)
        assert all(not torch.isnan(g).any() for g in got[1])
        assert_same(got, unfused(c, **kw))


def test_grad_output_scales_and_frozen_inputs():
    c = make_case(seed=9)
    kw = dict(alpha=0.5, temperature=2.0, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    leaves = [c["hidden"].clone().requires_grad_(True), c["weight"].clone().requires_grad_(True)]
    out = fused_linear_distillation_loss(leaves[0], leaves[1], c["labels"], c["ids"], c["top"], c["tail"], **kw)
    (3.0 * out["loss"]).backward()
    _, want = unfused(c, bias=False, **kw)
    torch.testing.assert_close(leaves[0].grad, 3.0 * want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaves[1].grad, 3.0 * want[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):
        out["loss"].backward()  # one backward pass per forward
    # a frozen head: only the hidden states get a gradient
    h = c["hidden"].clone().requires_grad_(True)
    out = fused_linear_distillation_loss(h, c["weight"], c["labels"], c["ids"], c["top"], c["tail"], **kw)
    out["loss"].backward()
    torch.testing.assert_close(h.grad, want[0], rtol=1e-5, atol=1e-6)
    assert not out["kd"].requires_grad and not out["ce"].requires_grad


def test_under_no_grad_values_only():
    c = make_case(seed=14, k=6)
    kw = dict(alpha=0.5, temperature=2.0, kind="reverse-kl", kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    h, w = c["hidden"].clone().requires_grad_(True), c["weight"].clone().requires_grad_(True)
    with torch.no_grad():
        out = fused_linear_distillation_loss(h, w, c["labels"], c["ids"], c["top"], c["tail"], **kw)
    assert out["loss"].grad_fn is None
    want, _ = unfused(c, bias=False, **kw)
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(out[key], want[key].detach(), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_close_to_fp32_and_to_unfused_autocast():
    c = make_case(seed=10, n=64, h=32, v=300, k=10)
    kw = dict(alpha=0.5, temperature=2.0, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    fp32 = unfused(c, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(c, chunk_rows=16, **kw)
        ref = unfused(c, **kw)
    assert got[0]["loss"].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got[1])
    # the same bf16 logits: the same value
    torch.testing.assert_close(got[0]["loss"], ref[0]["loss"], rtol=1e-5, atol=1e-6)
    for g, u, f in zip(got[1], ref[1], fp32[1]):
        assert ((g - f).norm() / f.norm()).item() < 2e-2
        assert ((g - u).norm() / u.norm()).item() < 2e-2
    torch.testing.assert_close(got[0]["loss"], fp32[0]["loss"], rtol=2e-2, atol=1e-3)


def test_bf16_inputs_without_autocast():
    c = make_case(seed=11, k=5)
    kw = dict(alpha=0.5, temperature=2.0)
    h = c["hidden"].bfloat16().requires_grad_(True)
    w = c["weight"].bfloat16().requires_grad_(True)
    out = fused_linear_distillation_loss(h, w, c["labels"], c["ids"], c["top"], c["tail"], **kw)
    out["loss"].backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    want, grads = unfused(c, bias=False, **kw)
    torch.testing.assert_close(out["loss"], want["loss"], rtol=3e-2, atol=1e-2)
    assert ((h.grad.float() - grads[0]).norm() / grads[0].norm()).item() < 3e-2


def test_no_tensor_of_n_by_v_is_ever_made():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    n, v, chunk = 64, 4096, 16
    c = make_case(seed=12, n=n, v=v, k=8)
    for alpha, temperature in ((0.5, 2.0), (0.5, 1.0), (0.0, 1.0), (1.0, 3.0)):
        Largest.biggest = 0
        with Largest():
            fused(c, chunk_rows=chunk, alpha=alpha, temperature=temperature, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
        assert Largest.biggest <= chunk * v, (alpha, temperature, Largest.biggest)


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from kdpipe.pipeline.train.fused_kd import fused_linear_distillation_loss
    torch.set_num_threads(1)
    n, h, v, k = 2048, 8, 131072, 16
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(4)]).repeat(n // 4, 1)  # distinct per row
    top = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = fused_linear_distillation_loss(hidden, weight, labels, ids, top[:, :k], top[:, k],
                                         alpha=0.5, temperature=2.0, chunk_rows=32)
    out["loss"].backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": after - before, "nv_bytes": 4 * n * v, "loss": out["loss"].item()}))
""")


def test_peak_rss_stays_far_below_one_n_by_v_tensor():
    # [N, V] fp32 would be 1 GiB; two [32, V] chunk buffers are 32 MiB
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["nv_bytes"] >= 2**30
    assert report["growth"] < 0.15 * report["nv_bytes"], report


def test_default_chunk_rows_and_output_head():
    assert default_chunk_rows(151_936) == 220
    assert default_chunk_rows(10) >= 1

    class LM(torch.nn.Module):
        def __init__(self, config=None):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 10, bias=False)
            self.config = config

        def get_output_embeddings(self):
            return self.lm_head

    model = LM()
    weight, bias = output_head(model)
    assert weight is model.lm_head.weight and bias is None
    assert output_head(torch.nn.Linear(3, 3)) is None  # no get_output_embeddings
    assert output_head(LM(type("C", (), {"final_logit_softcapping": 30.0})())) is None
    assert output_head(LM(type("C", (), {"logit_scale": 0.0625})())) is None


def test_bad_arguments_raise():
    c = make_case(seed=13)
    args = (c["hidden"], c["weight"], c["labels"], c["ids"], c["top"], c["tail"])
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        fused_linear_distillation_loss(c["hidden"][None], *args[1:], alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="head_weight"):
        fused_linear_distillation_loss(c["hidden"], c["weight"][:, :3], *args[2:], alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="alpha"):
        fused_linear_distillation_loss(*args, alpha=2.0, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_distillation_loss(*args, alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="forward-kl"):
        fused_linear_distillation_loss(*args, alpha=0.5, temperature=1.0, kind="kl")
    with pytest.raises(ValueError, match="labels.*outside"):
        bad = c["labels"].clone()
        bad[1] = V
        fused_linear_distillation_loss(c["hidden"], c["weight"], bad, *args[3:], alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_distillation_loss(*args, alpha=0.5, temperature=1.0, vocab_size=V + 1)
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_distillation_loss(*args, alpha=0.5, temperature=1.0, chunk_rows=0)
    with pytest.raises(ValueError, match="bool"):
        fused_linear_distillation_loss(*args, alpha=0.5, temperature=1.0, kd_mask=torch.ones(N))
    with pytest.raises(ValueError, match="same shape as topk_ids"):
        fused_linear_distillation_loss(*args[:4], c["top"][:, :3], c["tail"], alpha=0.5, temperature=1.0)
    # unused targets may be None
    out = fused_linear_distillation_loss(c["hidden"], c["weight"], c["labels"], None, None, None, alpha=0.0, temperature=1.0)
    torch.testing.assert_close(out["loss"], F.cross_entropy(c["hidden"] @ c["weight"].T, c["labels"], ignore_index=-100))
