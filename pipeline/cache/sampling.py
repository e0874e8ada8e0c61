"""Sampled teacher targets: draws from the teacher's tail and their importance weights.

A cached position keeps an exact top-k set ``S`` (``k >= 0``; ``k = 0`` is "sampled only") plus ``M``
draws with replacement from one proposal ``pi``: ``p_T0`` restricted to the complement of ``S`` and
renormalised (``pi = p_T0`` when ``k = 0``), at one sampling temperature ``T0`` (docs/THEORY.md
section 6). Stored per position: the unique sampled ids, how often each was drawn,
and their exact values ``z_i - max z``. With the exact ``lse_T`` and log tail mass of each captured
temperature ``T`` (as :mod:`pipeline.capture.topk` stores them) every sampled id gets

    log p_T(i) = (z_i - max z) / T  - lse_T
    log pi(i)  = (z_i - max z) / T0 - lse_T0 - tail_logprob_T0      (tail_logprob_T0 = 0 when k = 0)
    w_i        = (count_i / M) * p_T(i) / pi(i)

and ``E[sum_i w_i f(i)] = sum_{v not in S} p_T(v) f(v)`` for any ``f``: plain importance sampling with
exact probabilities, unbiased at every captured ``T`` (at ``T = T0``, ``w_i = count_i / M * r_T0``).
:func:`pipeline.train.losses.sampled_kd_loss` turns these into an unbiased KD loss.

Two schemes (``SCHEMES``; the cache's schema records which, ``sample_scheme``):

- ``"one-temperature"`` (:func:`draw_samples`, :func:`sample_weights`; every cache written before the
  scheme was recorded, and ``--sample-temperature T0``): the ``M`` draws are i.i.d. from ``pi`` at
  ``T0``. Reweighted to a distant ``T`` they are noisy: ``p_T / pi`` is large where ``T`` spreads mass that
  ``T0`` does not (on the demo teacher, draws at T = 1 give a gradient cosine of 0.34 at T = 2).
- ``"temperature-mixture"`` (:func:`draw_mixture`, :func:`mixture_weights`; what ``--sample`` does
  without ``--sample-temperature``): the draws are split over the captured temperatures
  (:func:`split_draws`: ``M_j`` at ``T_j``), each temperature's share drawn *stratified* (one draw per
  ``1/M_j`` slice of the proposal's cumulative distribution), and every draw serves every ``T`` through
  the mixture ``pi_mix = sum_j (M_j / M) pi_j`` ("balance heuristic" multiple importance sampling):

      w_i = (count_i / M) * p_T(i) / pi_mix(i)   <=  count_i * r_T / M_T     (M_T: the draws made at T)

  Unbiased at every ``T`` (``E[count_i] = M pi_mix(i)`` for stratified and i.i.d. draws alike), with
  weights bounded at every captured ``T``. Measured against the other candidates in
  ``benchmarks/draw_schemes.py``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from kdpipe.pipeline.cache.schema import check_temperature

# fp32 working memory per chunk of rows: the [rows, V] proposal weights plus the copy torch.multinomial
# may make of them stay under this.
CHUNK_BYTES = 64 * 2**20
MAX_DRAWS = 255  # counts fit uint8
SCHEMES = ("one-temperature", "temperature-mixture")
STRATA_BLOCK = 1024  # stratified draws: ids per block of the two-step search (see _stratified)

_NEG_INF = float("-inf")


@dataclasses.dataclass
class Samples:
    """Unique sampled ids of ``n`` positions, ``M`` slots each; real slots first, then padding."""

    ids: torch.Tensor  # [n, M] int64, unique per row, largest logit first (ties: smaller id first); padding 0
    counts: torch.Tensor  # [n, M] int64, draws of each id (a row sums to M, or 0 if its tail is empty); padding 0
    logits: torch.Tensor  # [n, M] fp32, z - max z at the ids (<= 0); padding: the last real slot's (0 if none)


def _check_draws(draws) -> int:
    if isinstance(draws, bool) or not isinstance(draws, numbers.Integral) or not 1 <= draws <= MAX_DRAWS:
        raise ValueError(f"draws={draws!r} is invalid: pass an integer between 1 and {MAX_DRAWS} (counts are stored as uint8)")
    return int(draws)


def _unique_counts(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ids per row of ``drawn [n, M]`` (ascending, then zeros) and their counts (then zeros)."""
    ids = drawn.sort(dim=1).values
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = new.cumsum(dim=1) - 1  # [n, M]: the unique slot of each draw
    unique = torch.zeros_like(ids).scatter_(1, slot, ids)
    counts = torch.zeros_like(ids).scatter_add_(1, slot, torch.ones_like(ids))
    return unique, counts


