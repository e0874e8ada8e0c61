"""The ``temperature-mixture`` draws (``--sample`` with several temperatures, issue 25): split over the
captured temperatures, stratified, every draw weighted at every T against the mixture proposal.
Statistical checks on a small-V teacher (means over many independent rows, 5 standard errors)."""
import math

import pytest
import torch

from kdpipe.pipeline.cache import sampling
from kdpipe.pipeline.cache.sampling import (
    draw_mixture,
    draw_weights,
    mixture_weights,
    sample_weights,
    split_draws,
)
from test_sampling import NEG_INF, check_samples, exact_view, gen, logits

TEMPS = (1.0, 2.0, 4.0)
SMALL_V = 12


def tail_probs(z, k, t):
    """``[V]`` the teacher's p_T outside the top-k of one row ``z [V]`` (0 on the top-k)."""
    p = torch.softmax(z.double() / t, dim=0)
    return p.scatter(0, z.topk(k).indices, 0.0) if k else p


def per_id(ids, weights, v):
    """``[rows, V]``: each row's weights put back on their ids."""
    return torch.zeros(ids.shape[0], v, dtype=torch.float64).scatter_add_(1, ids, weights.double())


@pytest.mark.parametrize("k,draws,block", [(0, 7, 1024), (3, 7, 5), (3, 2, 1024)])
def test_mixture_weights_estimate_p_t_without_bias_at_every_captured_temperature(k, draws, block, monkeypatch):
    monkeypatch.setattr(sampling, "STRATA_BLOCK", block)  # 5: the two-step search over blocks of 5, 5 and 2 ids
    copies = 40_000  # independent draws of one small-V row
    z = logits(20, 1, v=SMALL_V, scale=2.0)
    rows = z.repeat(copies, 1)
    ids, _, lse, tail = exact_view(rows, k, TEMPS)
    smp = draw_mixture(rows, ids, temperatures=TEMPS, draws=draws, generator=gen(0))
    check_samples(rows[:50], ids[:50], sampling.Samples(smp.ids[:50], smp.counts[:50], smp.logits[:50]), draws)
    for j, t in enumerate(TEMPS):
        log_p, w = mixture_weights(smp.logits, smp.counts, logsumexp=lse, tail_logprob=tail, temperatures=TEMPS,
                                   temperature_index=j, draws=draws)
        real = smp.counts > 0
        exact = torch.log_softmax(rows.double() / t, dim=1).gather(1, smp.ids)
        torch.testing.assert_close(log_p[real].double(), exact[real], rtol=0, atol=2e-6)
        estimate = per_id(smp.ids, w, SMALL_V)  # [copies, V]: per row, an estimate of p_T on the tail
        mean, se = estimate.mean(0), estimate.std(0) / math.sqrt(copies)
        expected = tail_probs(z[0], k, t)
        assert bool(((mean - expected).abs() <= 5 * se + 1e-9).all()), (t, (mean - expected) / se)
        # Power check: the same draws weighed as if all were made at T = 1 (the one-temperature
        # formula) miss p_T by far more than 5 standard errors at T = 2 and 4.
        if t != TEMPS[0]:
            _, naive = sample_weights(smp.logits, smp.counts, logsumexp=lse[:, j], logsumexp_t0=lse[:, 0],
                                      tail_logprob_t0=tail[:, 0], temperature=t, sample_temperature=TEMPS[0],
                                      draws=draws)
            naive_mean = per_id(smp.ids, naive, SMALL_V).mean(0)
            assert float(((naive_mean - expected).abs() / (se + 1e-12)).max()) > 20


def test_weights_are_bounded_by_the_draws_made_at_that_temperature():
    z = logits(21, 200)
    ids, _, lse, tail = exact_view(z, 4, TEMPS)
    smp = draw_mixture(z, ids, temperatures=TEMPS, draws=16, generator=gen(1))
    for j, share in enumerate(split_draws(16, TEMPS)):
        _, w = mixture_weights(smp.logits, smp.counts, logsumexp=lse, tail_logprob=tail, temperatures=TEMPS,
                               temperature_index=j, draws=16)
        bound = smp.counts.double() * tail[:, j, None].double().exp() / share
        assert bool((w.double() <= bound * (1 + 1e-5)).all())


