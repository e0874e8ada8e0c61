"""Distillation losses on cached sparse teacher targets (top-k + tail bucket) and dense references.

Sparse targets use the (k+1)-bin view of docs/THEORY.md section 3: the teacher's top-k set ``S`` plus one
"tail" class holding the rest of the vocabulary. Teacher ``p~ = (p_T(S), r_T)`` comes from the cache
as log-probabilities; the student's ``q~ = (q_T(S), q_tail)`` is built here from raw logits, in log
space, with ``log q_tail = logsumexp(s_notS / T) - logsumexp(s / T)``.

Conventions: all divergences are per position over the last dim, use ``0 * log 0 = 0`` (bins where
the weighting distribution is exactly 0 contribute 0 to the value and the gradient), are computed
in fp32 and are reported as ``T**2 * mean over counted positions``.

Vocabulary sizes: these functions take the student's logits as given (``V`` columns, every id and label
``< V``). The policy for a student whose vocabulary differs from the teacher's (extra logits masked
out, a smaller one refused) is :func:`kdpipe.pipeline.train.targets.apply_vocab_policy`, which the
library's loss (``kdpipe.distillation_loss``) and ``train-student`` apply before calling them.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from kdpipe.pipeline.cache.schema import check_temperature

KINDS = ("forward-kl", "reverse-kl", "js", "tvd", "skew-kl")
# Floor for the teacher's tail-bin log-prob in sparse reverse KL (see sparse_kd_loss).
TAIL_LOGPROB_FLOOR = math.log(1e-12)
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- validation
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind={kind!r}: use one of {', '.join(KINDS)}")


def _check_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} is invalid: pass a number in the range [0, 1]")
    return float(value)


def _check_rows(name: str, t: torch.Tensor, n: int, ndim: int) -> None:
    if t.dim() != ndim or t.shape[0] != n:
        want = "[N]" if ndim == 1 else "[N, ...]"
        raise ValueError(f"{name} has shape {tuple(t.shape)}: pass shape {want} with N={n} (one row per position)")


def _check_student_logits(student_logits: torch.Tensor) -> tuple[int, int]:
    """``(N, V)`` of raw student logits, which must be ``[N, V]``."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits has shape {tuple(student_logits.shape)}: pass [N, V] (flatten batch/time first)")
    return tuple(student_logits.shape)


def _check_mask(mask, n: int):
    if mask is None:
        return None
    _check_rows("mask", mask, n, 1)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask has dtype {mask.dtype}: pass a torch.bool tensor (e.g. mask.bool())")
    return mask


def _check_labels(labels: torch.Tensor, n: int) -> None:
    _check_rows("labels", labels, n, 1)
    if labels.dtype != torch.int64:
        raise ValueError(f"labels has dtype {labels.dtype}: pass int64 class ids (e.g. labels.long())")


def _check_sparse_targets(topk_ids, teacher_topk_logprobs, teacher_tail_logprob, n: int) -> None:
    """Cached targets of ``n`` positions: ids [n, k] int64, log-probs [n, k], tail log-prob [n]."""
    _check_rows("topk_ids", topk_ids, n, 2)
    if topk_ids.dtype != torch.int64:
        raise ValueError(f"topk_ids has dtype {topk_ids.dtype}: pass int64 ids (e.g. topk_ids.long())")
    if teacher_topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"teacher_topk_logprobs has shape {tuple(teacher_topk_logprobs.shape)}: "
                         f"pass the same shape as topk_ids {tuple(topk_ids.shape)}")
    _check_rows("teacher_tail_logprob", teacher_tail_logprob, n, 1)


