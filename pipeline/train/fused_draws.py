"""The fused lm-head's chunk step for sampled and mixed teacher targets (the unbiased estimator).

:mod:`kdpipe.pipeline.train.fused_kd` walks over chunks of rows; for targets with draws it hands each
chunk's fp32 logits to :func:`chunk_gradient_draws`, which computes that chunk's share of
``losses.sampled_kd_loss`` (and of the hard-label CE) and, in place, the gradient of the total loss
with respect to the logits.

Mathematics. For one row let ``x`` be the logits, ``s = x / T``, ``lse = logsumexp(s)`` and the slots
``j`` the exact top-k ids followed by the drawn ids (``ids_j``), with weights ``w_j`` (``p_T`` itself at
the top-k, the importance weights at the draws) and teacher ``log p_j``. The estimate is
``D = sum_j w_j (log p_j - log t_j)`` with ``t = q`` (forward-kl) or ``lam p + (1 - lam) q`` (skew-kl)
and ``log q_j = s_{ids_j} - lse``. With ``g_j = dD / d log q_j`` (autograd on the tiny ``[rows, k+m]``
slot tensors, through ``losses._weighted_log_ratio`` itself, so both kinds and the padding conventions
are the unfused code's) and ``G = sum_j g_j``::

    dD/ds_v = sum_{j: ids_j = v} g_j - G softmax(s)_v

and ``dD/dx = dD/ds / T``. Only the student's log-probabilities at the slots and its log-normaliser
enter: one exponential of the row (relative to its maximum) gives both, and the gradient is a per-row
multiple of that exponential plus a scatter at the slots. Hard-label CE adds ``softmax(x)_v - [v = y]``
(at T = 1: the same exponential when T = 1, a second buffer otherwise).
"""

from __future__ import annotations

import torch

from kdpipe.pipeline.train.losses import _weighted_log_ratio


def tempered_exp(x, shift, temperature: float, *, out):
    """``exp((x - shift[:, None]) / T)`` [r, V] into ``out`` (which may be ``x``): one pass for the shift and
    the scale, one for the exponential."""
    if temperature == 1.0:
        torch.sub(x, shift[:, None], out=out)
    else:
        torch.add(shift[:, None] * (-1.0 / temperature), x, alpha=1.0 / temperature, out=out)
    return out.exp_()


def untempered_exp(e_t, x, shift, temperature: float):
    """``exp(x - shift[:, None])`` into ``x`` (the logits, unchanged so far), given
    ``e_t = tempered_exp(x, shift, temperature)`` in another buffer: for T = 2, 3, 4 the T-th power of
    ``e_t`` by one or two multiplications (several times cheaper than ``exp`` on a CPU; relative error a
    few fp32 ulps; values below ~1e-38 may flush to 0, which no sum >= 1 can see), else ``exp``."""
    if temperature in (2.0, 3.0, 4.0):
        torch.mul(e_t, e_t, out=x)
        return x.mul_(e_t) if temperature == 3.0 else x.mul_(x) if temperature == 4.0 else x
    return x.sub_(shift[:, None]).exp_()


def draw_slots(ids, logprobs, weights, vocab: int):
    """The estimator's slots for a head of ``vocab`` rows: ``(ids, logprobs, weights)`` [N, k+m].

    An id ``>= vocab`` (a teacher with a padded vocabulary) is dropped as ``targets.fold_padded_vocab``
    drops it (weight 0, ``log p = -inf``: it adds exactly 0) and replaced by id 0, so that gathers and
    scatters on ``[rows, vocab]`` stay in range (it scatters an exact 0).
    """
    outside = ids >= vocab
    if not bool(outside.any()):
        return ids, logprobs, weights
    return (ids.masked_fill(outside, 0), logprobs.masked_fill(outside, float("-inf")),
            weights.masked_fill(outside, 0.0))


def chunk_gradient_draws(x, e, *, temperature: float, kind: str, skew_lambda: float, sel, per_kd, per_ce, kd, ce):
    """Turn one chunk of fp32 logits ``x`` [r, V] into d loss / d logits, in place; record per-row values.

    Returns ``x`` overwritten, or ``e`` [r, V] (a second buffer, given when CE runs too at T != 1).
    ``kd = (ids [r, k+m], log_p [r, k+m], weights [r, k+m], rows [r] bool, weight [r])`` (slots from
    :func:`draw_slots`; ``weight`` the per-row d loss / d estimate); ``ce = (labels [r] (valid ids),
    rows [r] bool, weight [r])`` or None. ``per_kd`` / ``per_ce`` [N] receive the rows' estimate /
    cross-entropy at ``sel``.
    """
    T = temperature
    ids, log_p, weights, kd_rows, w_kd = kd
    if ce is not None:
        labels, ce_rows, w_ce = ce
        xy = x.gather(1, labels[:, None]).squeeze(1)  # [r] the label's logit
    xs = x.gather(1, ids)  # [r, k+m] logits at the slots, before x is overwritten
    m = x.amax(dim=1)  # [r]; every log-sum is taken relative to the row's maximum
    m = torch.where(torch.isfinite(m), m, 0.0)
    both_t1 = ce is not None and T == 1.0  # one exponential serves both terms

    e_t = tempered_exp(x, m, T, out=x if e is None else e)  # softmax(s) = e_t / z
    z = e_t.sum(1)  # [r], >= 1 (the maximum gives exp(0))
    log_q = (xs - m[:, None]) / T - z.log()[:, None]  # [r, k+m] the student's log q_T at the slots
    with torch.enable_grad():
        lq = log_q.detach().requires_grad_(True)
        estimate = _weighted_log_ratio(weights, log_p, lq, kind, skew_lambda)  # [r], the unfused code's own
        (g,) = torch.autograd.grad((estimate * w_kd).sum(), lq)  # [r, k+m] d loss / d log q at the slots
    per_kd[sel] = estimate.detach()
    g = torch.where(kd_rows[:, None], g, 0.0)  # masked rows: exactly zero, whatever they hold
    c_kd = -g.sum(1) / z / T  # per-row factor of e_t
    at_slots = g / T  # [r, k+m] added at the slots' columns

    if ce is not None:
        if both_t1:
            e_1, z1 = e_t, z
        else:  # x still holds the logits: e_t went to the second buffer
            e_1 = untempered_exp(e_t, x, m, T)
            z1 = e_1.sum(1)
        per_ce[sel] = torch.where(ce_rows, z1.log() - (xy - m), 0.0)
        c_ce = torch.where(ce_rows, w_ce / z1, 0.0)

    if ce is None:
        out = e_t.mul_(c_kd[:, None])
    elif both_t1:
        out = e_t.mul_((c_kd + c_ce)[:, None])
    else:
        out = e_t.mul_(c_kd[:, None]).addcmul_(e_1, c_ce[:, None])
    out.scatter_add_(1, ids, at_slots)  # duplicate or dropped slots add their own (zero) share
    if ce is not None:
        out.scatter_add_(1, labels[:, None], -w_ce[:, None])
    return out