def _tail_weights(logits, row_max, topk_ids, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n, V] fp32 weights proportional to pi, the tail of softmax(logits / T)), [n, 1] empty)``:
    the largest weight of a row is 1 (no overflow); an empty tail gets weights 1 (any valid row)."""
    w = logits.to(torch.float32, copy=True).sub_(row_max).div_(temperature)  # [n, V]: (z - max z) / T
    w.scatter_(1, topk_ids, _NEG_INF)  # the proposal lives on the tail only
    tail_max = w.amax(dim=1, keepdim=True)
    empty = tail_max == _NEG_INF  # [n, 1]: nothing (with probability > 0) left to draw
    w.sub_(tail_max.masked_fill(empty, 0.0)).exp_()
    return w.masked_fill_(empty, 1.0), empty


def _stratified(w: torch.Tensor, draws: int, generator) -> torch.Tensor:
    """``[n, draws]`` ids, draw ``j`` uniform in the ``j``-th of ``draws`` equal slices of the cumulative
    distribution of ``w [n, V]`` (ids in their natural order): each draw alone is distributed as
    ``w / sum w``, so ``E[count_i] = draws * w_i / sum w``, with less spread than i.i.d. draws.

    In two steps, so that no ``[n, V]`` cumulative sum is needed: a block of ``STRATA_BLOCK`` ids (at
    most V) by the blocks' fp32 sums (exact to ~1e-7 relative, alike for every id of a block), then an
    id of that block by the fp64 cumulative sum of the block alone, the slice's position within the
    block rescaled to it."""
    n, vocab = w.shape
    size = min(STRATA_BLOCK, vocab)
    full = vocab // size * size
    sums = [w[:, :full].reshape(n, -1, size).sum(dim=2)] if full else []
    if full < vocab:
        sums.append(w[:, full:].sum(dim=1, keepdim=True))
    block_mass = torch.cat(sums, dim=1).double()  # [n, blocks]
    block_cdf = block_mass.cumsum(dim=1)
    below = lambda x: torch.nextafter(x, torch.zeros_like(x))  # noqa: E731 - the largest float under x
    slots = torch.arange(draws, dtype=torch.float64, device=w.device)
    jitter = torch.rand(n, draws, generator=generator, dtype=torch.float64, device=w.device)
    total = block_cdf[:, -1:]
    targets = torch.minimum((slots + jitter) / draws * total, below(total))  # [n, draws] in [0, total)
    block = torch.searchsorted(block_cdf, targets, right=True)  # the first block whose cumulative mass passes
    within = (targets - (block_cdf.gather(1, block) - block_mass.gather(1, block))) / block_mass.gather(1, block)
    ids = block[..., None] * size + torch.arange(size, device=w.device)  # [n, draws, size]
    inner = w.gather(1, ids.clamp_max(vocab - 1).reshape(n, -1)).reshape(ids.shape).masked_fill(ids >= vocab, 0.0)
    inner_cdf = inner.double().cumsum(dim=2)
    inner_total = inner_cdf[..., -1:]
    at = torch.searchsorted(inner_cdf, torch.minimum(within.clamp_min(0)[..., None] * inner_total, below(inner_total)),
                            right=True)[..., 0]  # [n, draws]: an id of the block with w > 0
    return block * size + at


def _draw_chunk(logits, topk_ids, shares, generator) -> Samples:
    """``shares``: ``(temperature, draws, stratified)`` per proposal; their draws are pooled."""
    row_max = logits.amax(dim=1, keepdim=True).float()  # [n, 1]
    row_max.masked_fill_(row_max == _NEG_INF, 0.0)  # a row of -inf: an empty tail, no NaN
    drawn = []
    for temperature, draws, stratified in shares:
        w, empty = _tail_weights(logits, row_max, topk_ids, temperature)
        drawn.append(_stratified(w, draws, generator) if stratified
                     else torch.multinomial(w, draws, replacement=True, generator=generator))  # [n, M_j]
        del w
    ids, counts = _unique_counts(torch.cat(drawn, dim=1))
    values = logits.gather(1, ids).float() - row_max  # the same fp32 z - max z as the cache's top-k
    real = (counts > 0) & ~empty
    # most probable first; the stable sort keeps ascending ids among equal logits; padding last
    order = torch.where(real, -values, float("inf")).sort(dim=1, stable=True).indices
    ids, counts, values, real = (t.gather(1, order) for t in (ids, counts, values, real))
    n_real = real.sum(dim=1, keepdim=True)
    last = values.gather(1, (n_real - 1).clamp_min(0)).masked_fill(n_real == 0, 0.0)
    return Samples(ids.masked_fill(~real, 0), counts.masked_fill(~real, 0), torch.where(real, values, last))


def _check_rows(logits, topk_ids) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits has shape {tuple(logits.shape)}: pass [n, V] (flatten batch/time first)")
    n, vocab = logits.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_ids.shape[1] > vocab or topk_ids.dtype != torch.int64:
        raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)} and dtype {topk_ids.dtype}: "
                         f"pass int64 ids of shape [n, k] with n={n} and k <= V={vocab}")


def _draw_rows(logits, topk_ids, shares, generator, *, bytes_per_logit: int) -> Samples:
    """:func:`_draw_chunk` over chunks of rows whose ``[rows, V]`` temporaries stay under ``CHUNK_BYTES``."""
    n, vocab = logits.shape
    draws = sum(m for _, m, _ in shares)
    if n == 0:
        empty = torch.zeros(0, draws, dtype=torch.int64, device=logits.device)
        return Samples(empty, empty.clone(), torch.zeros(0, draws, device=logits.device))
    rows = max(1, CHUNK_BYTES // (bytes_per_logit * vocab))
    parts = [_draw_chunk(logits[i : i + rows], topk_ids[i : i + rows], shares, generator) for i in range(0, n, rows)]
    if len(parts) == 1:
        return parts[0]
    return Samples(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Samples)))


@torch.no_grad()
def draw_samples(logits, topk_ids, *, temperature, draws, generator) -> Samples:
    """Draw ``draws`` ids per row, with replacement, from ``softmax(logits / T0)`` outside the top-k.

    Args:
        logits: [n, V] raw teacher logits (any shift, any float dtype; handled in fp32). Finite, or
            ``-inf`` for ids the teacher never predicts.
        topk_ids: [n, k] int64 ids of the exact top-k set to exclude (distinct per row; ``k = 0`` to
            draw from the whole distribution).
        temperature: the sampling temperature ``T0 > 0``.
        draws: ``M``, between 1 and 255.
        generator: a ``torch.Generator`` on the logits' device. The draws of a row depend on its
            state when the row's chunk is reached (and on the chunking, fixed by ``V`` and
            ``CHUNK_BYTES``), so output is reproducible for a given generator state and input; a
            caller seeds one generator per shard so that shards do not depend on each other.

    Returns: :class:`Samples` of ``[n, M]`` tensors. Each row holds its unique drawn ids, sorted by
    logit descending (ties: by id), with their counts and values ``z - max z`` (``max`` over the whole
    row, top-k included, as the cache stores the top-k values), then padding slots (id 0, count 0,
    the last real slot's value, so values never increase along a row). A row whose tail is empty
    (``k = V``) or has probability 0 (every id outside the top-k is ``-inf``) is all padding and
    has no counts.

    Works in chunks of rows whose fp32 ``[rows, V]`` temporaries stay under ``CHUNK_BYTES``.
    """
    temperature = check_temperature(temperature)
    draws = _check_draws(draws)
    _check_rows(logits, topk_ids)
    return _draw_rows(logits, topk_ids, [(temperature, draws, False)], generator, bytes_per_logit=8)


def split_draws(draws: int, temperatures) -> tuple[int, ...]:
    """The ``temperature-mixture`` split of ``M`` draws over the captured temperatures (in their
    order): ``M // nT`` each, the first ``M % nT`` one more (so some get none when ``M < nT``)."""
    draws, n = _check_draws(draws), len(temperatures)
    if n == 0:
        raise ValueError("temperatures is empty: pass the captured temperatures")
    return tuple(draws // n + (1 if j < draws % n else 0) for j in range(n))


@torch.no_grad()
def draw_mixture(logits, topk_ids, *, temperatures, draws, generator) -> Samples:
    """The ``temperature-mixture`` draws: :func:`split_draws` of ``draws`` over ``temperatures``, each
    share drawn stratified from ``softmax(logits / T_j)`` outside the top-k, pooled into unique ids.

    Same arguments and result as :func:`draw_samples` (``temperatures``: the captured ones, in the
    cache's order, instead of one ``temperature``); the draws of a row depend on the generator's
    state, as there. Weights: :func:`mixture_weights`.
    """
    temperatures = [check_temperature(t) for t in temperatures]
    shares = [(t, m, True) for t, m in zip(temperatures, split_draws(draws, temperatures)) if m]
    _check_rows(logits, topk_ids)
    return _draw_rows(logits, topk_ids, shares, generator, bytes_per_logit=8)


@torch.no_grad()
def sample_weights(sample_logits, counts, *, logsumexp, logsumexp_t0, tail_logprob_t0, temperature,
                   sample_temperature, draws) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs and importance weights at the sampled ids for one captured temperature ``T``.

    Args:
        sample_logits: [N, M] the stored ``z - max z`` at the sampled ids (fp32).
        counts: [N, M] draws of each id; 0 marks a padding slot.
        logsumexp: [N] ``lse_T = log sum_v exp((z_v - max z) / T)`` at the captured ``T``.
        logsumexp_t0: [N] the same at the sampling temperature ``T0``.
        tail_logprob_t0: [N] log of the teacher's mass outside the top-k at ``T0`` (0 when k = 0).
        temperature: ``T``; sample_temperature: ``T0``; draws: ``M``.

    Returns: ``(log_p, weights)``, fp32 ``[N, M]`` each: ``log p_T`` at the ids (``-inf`` at padding) and
    ``w = count / M * p_T / pi`` (0 at padding), so that ``sum_i w_i f(i)`` estimates the tail sum
    ``sum_{v not in S} p_T(v) f(v)`` without bias. At ``T = T0`` the weight is ``count / M * r_T0``.
    The arithmetic is in fp64.
    """
    t, t0 = check_temperature(temperature), check_temperature(sample_temperature)
    draws = _check_draws(draws)
    if sample_logits.dim() != 2 or counts.shape != sample_logits.shape:
        raise ValueError(f"sample_logits {tuple(sample_logits.shape)} and counts {tuple(counts.shape)}: "
                         "pass two [N, M] tensors of the same shape")
    n = sample_logits.shape[0]
    for name, x in (("logsumexp", logsumexp), ("logsumexp_t0", logsumexp_t0), ("tail_logprob_t0", tail_logprob_t0)):
        if x.shape != (n,):
            raise ValueError(f"{name} has shape {tuple(x.shape)}: pass shape [N] with N={n} (one value per position)")
    z = sample_logits.double()
    log_p = z / t - logsumexp.double()[:, None]
    # log p_T - log pi, grouped so that it is exactly tail_logprob_t0 at T = T0 (lse_T = lse_T0)
    log_ratio = (z / t - z / t0) + (logsumexp_t0.double() + tail_logprob_t0.double() - logsumexp.double())[:, None]
    real = counts > 0
    weights = torch.where(real, counts.double() / draws * log_ratio.exp(), 0.0)
    return log_p.masked_fill(~real, _NEG_INF).float(), weights.float()


@torch.no_grad()
def mixture_weights(sample_logits, counts, *, logsumexp, tail_logprob, temperatures, temperature_index,
                    draws) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_weights` for ``temperature-mixture`` draws (:func:`draw_mixture`).

    Args:
        sample_logits, counts: [N, M] as for :func:`sample_weights`.
        logsumexp, tail_logprob: [N, nT] ``lse_T`` and the log tail mass outside the top-k (0 when k = 0)
            at every captured temperature, in the order of ``temperatures``.
        temperature_index: which of ``temperatures`` the log-probs and weights are for; draws: ``M``.

    Returns: ``(log_p, weights)`` fp32 ``[N, M]``: ``log p_T`` (``-inf`` at padding) and
    ``w = count / M * p_T / pi_mix`` (0 at padding), ``pi_mix = sum_j (M_j / M) p_Tj / r_Tj`` on the
    tail. Unbiased for the tail sum at every captured ``T``. fp64 arithmetic.
    """
    temperatures = [check_temperature(t) for t in temperatures]
    shares = split_draws(draws, temperatures)
    if sample_logits.dim() != 2 or counts.shape != sample_logits.shape:
        raise ValueError(f"sample_logits {tuple(sample_logits.shape)} and counts {tuple(counts.shape)}: "
                         "pass two [N, M] tensors of the same shape")
    shape = (sample_logits.shape[0], len(temperatures))
    for name, x in (("logsumexp", logsumexp), ("tail_logprob", tail_logprob)):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: pass {shape} (one value per position and temperature)")
    if not 0 <= temperature_index < len(temperatures):
        raise ValueError(f"temperature_index={temperature_index} is invalid: pass 0 .. {len(temperatures) - 1}")
    z, lse, tail = sample_logits.double(), logsumexp.double(), tail_logprob.double()
    log_pi = torch.stack([math.log(m / draws) + z / t - (lse[:, j] + tail[:, j])[:, None]
                          for j, (t, m) in enumerate(zip(temperatures, shares)) if m]).logsumexp(dim=0)  # [N, M]
    j = temperature_index
    log_p = z / temperatures[j] - lse[:, j, None]
    real = counts > 0
    weights = torch.where(real, counts.double() / draws * (log_p - log_pi).exp(), 0.0)
    return log_p.masked_fill(~real, _NEG_INF).float(), weights.float()


def draw_weights(sample_logits, counts, *, logsumexp, tail_logprob, temperatures, temperature_index, draws,
                 scheme, sample_temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_p, weights)`` at captured temperature ``temperatures[temperature_index]`` for draws made
    by ``scheme`` (``None`` or ``"one-temperature"``: at ``sample_temperature``; ``"temperature-mixture"``).
    ``logsumexp``, ``tail_logprob``: ``[N, nT]``, every captured temperature (see :func:`mixture_weights`)."""
    if scheme == "temperature-mixture":
        return mixture_weights(sample_logits, counts, logsumexp=logsumexp, tail_logprob=tail_logprob,
                               temperatures=temperatures, temperature_index=temperature_index, draws=draws)
    if scheme not in (None, "one-temperature"):
        raise ValueError(f"scheme={scheme!r} is invalid: pass one of {SCHEMES}")
    j0 = [math.isclose(t, sample_temperature, rel_tol=1e-6) for t in temperatures].index(True)
    return sample_weights(sample_logits, counts, logsumexp=logsumexp[:, temperature_index],
                          logsumexp_t0=logsumexp[:, j0], tail_logprob_t0=tail_logprob[:, j0],
                          temperature=temperatures[temperature_index], sample_temperature=sample_temperature,
                          draws=draws)


def describe_draws(draws: int, *, sample_temperature, temperatures) -> str:
    """For people: ``16 draws at T=1`` or ``16 draws split over T=1, 2, 4 (6/5/5)``."""
    if sample_temperature is not None:
        return f"{draws} draws at T={sample_temperature:g}"
    split = "/".join(str(m) for m in split_draws(draws, temperatures))
    return f"{draws} draws split over T={', '.join(f'{t:g}' for t in temperatures)} ({split})"