# ----------------------------------------------------------------------------- log-space helpers
def _scaled_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` in fp32 with at most one new [N, V] tensor; never modifies ``logits``."""
    if logits.dtype == torch.float32:
        return logits if temperature == 1.0 else logits / temperature
    out = logits.float()  # a fresh copy, safe to scale in place
    return out if temperature == 1.0 else out.div_(temperature)


def _safe_logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp a + exp b)`` with finite gradients where both are -inf (result -inf)."""
    both = (a == _NEG_INF) & (b == _NEG_INF)
    out = torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0))
    return out.masked_fill(both, _NEG_INF)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``sum a (log a - log b)`` over the last dim, with ``0 log 0 = 0`` (no NaN in value or grad)."""
    pos = log_a != _NEG_INF
    la = log_a.masked_fill(~pos, 0.0)
    lb = log_b.masked_fill(~pos, 0.0)
    return torch.where(pos, la.exp() * (la - lb), 0.0).sum(-1)


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, skew_lambda: float) -> torch.Tensor:
    """Per-position divergence between teacher ``p`` and student ``q``, both log-probs [N, B] -> [N]."""
    if kind == "forward-kl":
        return _kl(log_p, log_q)
    if kind == "reverse-kl":
        return _kl(log_q, log_p)
    if kind == "js":
        log_m = _safe_logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    # skew-kl: KL(p || lam p + (1 - lam) q)
    log_lam = math.log(skew_lambda) if skew_lambda > 0 else _NEG_INF
    log_1m = math.log1p(-skew_lambda) if skew_lambda < 1 else _NEG_INF
    return _kl(log_p, _safe_logaddexp(log_p + log_lam, log_q + log_1m))


def _reduce(per_pos: torch.Tensor, mask, temperature: float) -> torch.Tensor:
    """``T**2 * mean`` over positions where ``mask`` is True; 0 (with a grad_fn) if none are."""
    if mask is None:
        return temperature ** 2 * per_pos.mean()
    total = torch.where(mask, per_pos, 0.0).sum()  # where: masked rows get exactly zero gradient
    return temperature ** 2 * total / mask.sum().clamp_min(1)


def student_bin_logprobs(student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Student log-probs on the (k+1)-bin view: [N, V] raw logits, [N, k] ids -> [N, k+1] log-probs.

    Column ``j < k`` is ``log q_T(topk_ids[:, j])``; the last column is ``log q_tail`` (``-inf`` when the
    tail is empty, e.g. k = V, with zero gradient). Allocates at most two [N, V] fp32 temporaries
    besides the ones ``logsumexp`` makes.

    Numerics: the row maximum ``m`` of ``s = logits / T`` is subtracted (detached: every log-prob is
    invariant to it, so the gradient is unchanged) before anything else, and both log-sums are taken
    of ``s - m``. Subtracting a large ``logsumexp(s)`` from a large ``s_i`` instead would round at the
    scale of ``|s|`` (about 1.5e-5 at logits of magnitude 100-250) where ``log_softmax`` rounds at the
    scale of ``|s_i - m|``, i.e. exactly near the top of the distribution.
    """
    s = _scaled_fp32(student_logits, temperature)
    with torch.no_grad():
        m = s.amax(dim=-1, keepdim=True)  # [N, 1]
        m.masked_fill_(~torch.isfinite(m), 0.0)  # an all -inf (or +inf) row: leave it as it is
    # s is a fresh tensor unless it is the caller's own fp32 logits at T = 1: then take a copy
    shifted = s - m if s is student_logits else s.sub_(m)  # [N, V], max 0
    lse = torch.logsumexp(shifted, dim=-1, keepdim=True)  # [N, 1], in [0, log V]
    top = shifted.gather(1, topk_ids) - lse  # [N, k]
    rest = shifted.scatter(1, topk_ids, _NEG_INF)  # [N, V]: top-k columns removed
    with torch.no_grad():
        empty = rest.amax(dim=-1, keepdim=True) == _NEG_INF  # [N, 1]: nothing left in the tail
    rest.masked_fill_(empty, 0.0)  # keep logsumexp's backward finite on empty rows
    tail = torch.logsumexp(rest, dim=-1, keepdim=True).masked_fill(empty, _NEG_INF) - lse
    return torch.cat([top, tail], dim=-1)


# ----------------------------------------------------------------------------- public losses
def sparse_kd_loss(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, *,
                   temperature, kind="forward-kl", mask=None, skew_lambda=0.1) -> torch.Tensor:
    """KD loss against cached sparse teacher targets, on the (k+1)-bin (top-k + tail) view.

    Args:
        student_logits: [N, V] raw student logits (any float dtype; computed in fp32).
        topk_ids: [N, k] int64 vocabulary ids of the teacher's top-k set S (distinct per row, k <= V).
        teacher_topk_logprobs: [N, k] teacher log-probs ``log p_T(i)`` at temperature T for i in S.
        teacher_tail_logprob: [N] teacher log tail mass ``log(1 - sum_S p_T)``; ``-inf`` if empty.
        temperature: T > 0, the temperature the cached log-probs were computed at.
        kind: "forward-kl" KL(p~||q~), "reverse-kl" KL(q~||p~), "js" (Jensen-Shannon, nats),
            "tvd" (1/2 sum |p~ - q~|), or "skew-kl" KL(p~ || lam p~ + (1-lam) q~) with lam=skew_lambda.
        mask: optional [N] bool, True for positions that count. Masked-out rows are still computed
            (vectorised) but do not enter the value and receive exactly zero gradient.

    Returns: scalar ``T**2 * mean over counted positions``; an exact 0 (still connected to
    ``student_logits``) when the mask selects nothing.

    Reverse KL: the teacher's tail-bin log-prob is floored at ``TAIL_LOGPROB_FLOOR = log(1e-12)``, so a
    tail the cache rounded to 0 (``-inf``) costs a large but finite penalty instead of +inf when the
    student puts mass there. Top-k bins are not floored. When the tail is truly empty (k = V) the
    student's tail is empty too, the bin contributes 0, and sparse equals dense exactly.
    """
    temperature = check_temperature(temperature)
    _check_kind(kind)
    skew_lambda = _check_unit("skew_lambda", skew_lambda)
    n, v = _check_student_logits(student_logits)
    _check_sparse_targets(topk_ids, teacher_topk_logprobs, teacher_tail_logprob, n)
    if topk_ids.shape[1] > v:
        raise ValueError(f"topk_ids has k={topk_ids.shape[1]} > V={v}: pass at most V distinct ids per row")
    mask = _check_mask(mask, n)

    log_q = student_bin_logprobs(student_logits, topk_ids.to(student_logits.device), temperature)
    tail = teacher_tail_logprob.float().unsqueeze(-1)
    if kind == "reverse-kl":
        tail = tail.clamp_min(TAIL_LOGPROB_FLOOR)
    log_p = torch.cat([teacher_topk_logprobs.float(), tail], dim=-1)
    return _reduce(_divergence(log_p, log_q, kind, skew_lambda), mask, temperature)


def dense_kd_loss(student_logits, teacher_logits, *, temperature, kind="forward-kl", mask=None,
                  skew_lambda=0.1) -> torch.Tensor:
    """Full-vocabulary reference: same kinds, T**2 scaling and masking as ``sparse_kd_loss``.

    student_logits, teacher_logits: [N, V] raw logits (any float dtype; computed in fp32).
    mask: optional [N] bool. Returns a scalar. No flooring: reverse KL is +inf where the teacher has
    probability exactly 0 and the student does not. Meant for tests and online KD (it allocates
    several [N, V] temporaries).
    """
    temperature = check_temperature(temperature)
    _check_kind(kind)
    skew_lambda = _check_unit("skew_lambda", skew_lambda)
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)}: pass two [N, V] tensors of the same shape")
    mask = _check_mask(mask, student_logits.shape[0])
    log_q = F.log_softmax(_scaled_fp32(student_logits, temperature), dim=-1)
    log_p = F.log_softmax(_scaled_fp32(teacher_logits, temperature), dim=-1)
    return _reduce(_divergence(log_p, log_q, kind, skew_lambda), mask, temperature)


def hard_label_ce(student_logits, labels, *, mask=None, ignore_index=-100) -> torch.Tensor:
    """Mean cross-entropy at T = 1 over valid positions (``labels != ignore_index`` and ``mask``).

    student_logits: [N, V] raw logits (computed in fp32); labels: [N] int64 class ids; mask: [N] bool.
    Returns a scalar; 0 (with a grad_fn) when no position is valid.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits has shape {tuple(student_logits.shape)}: pass [N, V] (flatten batch/time first)")
    n = student_logits.shape[0]
    _check_labels(labels, n)
    mask = _check_mask(mask, n)
    if mask is not None:
        labels = labels.masked_fill(~mask, ignore_index)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= student_logits.shape[1]))
    if bool(bad.any()):  # F.cross_entropy would fail with an index error (a device-side assert on CUDA)
        raise ValueError(f"labels hold ids outside 0..{student_logits.shape[1] - 1} (the student's vocabulary), e.g. "
                         f"{int(labels[bad][0])}; use ignore_index={ignore_index} for positions without a label")
    total = F.cross_entropy(student_logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def distillation_loss(student_logits, labels, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, *,
                      alpha, temperature, kind="forward-kl", kd_mask=None, ce_mask=None,
                      skew_lambda=0.1, ignore_index=-100) -> dict:
    """``{"loss": alpha * kd + (1 - alpha) * ce, "kd": kd, "ce": ce}`` (scalars).

    ``kd`` is ``sparse_kd_loss`` (already T**2-scaled) on the cached targets with ``kd_mask``; ``ce`` is
    ``hard_label_ce`` at T = 1 on ``labels`` [N] with ``ce_mask``. Shapes as in those functions.
    A term whose weight is exactly 0 is not computed and is returned as a zero tensor.
    """
    alpha = _check_unit("alpha", alpha)
    temperature = check_temperature(temperature)
    _check_kind(kind)
    zero = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    kd = zero if alpha == 0.0 else sparse_kd_loss(
        student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
        temperature=temperature, kind=kind, mask=kd_mask, skew_lambda=skew_lambda)
    ce = zero if alpha == 1.0 else hard_label_ce(student_logits, labels, mask=ce_mask, ignore_index=ignore_index)
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}


# ----------------------------------------------------------------------------- sampled targets
# Divergences that are expectations under the teacher p, hence estimable from draws of p
# (pipeline.cache.sampling); reverse KL, JS and TVD need p where the student puts mass.
SAMPLED_KINDS = ("forward-kl", "skew-kl")


def _check_sampled_kind(kind) -> None:
    if kind not in SAMPLED_KINDS:
        raise ValueError(f"loss kind {kind!r} is not defined on sampled targets (the samples give the teacher's "
                         f"probabilities only where the teacher puts mass): use one of {', '.join(SAMPLED_KINDS)}, "
                         "or sparse_kd_loss on the top-k + tail bins of a mixed capture")


def _check_id_rows(name: str, ids: torch.Tensor, n: int) -> None:
    _check_rows(name, ids, n, 2)
    if ids.dtype != torch.int64:
        raise ValueError(f"{name} has dtype {ids.dtype}: pass int64 ids (e.g. {name}.long())")


def _check_sampled_targets(topk_ids, teacher_topk_logprobs, sample_ids, sample_logprobs, sample_weights, n: int) -> None:
    """Sampled targets of ``n`` positions: top-k ids and log-probs [n, k] (k may be 0), drawn ids,
    their log-probs and weights [n, m]."""
    _check_id_rows("topk_ids", topk_ids, n)
    if teacher_topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"teacher_topk_logprobs has shape {tuple(teacher_topk_logprobs.shape)}: "
                         f"pass the same shape as topk_ids {tuple(topk_ids.shape)}")
    _check_id_rows("sample_ids", sample_ids, n)
    for name, t in (("sample_logprobs", sample_logprobs), ("sample_weights", sample_weights)):
        if t is None or t.shape != sample_ids.shape:
            shape = None if t is None else tuple(t.shape)
            raise ValueError(f"{name} has shape {shape}: pass the same shape as sample_ids {tuple(sample_ids.shape)}")


def _student_logprobs_at(student_logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log q_T`` at ``ids [N, n]`` from raw logits ``[N, V]``, with the numerics of
    ``student_bin_logprobs`` (shift by the detached row max first; at most two [N, V] fp32 temporaries)."""
    s = _scaled_fp32(student_logits, temperature)
    with torch.no_grad():
        m = s.amax(dim=-1, keepdim=True)
        m.masked_fill_(~torch.isfinite(m), 0.0)
    shifted = s - m if s is student_logits else s.sub_(m)  # never modify the caller's logits
    return shifted.gather(1, ids) - torch.logsumexp(shifted, dim=-1, keepdim=True)


def _weighted_log_ratio(weights, log_p, log_q, kind: str, skew_lambda: float) -> torch.Tensor:
    """``sum_j w_j (log p_j - log t_j)`` over the last dim, ``t = q`` (forward-kl) or ``lam p + (1-lam) q``
    (skew-kl). Slots with ``w_j = 0`` or ``log p_j = -inf`` (padding) add exactly 0 to value and gradient."""
    pos = (weights > 0) & (log_p != _NEG_INF)
    log_p = log_p.masked_fill(~pos, 0.0)
    if kind == "skew-kl":
        log_lam = math.log(skew_lambda) if skew_lambda > 0 else _NEG_INF
        log_1m = math.log1p(-skew_lambda) if skew_lambda < 1 else _NEG_INF
        log_q = _safe_logaddexp(log_p + log_lam, log_q + log_1m)
    return torch.where(pos, weights * (log_p - log_q), 0.0).sum(-1)


def sampled_kd_loss(student_logits, topk_ids, teacher_topk_logprobs, sample_ids, sample_logprobs, sample_weights, *,
                    temperature, kind="forward-kl", mask=None, skew_lambda=0.1) -> torch.Tensor:
    """Unbiased KD loss against sampled (``k = 0``) or mixed (exact top-k + sampled tail) teacher targets.

    Per position the estimate is
    ``D = sum_{i in S} p_T(i) (log p_T(i) - log t(i)) + sum_j w_j (log p_T(j) - log t(j))`` with ``t = q_T``
    (forward-kl) or ``t = lam p_T + (1 - lam) q_T`` (skew-kl, ``lam = skew_lambda``). With the importance
    weights of ``pipeline.cache.sampling.sample_weights``, ``E[D]`` is the dense divergence over the whole
    vocabulary and ``E[grad D]`` its gradient. Reverse KL, JS and TVD are refused (ValueError).

    Args:
        student_logits: [N, V] raw student logits (any float dtype; computed in fp32).
        topk_ids: [N, k] int64 ids of the exact top-k set S (k may be 0).
        teacher_topk_logprobs: [N, k] teacher log-probs ``log p_T`` at ``topk_ids``.
        sample_ids: [N, M] int64 sampled ids (outside S); padding slots may hold any valid id.
        sample_logprobs: [N, M] teacher log-probs ``log p_T`` at ``sample_ids`` (``-inf`` at padding).
        sample_weights: [N, M] importance weights ``count / M * p_T / pi`` (0 at padding).
        temperature: ``T > 0``, the temperature of the teacher log-probs and weights.
        mask: optional [N] bool, True for positions that count (others get exactly zero gradient).

    Returns: scalar ``T**2 * mean over counted positions`` (0, connected to ``student_logits``, if none).
    """
    temperature = check_temperature(temperature)
    _check_sampled_kind(kind)
    skew_lambda = _check_unit("skew_lambda", skew_lambda)
    n, v = _check_student_logits(student_logits)
    _check_sampled_targets(topk_ids, teacher_topk_logprobs, sample_ids, sample_logprobs, sample_weights, n)
    if topk_ids.shape[1] > v:
        raise ValueError(f"topk_ids has k={topk_ids.shape[1]} > V={v}: pass at most V distinct ids per row")
    mask = _check_mask(mask, n)

    ids = torch.cat([topk_ids, sample_ids], dim=1).to(student_logits.device)
    log_q = _student_logprobs_at(student_logits, ids, temperature)  # [N, k + M]
    top = teacher_topk_logprobs.float()
    log_p = torch.cat([top, sample_logprobs.float()], dim=1)
    weights = torch.cat([top.exp(), sample_weights.float()], dim=1)  # the exact head weighs by p_T itself
    return _reduce(_weighted_log_ratio(weights, log_p, log_q, kind, skew_lambda), mask, temperature)