@pytest.mark.parametrize("block", [1024, 16])
def test_stratified_draws_count_each_id_within_two_of_its_expectation(block, monkeypatch):
    # One draw per 1/M slice of the proposal's cumulative distribution: an id of probability pi is
    # drawn M * pi times give or take less than 2 (i.i.d. draws would stray by ~sqrt(M * pi)).
    monkeypatch.setattr(sampling, "STRATA_BLOCK", block)  # 16: blocks of 16, 16 and 8 of the 40 ids
    z = logits(22, 300, v=40, scale=1.5)
    smp = draw_mixture(z, torch.zeros(300, 0, dtype=torch.int64), temperatures=(1.0,), draws=200, generator=gen(2))
    expected = 200 * torch.softmax(z.double(), dim=1)  # [rows, V]
    counts = per_id(smp.ids, smp.counts, 40)
    assert float((counts - expected).abs().max()) < 2


def test_one_temperature_mixture_is_the_one_temperature_weights():
    z = logits(23, 30)
    ids, _, lse, tail = exact_view(z, 5, (2.0,))
    smp = draw_mixture(z, ids, temperatures=(2.0,), draws=9, generator=gen(3))
    _, mixed = mixture_weights(smp.logits, smp.counts, logsumexp=lse, tail_logprob=tail, temperatures=(2.0,),
                               temperature_index=0, draws=9)
    _, single = sample_weights(smp.logits, smp.counts, logsumexp=lse[:, 0], logsumexp_t0=lse[:, 0],
                               tail_logprob_t0=tail[:, 0], temperature=2.0, sample_temperature=2.0, draws=9)
    torch.testing.assert_close(mixed, single, rtol=1e-6, atol=0)


def test_draw_weights_follows_the_recorded_scheme():
    z = logits(24, 20)
    ids, _, lse, tail = exact_view(z, 3, TEMPS)
    smp = draw_mixture(z, ids, temperatures=TEMPS, draws=6, generator=gen(4))
    common = dict(logsumexp=lse, tail_logprob=tail, temperatures=TEMPS, temperature_index=2, draws=6)
    mixed = draw_weights(smp.logits, smp.counts, scheme="temperature-mixture", sample_temperature=None, **common)
    torch.testing.assert_close(mixed, mixture_weights(smp.logits, smp.counts, **common))
    older = draw_weights(smp.logits, smp.counts, scheme=None, sample_temperature=1.0, **common)  # caches before
    torch.testing.assert_close(older, sample_weights(
        smp.logits, smp.counts, logsumexp=lse[:, 2], logsumexp_t0=lse[:, 0], tail_logprob_t0=tail[:, 0],
        temperature=4.0, sample_temperature=1.0, draws=6))
    with pytest.raises(ValueError, match="scheme='nope' is invalid"):
        draw_weights(smp.logits, smp.counts, scheme="nope", sample_temperature=None, **common)


def test_split_draws_and_reproducible_draws(monkeypatch):
    assert split_draws(16, TEMPS) == (6, 5, 5) and split_draws(2, TEMPS) == (1, 1, 0) and split_draws(9, (1.0,)) == (9,)
    with pytest.raises(ValueError, match="draws=0 is invalid"):
        split_draws(0, TEMPS)
    z = logits(25, 10)
    z[4, :] = NEG_INF  # nothing to draw outside the top-k: all padding
    z[4, :2] = 1.0
    ids = z.topk(2, dim=1).indices
    monkeypatch.setattr(sampling, "CHUNK_BYTES", 3 * 16 * z.shape[1])  # three rows per chunk
    a = draw_mixture(z, ids, temperatures=TEMPS, draws=11, generator=gen(5))
    b = draw_mixture(z, ids, temperatures=TEMPS, draws=11, generator=gen(5))
    check_samples(z, ids, a, 11)
    assert int(a.counts[4].sum()) == 0
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("ids", "counts", "logits"))
