"""Tests for kdpipe.pipeline.train.losses: sparse (top-k + tail) KD losses against the dense reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdpipe.pipeline.train.losses import (
    KINDS,
    TAIL_LOGPROB_FLOOR,
    dense_kd_loss,
    distillation_loss,
    hard_label_ce,
    sparse_kd_loss,
    student_bin_logprobs,
)

N, V = 12, 50
TEMPS = (1.0, 2.0, 4.0)


def make_logits(seed=0, n=N, v=V, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * scale
    s = torch.randn(n, v, generator=g) * scale
    return z, s


def cache_view(z, k, temperature):
    """What the cache stores: top-k ids of z, exact log p_T there, exact log tail mass (-inf at k=V)."""
    logp = F.log_softmax(z / temperature, dim=-1)
    ids = z.topk(k, dim=-1).indices
    top = logp.gather(1, ids)
    if k == z.shape[1]:
        tail = torch.full((z.shape[0],), float("-inf"))
    else:
        tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)
    return ids, top, tail


def sparse_and_grad(s, z, k, temperature, kind, **kw):
    s = s.clone().requires_grad_(True)
    loss = sparse_kd_loss(s, *cache_view(z, k, temperature), temperature=temperature, kind=kind, **kw)
    (g,) = torch.autograd.grad(loss, s)
    return loss, g


def dense_and_grad(s, z, temperature, kind, **kw):
    s = s.clone().requires_grad_(True)
    loss = dense_kd_loss(s, z, temperature=temperature, kind=kind, **kw)
    (g,) = torch.autograd.grad(loss, s)
    return loss, g


@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("kind", KINDS)
def test_full_k_equals_dense_value_and_grad(kind, temperature):
    z, s = make_logits(seed=1)
    ls, gs = sparse_and_grad(s, z, V, temperature, kind)
    ld, gd = dense_and_grad(s, z, temperature, kind)
    assert torch.isfinite(ls) and torch.isfinite(gs).all()
    torch.testing.assert_close(ls, ld, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gs, gd, atol=1e-5, rtol=1e-5)


def test_full_k_with_shuffled_ids_still_exact():
    z, s = make_logits(seed=2)
    ids, top, tail = cache_view(z, V, 2.0)
    perm = torch.randperm(V)
    got = sparse_kd_loss(s, ids[:, perm], top[:, perm], tail, temperature=2.0, kind="reverse-kl")
    torch.testing.assert_close(got, dense_kd_loss(s, z, temperature=2.0, kind="reverse-kl"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("k", [1, 5, 20, 49])
def test_partial_k_forward_kl_is_positive_lower_bound(k, temperature):
    z, s = make_logits(seed=3)
    sparse = sparse_kd_loss(s, *cache_view(z, k, temperature), temperature=temperature)
    dense = dense_kd_loss(s, z, temperature=temperature)
    assert 0.0 < sparse.item() <= dense.item() + 1e-6


def test_lower_bound_is_monotone_in_k():
    z, s = make_logits(seed=4)
    vals = [sparse_kd_loss(s, *cache_view(z, k, 2.0), temperature=2.0).item() for k in (1, 4, 16, 32, V)]
    assert all(a <= b + 1e-6 for a, b in zip(vals, vals[1:]))


def test_student_tail_matches_float64_reference():
    z, s = make_logits(seed=5)
    ids, _, _ = cache_view(z, 7, 3.0)
    got = student_bin_logprobs(s, ids, 3.0)
    logq = F.log_softmax(s.double() / 3.0, dim=-1)
    want_tail = torch.log1p(-logq.gather(1, ids).exp().sum(-1))
    torch.testing.assert_close(got[:, :-1].double(), logq.gather(1, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, -1].double(), want_tail, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [3, V])
@pytest.mark.parametrize("kind", KINDS)
def test_huge_student_logits_are_stable(kind, k):
    z, _ = make_logits(seed=6)
    g = torch.Generator().manual_seed(7)
    s = torch.where(torch.rand(N, V, generator=g) < 0.5, -1e4, 1e4) * torch.rand(N, V, generator=g)
    for temperature in TEMPS:
        loss, grad = sparse_and_grad(s, z, k, temperature, kind)
        assert torch.isfinite(loss), (kind, k, temperature)
        assert torch.isfinite(grad).all(), (kind, k, temperature)


def test_student_tail_far_below_head_is_finite():
    # Tail mass ~exp(-2e4): 1 - sum(q_S) would round to 0 in fp32; the log-space tail must not.
    z, _ = make_logits(seed=8)
    ids, _, _ = cache_view(z, 4, 1.0)
    s = torch.full((N, V), -1e4).scatter(1, ids, 1e4)
    out = student_bin_logprobs(s, ids, 1.0)
    assert torch.isfinite(out).all() and (out[:, -1] < -1e4).all()


def test_reverse_kl_floors_an_empty_teacher_tail():
    z, s = make_logits(seed=9)
    ids, top, _ = cache_view(z, 10, 1.0)
    tail = torch.full((N,), float("-inf"))  # cache rounded the tail to zero
    s = s.clone().requires_grad_(True)
    loss = sparse_kd_loss(s, ids, top, tail, temperature=1.0, kind="reverse-kl")
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    floored = sparse_kd_loss(s, ids, top, torch.full((N,), TAIL_LOGPROB_FLOOR), temperature=1.0, kind="reverse-kl")
    torch.testing.assert_close(loss, floored)
    # forward KL simply ignores a p = 0 bin
    fwd = sparse_kd_loss(s, ids, top, tail, temperature=1.0, kind="forward-kl")
    assert torch.isfinite(fwd)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_excludes_positions(kind):
    z, s = make_logits(seed=10)
    ids, top, tail = cache_view(z, 6, 2.0)
    mask = torch.arange(N) % 3 != 0
    s1 = s.clone().requires_grad_(True)
    loss = sparse_kd_loss(s1, ids, top, tail, temperature=2.0, kind=kind, mask=mask)
    (g,) = torch.autograd.grad(loss, s1)
    sub = sparse_kd_loss(s[mask], ids[mask], top[mask], tail[mask], temperature=2.0, kind=kind)
    torch.testing.assert_close(loss, sub)
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()
    # garbage in masked-out rows changes nothing
    s2, top2 = s.clone(), top.clone()
    s2[~mask] = 1e4 * torch.randn_like(s2[~mask])
    top2[~mask] = 0.0
    again = sparse_kd_loss(s2, ids, top2, tail, temperature=2.0, kind=kind, mask=mask)
    torch.testing.assert_close(again, loss)
    dense = dense_kd_loss(s, z, temperature=2.0, kind=kind, mask=mask)
    torch.testing.assert_close(dense, dense_kd_loss(s[mask], z[mask], temperature=2.0, kind=kind))


@pytest.mark.parametrize("kind", KINDS)
def test_all_false_mask_gives_connected_zero(kind):
    z, s = make_logits(seed=11)
    s = s.clone().requires_grad_(True)
    mask = torch.zeros(N, dtype=torch.bool)
    for loss in (sparse_kd_loss(s, *cache_view(z, 5, 2.0), temperature=2.0, kind=kind, mask=mask),
                 dense_kd_loss(s, z, temperature=2.0, kind=kind, mask=mask)):
        assert loss.item() == 0.0 and loss.grad_fn is not None
        (g,) = torch.autograd.grad(loss, s)
        assert (g == 0).all()


def test_temperature_squared_scaling_explicit_formula():
    z, s = make_logits(seed=12)
    T, k = 2.0, 8
    ids, top, tail = cache_view(z, k, T)
    p = F.softmax(z.double() / T, -1)
    q = F.softmax(s.double() / T, -1)
    p_bins = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(-1, keepdim=True)], -1)
    q_bins = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(-1, keepdim=True)], -1)
    want_sparse = T**2 * (p_bins * (p_bins.log() - q_bins.log())).sum(-1).mean()
    want_dense = T**2 * (p * (p.log() - q.log())).sum(-1).mean()
    got_sparse = sparse_kd_loss(s, ids, top, tail, temperature=T)
    torch.testing.assert_close(got_sparse.double(), want_sparse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_kd_loss(s, z, temperature=T).double(), want_dense, atol=1e-5, rtol=1e-5)


def test_other_kinds_explicit_formulas():
    z, s = make_logits(seed=13)
    T, lam = 1.5, 0.3
    p, q = F.softmax(z.double() / T, -1), F.softmax(s.double() / T, -1)
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    want = {"js": 0.5 * kl(p, m) + 0.5 * kl(q, m), "tvd": 0.5 * (p - q).abs().sum(-1),
            "skew-kl": kl(p, lam * p + (1 - lam) * q), "reverse-kl": kl(q, p)}
    for kind, per_pos in want.items():
        got = dense_kd_loss(s, z, temperature=T, kind=kind, skew_lambda=lam)
        torch.testing.assert_close(got.double(), T**2 * per_pos.mean(), atol=1e-5, rtol=1e-5)


def test_low_precision_input_is_not_modified():
    z, s = make_logits(seed=14)
    for dtype in (torch.float32, torch.bfloat16):
        x = s.to(dtype)
        before = x.clone()
        loss = sparse_kd_loss(x, *cache_view(z, 5, 2.0), temperature=2.0)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.equal(x, before)


def test_hard_label_ce_matches_cross_entropy():
    _, s = make_logits(seed=15)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hard_label_ce(s, labels), F.cross_entropy(s, labels))
    labels[:3] = -100
    mask = torch.ones(N, dtype=torch.bool)
    mask[-2:] = False
    got = hard_label_ce(s, labels, mask=mask)
    torch.testing.assert_close(got, F.cross_entropy(s[3:-2], labels[3:-2]))
    s = s.clone().requires_grad_(True)
    none = hard_label_ce(s, labels, mask=torch.zeros(N, dtype=torch.bool))
    assert none.item() == 0.0 and not torch.isnan(torch.autograd.grad(none, s)[0]).any()


def test_distillation_loss_alpha_endpoints_and_mix():
    z, s = make_logits(seed=16)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    cache = cache_view(z, 6, 2.0)
    kd = sparse_kd_loss(s, *cache, temperature=2.0)
    ce = F.cross_entropy(s, labels)
    out1 = distillation_loss(s, labels, *cache, alpha=1.0, temperature=2.0)
    torch.testing.assert_close(out1["loss"], kd)
    torch.testing.assert_close(out1["kd"], kd)
    assert out1["ce"].item() == 0.0
    out0 = distillation_loss(s, labels, *cache, alpha=0.0, temperature=2.0)
    torch.testing.assert_close(out0["loss"], ce)
    assert out0["kd"].item() == 0.0
    mix = distillation_loss(s, labels, *cache, alpha=0.7, temperature=2.0)
    torch.testing.assert_close(mix["loss"], 0.7 * kd + 0.3 * ce)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True])
def test_bad_alpha_raises(alpha):
    z, s = make_logits()
    with pytest.raises(ValueError, match=r"alpha=.*\[0, 1\]"):
        distillation_loss(s, torch.zeros(N, dtype=torch.long), *cache_view(z, 4, 1.0), alpha=alpha, temperature=1.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature_raises(temperature):
    z, s = make_logits()
    with pytest.raises(ValueError, match=r"temperature=.*> 0"):
        distillation_loss(s, torch.zeros(N, dtype=torch.long), *cache_view(z, 4, 1.0), alpha=0.5,
                          temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        sparse_kd_loss(s, *cache_view(z, 4, 1.0), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        dense_kd_loss(s, z, temperature=temperature)


def test_unknown_kind_raises_listing_valid_kinds():
    z, s = make_logits()
    for call in (lambda: sparse_kd_loss(s, *cache_view(z, 4, 1.0), temperature=1.0, kind="kl"),
                 lambda: dense_kd_loss(s, z, temperature=1.0, kind="kl"),
                 lambda: distillation_loss(s, torch.zeros(N, dtype=torch.long), *cache_view(z, 4, 1.0),
                                           alpha=0.0, temperature=1.0, kind="kl")):
        with pytest.raises(ValueError, match="forward-kl.*reverse-kl.*js.*tvd.*skew-kl"):
            call()


def test_bad_shapes_and_dtypes_raise():
    z, s = make_logits()
    ids, top, tail = cache_view(z, 4, 1.0)
    with pytest.raises(ValueError, match="int64"):
        sparse_kd_loss(s, ids.int(), top, tail, temperature=1.0)
    with pytest.raises(ValueError, match="same shape as topk_ids"):
        sparse_kd_loss(s, ids, top[:, :3], tail, temperature=1.0)
    with pytest.raises(ValueError, match="teacher_tail_logprob"):
        sparse_kd_loss(s, ids, top, tail[:-1], temperature=1.0)
    with pytest.raises(ValueError, match="bool"):
        sparse_kd_loss(s, ids, top, tail, temperature=1.0, mask=torch.ones(N))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        sparse_kd_loss(s[None], ids, top, tail, temperature=1.0)
    with pytest.raises(ValueError, match="skew_lambda"):
        sparse_kd_loss(s, ids, top, tail, temperature=1.0, kind="skew-kl", skew_lambda=2.0)


def test_no_nan_anywhere_at_full_k_gradients_for_extreme_teacher():
    # A teacher with -inf logits (p = 0 on some ids) and k = V: the 0 log 0 convention must hold.
    z, s = make_logits(seed=17)
    z[:, :5] = float("-inf")
    for kind in ("forward-kl", "js", "tvd", "skew-kl"):
        loss, g = sparse_and_grad(s, z, V, 1.0, kind)
        ld, gd = dense_and_grad(s, z, 1.0, kind)
        assert not math.isnan(loss.item()) and not torch.isnan(g).any()
        torch.testing.assert_close(loss, ld, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, gd, atol=1e-5, rtol=1e-5)


def test_student_bins_at_logit_scale_100_are_as_exact_as_log_softmax():
    # Subtracting a large logsumexp from a large logit rounds at the scale of |s| (~1.5e-5 at 250);
    # log_softmax rounds at the scale of |s_i - max|. The bins must do as well as log_softmax.
    g = torch.Generator().manual_seed(18)
    for s in (100.0 + 3.0 * torch.randn(64, 1000, generator=g),  # large logits, moderate spread
              100.0 * torch.randn(64, 1000, generator=g)):  # logits of scale 100
        ids = (s + torch.randn(64, 1000, generator=g)).topk(16, dim=-1).indices  # where a teacher would look
        for temperature in TEMPS:
            got = student_bin_logprobs(s, ids, temperature).double()
            ref = F.log_softmax(s.double() / temperature, dim=-1)
            want = torch.cat([ref.gather(1, ids), torch.logsumexp(ref.scatter(1, ids, float("-inf")), -1, keepdim=True)], -1)
            err = (got - want).abs()
            # absolute 1e-6 near the top; fp32 rounding of the value itself further down
            assert (err <= 1e-6 + 2.5e-7 * want.abs()).all(), (temperature, err.max().item())
            dense = F.log_softmax(s / temperature, dim=-1).gather(1, ids).double()
            assert err[:, :-1].max() <= 1.5 * (dense - want[:, :-1]).abs().max() + 1e-7


def test_hard_label_ce_refuses_a_label_outside_the_students_vocabulary():
    """A student with fewer outputs than the labels need: a ValueError naming the id (not an index error
    or a CUDA device-side assert); masked-out and ignored positions may hold anything."""
    logits = torch.randn(4, 10)
    labels = torch.tensor([1, 12, -100, 3])
    with pytest.raises(ValueError, match=r"labels hold ids outside 0..9 \(the student's vocabulary\), e.g. 12"):
        hard_label_ce(logits, labels)
    masked = hard_label_ce(logits, labels, mask=torch.tensor([True, False, True, True]))
    torch.testing.assert_close(masked, F.cross_entropy(logits[[0, 3]], labels[[0, 3]]))
