"""Tests for kdpipe.pipeline.cache.sampling (draws from the teacher's tail, importance weights) and
losses.sampled_kd_loss (the unbiased KD estimator on sampled and mixed targets)."""
import pytest
import torch
import torch.nn.functional as F

from kdpipe.pipeline.cache import sampling
from kdpipe.pipeline.train.losses import SAMPLED_KINDS, dense_kd_loss, sampled_kd_loss
from kdpipe.pipeline.cache.sampling import draw_samples, sample_weights

V = 64
NEG_INF = float("-inf")


def logits(seed, n, v=V, scale=2.5, shift=7.0):
    """Random raw logits (with an arbitrary shift: only z - max z may matter)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale + shift


def gen(seed):
    return torch.Generator().manual_seed(seed)


def exact_view(z, k, temperatures):
    """The cache's exact part (as pipeline.capture.topk stores it): top-k ids, z - max z, and per T the
    logsumexp of (z - max z) / T and the log mass outside the top-k (0 at k = 0, -inf at k = V)."""
    zs = z - z.amax(dim=1, keepdim=True)
    ids = zs.topk(k, dim=1).indices
    rest = zs.scatter(1, ids, NEG_INF)
    lse = torch.stack([torch.logsumexp(zs / t, dim=1) for t in temperatures], dim=1)
    tail = torch.stack([torch.logsumexp(rest / t, dim=1) for t in temperatures], dim=1) - lse
    return ids, zs, lse, tail


def cached_targets(z, k, t0, t, draws, seed):
    """(topk_ids, teacher_topk_logprobs, sample_ids, sample_logprobs, sample_weights) at temperature t,
    with the samples drawn at t0: what a mixed (k > 0) or sampled-only (k = 0) cache gives the trainer."""
    ids, zs, lse, tail = exact_view(z, k, (t0, t))
    smp = draw_samples(z, ids, temperature=t0, draws=draws, generator=gen(seed))
    log_p, w = sample_weights(smp.logits, smp.counts, logsumexp=lse[:, 1], logsumexp_t0=lse[:, 0],
                              tail_logprob_t0=tail[:, 0], temperature=t, sample_temperature=t0, draws=draws)
    top = zs.gather(1, ids) / t - lse[:, 1:]
    return ids, top, smp.ids, log_p, w


def loss_and_grad(loss_fn, s, *args, **kw):
    s = s.clone().requires_grad_(True)
    loss = loss_fn(s, *args, **kw)
    (g,) = torch.autograd.grad(loss, s)
    return loss.detach(), g


# ----------------------------------------------------------------------------- draw_samples
def check_samples(z, topk_ids, smp, draws):
    """Every documented property of one Samples result."""
    n = z.shape[0]
    assert smp.ids.shape == smp.counts.shape == smp.logits.shape == (n, draws)
    assert smp.ids.dtype == smp.counts.dtype == torch.int64 and smp.logits.dtype == torch.float32
    zs = z.float() - z.float().amax(dim=1, keepdim=True)
    for r in range(n):
        ids, counts, values = smp.ids[r], smp.counts[r], smp.logits[r]
        real = counts > 0
        m = int(real.sum())
        assert bool(real[:m].all()) and not bool(real[m:].any())  # real slots first
        if m:
            assert int(counts.sum()) == draws
        assert len(set(ids[:m].tolist())) == m
        assert not set(ids[:m].tolist()) & set(topk_ids[r].tolist())
        assert torch.equal(values[:m], zs[r, ids[:m]])  # the same fp32 z - max z
        assert bool((values[1:] <= values[:-1]).all())  # non-increasing, padding included
        same = values[1:m] == values[:m][:-1]
        assert bool((ids[1:m][same] > ids[:m][:-1][same]).all())  # ties by id
        assert bool((ids[m:] == 0).all()) and bool((counts[m:] == 0).all())
        assert bool((values[m:] == (values[m - 1] if m else 0.0)).all())


@pytest.mark.parametrize("k", [0, 3, V - 1, V])
def test_draw_samples_layout(k, monkeypatch):
    z = logits(1, 10)
    z[3] = torch.randint(0, 3, (V,), generator=gen(2)).float()  # many ties
    z[4, :] = NEG_INF  # probability 0 outside the top-k: all padding
    z[4, :k] = 1.0
    topk_ids = z.topk(k, dim=1).indices
    monkeypatch.setattr(sampling, "CHUNK_BYTES", 3 * 2 * 4 * V)  # three rows per chunk
    smp = draw_samples(z, topk_ids, temperature=1.5, draws=20, generator=gen(0))
    check_samples(z, topk_ids, smp, 20)
    empty = [4] + (list(range(10)) if k == V else [])
    assert int(smp.counts[empty].sum()) == 0
    assert bool((smp.counts.sum(dim=1)[[r for r in range(10) if r not in empty]] == 20).all())
    if k == V - 1:  # a one-id tail: every draw is that id
        assert bool((smp.counts[:, 0][smp.counts.sum(dim=1) > 0] == 20).all())


def test_draw_samples_half_precision_and_no_rows():
    z = logits(3, 6).bfloat16()
    ids = z.float().topk(2, dim=1).indices
    check_samples(z, ids, draw_samples(z, ids, temperature=1.0, draws=7, generator=gen(0)), 7)
    smp = draw_samples(z[:0], ids[:0], temperature=1.0, draws=7, generator=gen(0))
    assert smp.ids.shape == (0, 7)


def test_draw_samples_deterministic_per_generator_state():
    z = logits(4, 16)
    ids = z.topk(4, dim=1).indices
    a, b, c = (draw_samples(z, ids, temperature=1.0, draws=32, generator=gen(s)) for s in (7, 7, 8))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("ids", "counts", "logits"))
    assert not torch.equal(a.ids, c.ids)


def test_draw_samples_frequencies_match_the_renormalised_tail():
    # 3 positions x 4,000 copies x 50 draws: 200,000 draws per position. Each id's total count is
    # Binomial(200,000, pi); we require |freq - pi| <= 5 standard errors for every id (measured: 2.7 at most).
    k, t0, copies, draws = 5, 1.5, 4000, 50
    z = logits(5, 3)
    ids, zs, _, _ = exact_view(z, k, (t0,))
    pi = F.softmax(zs.scatter(1, ids, NEG_INF).double() / t0, dim=1)  # [3, V], 0 on the top-k
    smp = draw_samples(z.repeat(copies, 1), ids.repeat(copies, 1), temperature=t0, draws=draws, generator=gen(0))
    total = torch.zeros(copies * 3, V, dtype=torch.float64).scatter_add_(1, smp.ids, smp.counts.double())
    freq = total.view(copies, 3, V).sum(dim=0) / (copies * draws)
    se = (pi * (1 - pi) / (copies * draws)).sqrt()
    assert bool((freq.gather(1, ids) == 0).all())
    assert float(((freq - pi).abs() / se.clamp_min(1e-12)).max()) < 5.0


def test_draw_samples_validates():
    z = logits(6, 4)
    ids = z.topk(2, dim=1).indices
    for bad in (0, 256, 2.0, True):
        with pytest.raises(ValueError, match="draws"):
            draw_samples(z, ids, temperature=1.0, draws=bad, generator=gen(0))
    with pytest.raises(ValueError, match="topk_ids"):
        draw_samples(z, ids.int(), temperature=1.0, draws=4, generator=gen(0))
    with pytest.raises(ValueError, match="temperature"):
        draw_samples(z, ids, temperature=0.0, draws=4, generator=gen(0))


# ----------------------------------------------------------------------------- sample_weights
@pytest.mark.parametrize("k", [0, 6])
@pytest.mark.parametrize("t0,t", [(1.0, 1.0), (1.0, 2.0), (2.0, 0.5)])
def test_sample_weights_against_dense_probabilities(k, t0, t):
    z, draws = logits(7, 8), 12
    ids, zs, lse, tail = exact_view(z, k, (t0, t))
    smp = draw_samples(z, ids, temperature=t0, draws=draws, generator=gen(1))
    log_p, w = sample_weights(smp.logits, smp.counts, logsumexp=lse[:, 1], logsumexp_t0=lse[:, 0],
                              tail_logprob_t0=tail[:, 0], temperature=t, sample_temperature=t0, draws=draws)
    real = smp.counts > 0
    dense_p = F.log_softmax(z.double() / t, dim=1)
    log_pi = F.log_softmax(zs.scatter(1, ids, NEG_INF).double() / t0, dim=1)
    want_w = smp.counts / draws * (dense_p.gather(1, smp.ids) - log_pi.gather(1, smp.ids)).exp()
    torch.testing.assert_close(log_p[real].double(), dense_p.gather(1, smp.ids)[real], rtol=0, atol=2e-5)
    torch.testing.assert_close(w[real].double(), want_w[real], rtol=2e-5, atol=0)
    assert bool((log_p[~real] == NEG_INF).all()) and bool((w[~real] == 0).all())
    if t == t0:  # count / M * r_T0
        torch.testing.assert_close(w, smp.counts / draws * tail[:, :1].exp(), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- unbiasedness
# The estimate from M draws is the mean of M one-draw estimates: D = head + sum_i count_i / M * h(i)
# = (1/M) sum_j Y(x_j) with Y(x) = head + h(x) the one-draw estimate at x. So E[D] = sum_x pi(x) Y(x)
# exactly, and the standard error of a Monte Carlo mean is known exactly from Y's variance under pi.
def one_draw_estimates(z, s, k, t0, t, kind, naive=False):
    """For every position b and every id x outside its top-k: pi_b(x) [n, V-k], and the value Y [n, V-k]
    and gradient G [n, V-k, V] (w.r.t. position b's student logits) of sampled_kd_loss on one row
    with the single draw x (M = 1). ``naive``: weight r_T instead of p_T(x) / pi(x)."""
    n, v = z.shape
    ids, zs, lse, tail = exact_view(z, k, (t0, t))
    x = torch.ones(n, v, dtype=torch.bool).scatter(1, ids, False).nonzero()[:, 1].view(n, v - k)

    def rep(a):  # one row per (position, tail id)
        return a.repeat_interleave(v - k, dim=0)

    top = rep(zs.gather(1, ids) / t - lse[:, 1:])
    lse, tail, rows = rep(lse), rep(tail), n * (v - k)
    sample_logits, ones = zs.gather(1, x).view(rows, 1), torch.ones(rows, 1, dtype=torch.int64)
    log_p, w = sample_weights(sample_logits, ones, logsumexp=lse[:, 1], logsumexp_t0=lse[:, 0],
                              tail_logprob_t0=tail[:, 0], temperature=t, sample_temperature=t0, draws=1)
    if naive:
        w = tail[:, 1:].exp()
    pi = (sample_logits[:, 0].double() / t0 - lse[:, 0] - tail[:, 0]).exp().view(n, v - k)
    targets = (rep(ids), top, x.reshape(rows, 1), log_p, w)
    leaf = rep(s).requires_grad_(True)
    (g,) = torch.autograd.grad(sampled_kd_loss(leaf, *targets, temperature=t, kind=kind), leaf)
    with torch.no_grad():
        y = torch.stack([sampled_kd_loss(leaf[r : r + 1], *(a[r : r + 1] for a in targets), temperature=t, kind=kind)
                         for r in range(rows)])
    return pi, y.double().view(n, v - k), g.double().view(n, v - k, v) * rows


def exact_mean_and_se(pi, y, g, samples):
    """Expectation and standard error of the loss over the n positions (value, gradient [n, V]) for
    ``samples`` independent draws per position."""
    n = pi.shape[0]
    mean_y, mean_g = (pi * y).sum(1), (pi[:, :, None] * g).sum(1)
    var_y, var_g = (pi * (y - mean_y[:, None]) ** 2).sum(1), (pi[:, :, None] * (g - mean_g[:, None]) ** 2).sum(1)
    return mean_y.mean(), mean_g / n, (var_y.sum() / samples).sqrt() / n, (var_g / samples).sqrt() / n


# (k, T0, T): sampled only and mixed at T = T0, and importance-weighted at a captured T != T0
CASES = [(0, 1.0, 1.0), (8, 1.0, 1.0), (0, 1.0, 2.0), (8, 1.0, 2.0), (4, 2.0, 1.0)]


@pytest.mark.parametrize("kind", SAMPLED_KINDS)
@pytest.mark.parametrize("k,t0,t", CASES)
def test_expectation_over_one_draw_is_the_dense_loss(kind, k, t0, t):
    # E[D] = sum_x pi(x) Y(x), enumerated exactly over the tail: equals the dense value and gradient.
    z, s = logits(8, 4), logits(9, 4, scale=1.5, shift=-3.0)
    dense, dense_g = loss_and_grad(dense_kd_loss, s, z, temperature=t, kind=kind)
    mean_y, mean_g, _, _ = exact_mean_and_se(*one_draw_estimates(z, s, k, t0, t, kind), 1)
    torch.testing.assert_close(mean_y.float(), dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean_g.float(), dense_g, rtol=1e-4, atol=1e-6 * float(dense_g.abs().max()))


@pytest.mark.parametrize("kind", SAMPLED_KINDS)
@pytest.mark.parametrize("k,t0,t", CASES)
@pytest.mark.slow
def test_sampled_loss_is_unbiased(kind, k, t0, t):
    # 4 positions x 4,000 copies x 32 draws through draw_samples + sample_weights, one sampled_kd_loss
    # call. The value and every gradient entry must lie within 5 exact standard errors of the dense
    # loss (plus 1e-5 relative for fp32 sums; measured: at most 2.1 SE for the value, 3.0 for a
    # gradient entry), and within 1% of the dense value and 6% of the largest dense gradient entry
    # (measured: at most 0.4% and 3.6%, skew-kl at T = 2 from T0 = 1, k = 0, where the SE is 1.4%).
    z, s = logits(8, 4), logits(9, 4, scale=1.5, shift=-3.0)
    copies, draws = 4000, 32
    dense, dense_g = loss_and_grad(dense_kd_loss, s, z, temperature=t, kind=kind)
    _, _, se, se_g = exact_mean_and_se(*one_draw_estimates(z, s, k, t0, t, kind), copies * draws)
    targets = cached_targets(z.repeat(copies, 1), k, t0, t, draws, seed=11)
    loss, g = loss_and_grad(lambda x, *a, **kw: sampled_kd_loss(x.repeat(copies, 1), *a, **kw), s, *targets,
                            temperature=t, kind=kind)
    err, err_g = float((loss - dense).abs()), (g - dense_g).abs().double()
    scale_g = float(dense_g.abs().max())
    assert err <= 5 * float(se) + 1e-5 * float(dense), (err, float(se))
    assert bool((err_g <= 5 * se_g + 1e-5 * scale_g).all()), float((err_g / se_g).max())
    assert err <= 0.01 * float(dense) and float(err_g.max()) <= 0.06 * scale_g


def test_unweighted_counts_at_another_temperature_are_caught():
    # Power check: weights count / M * r_T (draws at T0 = 1 treated as if made at T = 2) miss the
    # dense gradient by far more than the 5 standard errors the test above allows (measured: 861).
    z, s = logits(8, 4), logits(9, 4, scale=1.5, shift=-3.0)
    _, dense_g = loss_and_grad(dense_kd_loss, s, z, temperature=2.0, kind="forward-kl")
    _, _, _, se_g = exact_mean_and_se(*one_draw_estimates(z, s, 0, 1.0, 2.0, "forward-kl"), 4000 * 32)
    _, naive_g, _, _ = exact_mean_and_se(*one_draw_estimates(z, s, 0, 1.0, 2.0, "forward-kl", naive=True), 1)
    assert float(((naive_g - dense_g).abs() / se_g).max()) > 20


# ----------------------------------------------------------------------------- exact limits
@pytest.mark.parametrize("kind", SAMPLED_KINDS)
@pytest.mark.parametrize("k", [V, V - 1])
def test_exact_when_the_tail_has_at_most_one_id(kind, k):
    # k = V: no samples (all padding), the exact head is the whole distribution. k = V - 1: every
    # draw is the one tail id, whose weight is p_T(v) / pi(v) = p_T(v) exactly. Both equal dense.
    z, s = logits(10, 6), logits(11, 6, scale=1.5)
    targets = cached_targets(z, k, 1.0, 2.0, draws=5, seed=0)
    ls, gs = loss_and_grad(sampled_kd_loss, s, *targets, temperature=2.0, kind=kind)
    ld, gd = loss_and_grad(dense_kd_loss, s, z, temperature=2.0, kind=kind)
    torch.testing.assert_close(ls, ld, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, gd, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- kinds, masks, padding
@pytest.mark.parametrize("kind", ["reverse-kl", "js", "tvd", "nope"])
def test_refused_kinds_name_the_supported_ones(kind):
    z = logits(12, 3)
    targets = cached_targets(z, 2, 1.0, 1.0, draws=4, seed=0)
    with pytest.raises(ValueError, match=f"'{kind}' is not defined on sampled targets.*forward-kl, skew-kl"):
        sampled_kd_loss(logits(13, 3), *targets, temperature=1.0, kind=kind)


@pytest.mark.parametrize("kind", SAMPLED_KINDS)
def test_mask_and_padding(kind):
    z, s = logits(14, 8), logits(15, 8)
    z[5, 1:] = NEG_INF  # k = 0 and a one-id row: 1 real slot, 3 padding slots
    ids, top, sids, log_p, w = cached_targets(z, 0, 1.0, 2.0, draws=4, seed=3)
    w[6], log_p[6] = 0.0, NEG_INF  # a row with no samples and no top-k: contributes exactly 0
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    kw = {"temperature": 2.0, "kind": kind}
    loss, g = loss_and_grad(sampled_kd_loss, s, ids, top, sids, log_p, w, mask=mask, **kw)
    assert bool(torch.isfinite(g).all()) and bool((g[~mask] == 0).all()) and bool((g[6] == 0).all())
    keep = mask.nonzero()[:, 0]
    sub = sampled_kd_loss(s[keep], ids[keep], top[keep], sids[keep], log_p[keep], w[keep], **kw)
    torch.testing.assert_close(loss, sub, rtol=1e-6, atol=0)  # the mean over the 5 counted rows
    empty = torch.zeros(8, dtype=torch.bool)
    zero, g0 = loss_and_grad(sampled_kd_loss, s, ids, top, sids, log_p, w, mask=empty, **kw)
    assert float(zero) == 0.0 and bool((g0 == 0).all())


def test_sampled_loss_validates_shapes():
    z, s = logits(16, 3), logits(17, 3)
    ids, top, sids, log_p, w = cached_targets(z, 2, 1.0, 1.0, draws=4, seed=0)
    with pytest.raises(ValueError, match="sample_weights"):
        sampled_kd_loss(s, ids, top, sids, log_p, w[:, :2], temperature=1.0)
    with pytest.raises(ValueError, match="sample_ids"):
        sampled_kd_loss(s, ids, top, sids.int(), log_p, w, temperature=1.0)
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        sampled_kd_loss(s, ids, top[:, :1], sids, log_p, w, temperature=1.0)
    with pytest.raises(ValueError, match="skew_lambda"):
        sampled_kd_loss(s, ids, top, sids, log_p, w, temperature=1.0, kind="skew-kl", skew_lambda=2.0)
