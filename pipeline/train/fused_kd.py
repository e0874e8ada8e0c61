"""Fused lm-head + sparse distillation loss: the student's ``[N, V]`` logits never exist.

``fused_linear_distillation_loss(hidden, head_weight, ...)`` computes exactly what
``losses.distillation_loss(hidden @ head_weight.T + head_bias, ...)`` computes (same (k+1)-bin view,
kinds, conventions, masks and reductions; docs/THEORY.md section 3), and the gradients with respect to
``hidden``, ``head_weight`` and ``head_bias``, by walking over chunks of rows: each chunk's logits
``[rows, V]`` are made, turned into that chunk's share of the loss and, at once, into the gradient of
the total loss with respect to those logits, which is pushed through the head (``dlogits @ W`` and
``dlogits.T @ hidden``) before the next chunk reuses the same buffers. The backward pass only scales
the gradients kept from the forward by the incoming gradient.

Mathematics of the per-chunk gradient. For one row let ``x`` be the logits, ``s = x / T``, ``S`` the
teacher's top-k ids, ``lse = logsumexp(s)`` and ``lse_rest = logsumexp(s over ids not in S)``. The
student's bins are ``log q_j = s_{S_j} - lse`` and ``log q_tail = lse_rest - lse``. With
``g_b = d D / d log q_b`` for the chosen divergence ``D`` (obtained by autograd on the tiny
``[rows, k+1]`` bin tensors, through ``losses._divergence`` itself, so every kind and every
``0 log 0 = 0`` convention is the unfused code's) and ``G = sum_b g_b``::

    dD/ds_v = g_j - G q_v                                   for v = S_j
    dD/ds_v = (g_tail - G q_tail) * exp(s_v - lse_rest)     for v not in S

and ``dD/dx = dD/ds / T``. The tail factor is written with ``exp(s_v - lse_rest) <= 1`` and
``q_tail <= 1``, so it stays finite where ``q_tail`` underflows. Hard-label CE adds
``softmax(x)_v - [v = label]`` (at T = 1). Spaces: ``x`` raw logits, ``s`` tempered logits, the bins
and divergences in log-probability space, all fp32. The tail's exponentials are taken relative to the
tail's own maximum, every log-sum and the top-k bins relative to the row's maximum, so the bins are
as exact as ``log_softmax`` (see ``losses.student_bin_logprobs``) and a tail far below the head
(``q_tail`` ~ exp(-1e4)) keeps a finite log.

Targets with draws (a sampled or mixed cache, ``sample_ids=...``): the KD term is the unbiased
estimator of ``losses.sampled_kd_loss``, which needs the student's log-probabilities only at the
top-k and drawn ids and its log-normaliser; each chunk goes to
:func:`kdpipe.pipeline.train.fused_draws.chunk_gradient_draws` (same buffers, same memory bound).

Memory: per chunk one ``[rows, V]`` fp32 buffer for the logits and, when both terms run at ``T != 1``,
a second one (the two exponentials ``exp((x - m) / T)`` and ``exp(x - m)``); both are allocated once
per call and reused by every chunk. Rows that count for neither term (padding) are skipped. Besides them: the ``[V, H]`` fp32 gradient of the head (the size
of the weight's own ``.grad``), ``[N, H]`` for the hidden states, ``[N, k]`` target tensors. Under
autocast the matmuls run in the autocast dtype (as ``nn.Linear`` would), which adds a half-size copy of
the gradient chunk and of the weight.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing

import torch

from kdpipe.pipeline.cache.schema import check_temperature
from kdpipe.pipeline.train.fused_draws import chunk_gradient_draws, draw_slots, tempered_exp, untempered_exp
from kdpipe.pipeline.train.losses import (
    TAIL_LOGPROB_FLOOR,
    _check_kind,
    _check_labels,
    _check_mask,
    _check_sampled_kind,
    _check_sampled_targets,
    _check_sparse_targets,
    _check_unit,
    _divergence,
)

_NEG_INF = float("-inf")
# Default chunk: rows such that one [rows, V] fp32 buffer is about this big (152k vocabulary: 220 rows).
DEFAULT_CHUNK_BYTES = 128 * 2**20


@dataclasses.dataclass(frozen=True)
class _Config:
    alpha: float
    temperature: float
    kind: str
    skew_lambda: float
    ignore_index: int
    chunk_rows: int | None
    grad: bool  # False under torch.no_grad() (evaluation): values only, no gradient matmuls


def output_head(model: torch.nn.Module):
    """``(weight [V, H], bias [V] or None)`` of a model's output layer when the fused loss applies, else None.

    Applies to models whose ``get_output_embeddings()`` (Hugging Face causal LMs) is a plain
    ``nn.Linear`` and whose logits are that layer's output unchanged: a config with a final logit
    soft-cap or a logit scale (Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``,
    Granite's ``logits_scaling``) makes the logits something else, and gets None.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        return None
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None:
        return None
    for name in ("logit_scale", "logits_scaling"):
        scale = getattr(config, name, None)
        if scale is not None and scale != 1:
            return None
    return head.weight, head.bias


class BodyAndHead(typing.NamedTuple):
    """A causal LM split where its lm-head reads: ``body(input_ids=..., attention_mask=...)`` returns the
    hidden states (``.last_hidden_state`` / ``[0]``, ``[B, P, H]``) that ``weight [V, H]`` and ``bias [V]``
    (or None) turn into the model's logits."""
    body: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None


def body_and_head(model: torch.nn.Module) -> BodyAndHead | None:
    """The body and the lm-head of a Hugging Face causal LM for the fused loss, or None when
    :func:`output_head` is None or no body is found.

    The body is the model's ``get_decoder()`` where transformers has it (Llama, Qwen2, Mistral, Gemma,
    Phi: ``model.model``; OPT: ``model.model.decoder``; GPT-2, Falcon, Bloom: ``model.transformer``;
    GPT-NeoX: ``model.gpt_neox``), else its ``base_model`` (the submodule named by
    ``base_model_prefix``).
    """
    head = output_head(model)
    if head is None:
        return None
    body = None
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            body = get()
        except (AttributeError, NotImplementedError):  # older transformers: no generic get_decoder
            body = None
    if not isinstance(body, torch.nn.Module) or body is model:
        body = getattr(model, "base_model", None)
    if not isinstance(body, torch.nn.Module) or body is model:
        return None
    return BodyAndHead(body, *head)


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one ``[rows, vocab]`` fp32 buffer is about ``DEFAULT_CHUNK_BYTES``."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, vocab)))


def _autocast_dtype(device_type: str):
    """The dtype autocast would give a matmul on ``device_type`` now, or None when autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def fused_linear_distillation_loss(hidden, head_weight, labels, topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
                                   *, alpha, temperature, kind="forward-kl", kd_mask=None, ce_mask=None,
                                   skew_lambda=0.1, ignore_index=-100, head_bias=None, chunk_rows=None,
                                   vocab_size=None, sample_ids=None, sample_logprobs=None, sample_weights=None) -> dict:
    """``distillation_loss(hidden @ head_weight.T + head_bias, ...)`` without the ``[N, V]`` logits; with
    ``sample_ids``, the KD term of ``sampled_kd_loss`` (the unbiased estimator on draws) instead.

    Args:
        hidden: [N, H] the student's last hidden states (after its final norm: what its lm-head reads),
            one row per position (flatten batch and time first); any float dtype.
        head_weight: [V_head, H] the lm-head weight (``model.get_output_embeddings().weight``).
        labels: [N] int64 hard labels (token ``t + 1`` for position ``t``), ``ignore_index`` where none;
            may be None when ``alpha == 1``.
        topk_ids: [N, k] int64 teacher top-k ids (distinct per row). Ids ``>= V`` (a teacher with a
            padded vocabulary) are folded exactly like ``targets.fold_padded_vocab``: their teacher mass
            moves into the tail and they drop out of the top-k. May be None when ``alpha == 0``.
        teacher_topk_logprobs: [N, k] teacher ``log p_T`` at the ids; teacher_tail_logprob: [N] the
            teacher's log tail mass (``-inf`` if empty). May be None when ``alpha == 0``.
        alpha, temperature, kind, kd_mask, ce_mask, skew_lambda, ignore_index: as in
            ``losses.distillation_loss`` (masks [N] bool; kinds forward-kl, reverse-kl, js, tvd,
            skew-kl; reverse KL floors the teacher's tail at ``TAIL_LOGPROB_FLOOR``).
        head_bias: optional [V_head] bias of the lm-head.
        chunk_rows: rows per chunk (default: ~128 MiB of [rows, V] fp32 buffers in all, i.e.
            ``default_chunk_rows(V)`` rows, half as many when KD and CE both run at ``T != 1``).
        vocab_size: use only the first ``vocab_size`` rows of the head (logits ``[:, :vocab_size]``);
            default all ``V_head`` rows. ``V`` below means this number. The vocabulary policy
            (``targets.apply_vocab_policy``) passes the teacher's ``V_t`` for a head with more rows
            (``targets.student_vocab_in_use``): the extra rows are masked out of the student's softmax.
        sample_ids, sample_logprobs, sample_weights: [N, m] a sampled (``k = 0``) or mixed cache's draws
            (as in ``losses.sampled_kd_loss``): the KD term is then that function's estimate, with the
            exact top-k weighed by ``p_T`` and ``teacher_tail_logprob`` unused (may be None); kinds
            other than ``losses.SAMPLED_KINDS`` are refused with its message. Drawn or top-k ids ``>= V``
            are dropped as ``targets.fold_padded_vocab`` drops them (:mod:`.fused_draws`).

    Returns:
        ``{"loss": alpha * kd + (1 - alpha) * ce, "kd": kd, "ce": ce}``, fp32 scalars with the values of
        ``distillation_loss``: kd = ``T**2 * mean`` of the divergence over ``kd_mask`` positions, ce =
        mean cross-entropy (T = 1) over positions with a label and ``ce_mask``; a term whose weight is 0
        is not computed and is a zero tensor; a mask selecting nothing gives 0 for its term. Only
        ``"loss"`` carries a gradient (``"kd"`` and ``"ce"`` are for logging); its graph supports one
        backward pass. Rows outside both masks are skipped; every masked-out row gets exactly zero
        gradient.

    Precision: softmax, log-sums and divergences run in fp32 whatever the input dtypes. The matmuls run
    in the autocast dtype when autocast is on (like the unfused lm-head), else in the inputs' dtype.
    """
    alpha = _check_unit("alpha", alpha)
    temperature = check_temperature(temperature)
    _check_kind(kind)
    skew_lambda = _check_unit("skew_lambda", skew_lambda)
    if hidden.dim() != 2:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}: pass [N, H] (flatten batch/time first)")
    n, h = hidden.shape
    if head_weight.dim() != 2 or head_weight.shape[1] != h:
        raise ValueError(f"head_weight has shape {tuple(head_weight.shape)}: pass [V, H] with H={h} (the lm-head weight)")
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) \
                or not 0 < vocab_size <= head_weight.shape[0]:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid: pass an integer in 1..{head_weight.shape[0]} (the head's rows)")
        if vocab_size < head_weight.shape[0]:
            head_weight = head_weight[:vocab_size]
            head_bias = None if head_bias is None else head_bias[:vocab_size]
    v = head_weight.shape[0]
    if head_bias is not None and tuple(head_bias.shape) != (v,):
        raise ValueError(f"head_bias has shape {tuple(head_bias.shape)}: pass [V] with V={v}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows={chunk_rows!r} is invalid: pass a positive integer or None")
    kd_mask = _check_mask(kd_mask, n)
    ce_mask = _check_mask(ce_mask, n)
    device = hidden.device
    if alpha < 1.0:
        if labels is None:
            raise ValueError("labels is None: pass [N] int64 hard labels (needed when alpha < 1)")
        _check_labels(labels, n)
        labels = labels.to(device)
    else:
        labels = None
    draw_weights = None
    if sample_ids is not None:
        _check_sampled_kind(kind)
    if alpha > 0.0 and sample_ids is not None:  # the estimator's slots: the top-k, then the draws
        if topk_ids is None or teacher_topk_logprobs is None:
            raise ValueError("topk_ids and teacher_topk_logprobs ([N, 0] for a sampled cache) are needed with sample_ids")
        _check_sampled_targets(topk_ids, teacher_topk_logprobs, sample_ids, sample_logprobs, sample_weights, n)
        top = teacher_topk_logprobs.to(device).float()
        topk_ids = torch.cat([topk_ids.to(device), sample_ids.to(device)], dim=1)  # [N, k+m]
        teacher_topk_logprobs = torch.cat([top, sample_logprobs.to(device).float()], dim=1)
        draw_weights = torch.cat([top.exp(), sample_weights.to(device).float()], dim=1)
        teacher_tail_logprob = None
    elif alpha > 0.0:
        if topk_ids is None or teacher_topk_logprobs is None or teacher_tail_logprob is None:
            raise ValueError("topk_ids, teacher_topk_logprobs and teacher_tail_logprob are needed when alpha > 0")
        _check_sparse_targets(topk_ids, teacher_topk_logprobs, teacher_tail_logprob, n)
        topk_ids = topk_ids.to(device)
        teacher_topk_logprobs = teacher_topk_logprobs.to(device)
        teacher_tail_logprob = teacher_tail_logprob.to(device)
    else:
        topk_ids = teacher_topk_logprobs = teacher_tail_logprob = None
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, head_weight, head_bias))
    cfg = _Config(alpha, temperature, kind, skew_lambda, int(ignore_index),
                  None if chunk_rows is None else int(chunk_rows), grad)
    loss, kd, ce = _FusedLinearDistillation.apply(
        hidden, head_weight, head_bias, labels, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, draw_weights,
        None if kd_mask is None else kd_mask.to(device), None if ce_mask is None else ce_mask.to(device), cfg)
    return {"loss": loss, "kd": kd, "ce": ce}


def _fold_targets(ids, logprobs, tail, vocab):
    """The teacher half of ``targets.fold_padded_vocab`` for a head of ``vocab`` rows, plus the ids to use.

    Returns ``(logprobs, tail, ids_eff, inside, row_has_inside)``, or None when every id is < vocab.
    Ids ``>= vocab`` lose their logprob (-inf) into the tail. ``ids_eff`` replaces each of them by an
    inside id of the same row (the row's first), so gathers and scatters on ``[rows, vocab]`` stay in
    range and duplicate scatters write equal values; a row without any inside id uses column 0.
    """
    outside = ids >= vocab  # [N, k]
    if not bool(outside.any()):
        return None
    folded = torch.where(outside, logprobs, torch.full_like(logprobs, _NEG_INF))
    tail = torch.logaddexp(tail, torch.logsumexp(folded, dim=-1))
    logprobs = logprobs.masked_fill(outside, _NEG_INF)
    inside = ~outside
    row_has = inside.any(dim=1)  # [N]
    first = inside.to(torch.uint8).argmax(dim=1, keepdim=True)  # [N, 1]: the first inside column
    fallback = torch.where(row_has[:, None], ids.gather(1, first), torch.zeros_like(first))
    ids_eff = torch.where(inside, ids, fallback)
    return logprobs, tail, ids_eff, inside, row_has


class _FusedLinearDistillation(torch.autograd.Function):
    """Forward computes the loss and all gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ids, logprobs, tail, draw_weights, kd_mask, ce_mask, cfg: _Config):
        device = hidden.device
        n = hidden.shape[0]
        v = weight.shape[0]
        alpha, temperature = cfg.alpha, cfg.temperature
        use_kd, use_ce = alpha > 0.0, alpha < 1.0
        need_h, need_w, need_b = (cfg.grad and need for need in ctx.needs_input_grad[:3])
        need_b = need_b and bias is not None
        autocast = _autocast_dtype(device.type)
        compute = autocast if autocast is not None else \
            torch.promote_types(hidden.dtype, weight.dtype if bias is None else torch.promote_types(weight.dtype, bias.dtype))
        f32 = torch.float32
        zero = torch.zeros((), dtype=f32, device=device)

        # ---- targets and per-row weights of the gradient: d loss / d (per-row divergence or CE)
        fold = None
        draws = use_kd and draw_weights is not None  # the estimator: ids, logprobs, draw_weights are its slots
        if draws:
            ids_eff, log_p_all, draw_weights = draw_slots(ids, logprobs, draw_weights, v)
        elif use_kd:
            ids = ids.to(device)
            logprobs = logprobs.float()
            tail = tail.float()
            fold = _fold_targets(ids, logprobs, tail, v)
            if fold is not None:
                logprobs, tail, ids_eff, inside, row_has = fold
            else:
                ids_eff = ids
            if cfg.kind == "reverse-kl":
                tail = tail.clamp_min(TAIL_LOGPROB_FLOOR)
            log_p_all = torch.cat([logprobs, tail[:, None]], dim=1)  # [N, k+1]
        if use_kd:
            kd_rows = kd_mask if kd_mask is not None else torch.ones(n, dtype=torch.bool, device=device)
            n_kd = kd_mask.sum().clamp_min(1) if kd_mask is not None else torch.tensor(n, device=device)
            w_kd = torch.where(kd_rows, alpha * temperature ** 2 / n_kd.to(f32), zero)  # [N]
        if use_ce:
            ce_rows = labels != cfg.ignore_index
            if ce_mask is not None:
                ce_rows = ce_rows & ce_mask
            bad = ce_rows & ((labels < 0) | (labels >= v))
            if bool(bad.any()):
                raise ValueError(f"labels hold ids outside 0..{v - 1} (the head's vocabulary), e.g. "
                                 f"{int(labels[bad][0])}; use ignore_index={cfg.ignore_index} for positions without a label")
            n_ce = ce_rows.sum().clamp_min(1)
            w_ce = torch.where(ce_rows, (1.0 - alpha) / n_ce.to(f32), zero)  # [N]
            labels_safe = torch.where(ce_rows, labels, torch.zeros_like(labels))
        active = (kd_rows if use_kd else torch.zeros(n, dtype=torch.bool, device=device)) | \
            (ce_rows if use_ce else torch.zeros(n, dtype=torch.bool, device=device))
        rows = None if bool(active.all()) else active.nonzero().squeeze(1)  # None: all rows, as slices
        n_active = n if rows is None else rows.numel()

        per_kd = torch.zeros(n, dtype=f32, device=device)
        per_ce = torch.zeros(n, dtype=f32, device=device)
        grad_h = torch.zeros(n, hidden.shape[1], dtype=f32, device=device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=f32, device=device) if need_w else None
        grad_b = torch.zeros(v, dtype=f32, device=device) if need_b else None

        if n_active:
            two_buffers = use_kd and use_ce and temperature != 1.0
            # by default the buffers together take DEFAULT_CHUNK_BYTES, whatever the terms computed:
            # KD + CE never needs more memory than CE alone
            chunk = min(cfg.chunk_rows or max(1, default_chunk_rows(v) // (2 if two_buffers else 1)), n_active)
            with torch.autocast(device.type, enabled=False):
                w_c = weight.to(compute)
                b_c = None if bias is None else bias.to(compute)
                x_buf = torch.empty(chunk, v, dtype=f32, device=device)
                e_buf = torch.empty(chunk, v, dtype=f32, device=device) if two_buffers else None
                for start in range(0, n_active, chunk):
                    stop = min(start + chunk, n_active)
                    sel = slice(start, stop) if rows is None else rows[start:stop]
                    h_c = hidden[sel].to(compute)
                    r = h_c.shape[0]
                    x = x_buf[:r]
                    # ---- logits of this chunk, fp32
                    if compute != f32:  # autocast or low-precision inputs: the matmul in that dtype
                        x.copy_(torch.mm(h_c, w_c.t()) if b_c is None else torch.addmm(b_c, h_c, w_c.t()))
                    elif b_c is None:
                        torch.mm(h_c, w_c.t(), out=x)
                    else:
                        torch.addmm(b_c, h_c, w_c.t(), out=x)
                    e_r = e_buf if e_buf is None else e_buf[:r]
                    ce_r = (labels_safe[sel], ce_rows[sel], w_ce[sel]) if use_ce else None
                    if draws:
                        dlogits = chunk_gradient_draws(
                            x, e_r, temperature=temperature, kind=cfg.kind, skew_lambda=cfg.skew_lambda, sel=sel,
                            per_kd=per_kd, per_ce=per_ce, ce=ce_r,
                            kd=(ids_eff[sel], log_p_all[sel], draw_weights[sel], kd_rows[sel], w_kd[sel]))
                    else:
                        dlogits = _chunk_gradient(
                            x, e_r, cfg, sel, per_kd, per_ce, ce=ce_r,
                            kd=(ids_eff[sel], log_p_all[sel], kd_rows[sel], w_kd[sel],
                                None if fold is None else (inside[sel], row_has[sel])) if use_kd else None)
                    # ---- through the head
                    d_c = dlogits if compute == f32 else dlogits.to(compute)
                    if need_h:
                        gh = torch.mm(d_c, w_c)
                        if rows is None:
                            grad_h[sel] = gh
                        else:
                            grad_h.index_copy_(0, sel, gh.to(f32))
                    if need_w:
                        if compute == f32:
                            grad_w.addmm_(d_c.t(), h_c)
                        else:
                            grad_w.add_(torch.mm(d_c.t(), h_c))
                    if need_b:
                        grad_b.add_(dlogits.sum(0))
                del x_buf, e_buf

        # ---- values, reduced exactly as losses._reduce / hard_label_ce
        if use_kd:
            if kd_mask is None:
                kd = temperature ** 2 * per_kd.mean()
            else:
                kd = temperature ** 2 * torch.where(kd_mask, per_kd, 0.0).sum() / kd_mask.sum().clamp_min(1)
        else:
            kd = zero.clone()
        ce = per_ce.sum() / n_ce if use_ce else zero.clone()
        loss = alpha * kd + (1.0 - alpha) * ce
        ctx.grads = (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_distillation_loss: its gradients were already used by one backward "
                               "pass; compute the loss again for another")
        grads, ctx.grads = ctx.grads, None  # hand the tensors over (autograd may keep them as .grad)
        one = bool(grad_loss == 1)
        out = tuple(None if g is None else (g if one else g * grad_loss.to(g.dtype)) for g in grads)
        return (*out, None, None, None, None, None, None, None, None)


def _chunk_gradient(x, e, cfg: _Config, sel, per_kd, per_ce, *, kd, ce):
    """Turn one chunk of fp32 logits ``x`` [r, V] into d loss / d logits, in place; record per-row values.

    Returns ``x`` overwritten, or ``e`` [r, V] (a second buffer, given when both terms run at T != 1).
    ``kd = (ids [r, k], log_p [r, k+1], rows [r] bool, weight [r], fold)`` with ``weight`` the per-row
    d loss / d divergence and ``fold = (inside [r, k], row_has_inside [r])`` or None;
    ``ce = (labels [r] (valid ids), rows [r] bool, weight [r])``. ``per_kd`` / ``per_ce`` [N] receive the
    rows' divergence / cross-entropy at ``sel``.
    """
    T = cfg.temperature
    if ce is not None:
        labels, ce_rows, w_ce = ce
        xy = x.gather(1, labels[:, None]).squeeze(1)  # [r] the label's logit, before any column changes
    if kd is not None:
        ids, log_p, kd_rows, w_kd, fold = kd
        k = ids.shape[1]
        xs = x.gather(1, ids)  # [r, k] logits at the teacher's top-k
        if fold is None:
            x.scatter_(1, ids, _NEG_INF)  # what is left is the tail
        else:
            inside, row_has = fold
            # a row without any inside id keeps its column 0: all its (redirected) ids write it back
            x.scatter_(1, ids, torch.where(row_has[:, None], torch.full_like(xs, _NEG_INF), xs))
            xs = xs.masked_fill(~inside, _NEG_INF)
    # ---- maxima of the tail (m_rest) and of the whole row (m); every log-sum is taken relative to them
    m_rest = x.amax(dim=1)  # [r]
    empty = m_rest == _NEG_INF  # a tail without ids (k = V)
    m_rest_safe = torch.where(empty, 0.0, m_rest)
    m = m_rest if kd is None or k == 0 else torch.maximum(m_rest, xs.amax(dim=1))
    m = torch.where(torch.isfinite(m), m, 0.0)
    both_t1 = kd is not None and ce is not None and T == 1.0  # one exponential serves both terms

    if kd is not None:
        # e_t = exp((x - m_rest) / T) on the tail columns, 0 at the top-k columns
        e_t = tempered_exp(x, m_rest_safe, T, out=x if e is None else e)
        z_rest = e_t.sum(1)  # [r], >= 1 (the tail's maximum gives exp(0)) unless empty
        lr = torch.where(empty, _NEG_INF, (m_rest_safe - m) / T + z_rest.log())  # log tail sum, relative to m / T
        top_s = (xs - m[:, None]) / T  # [r, k]
        lh = torch.logsumexp(top_s, dim=1) if k else torch.full_like(m, _NEG_INF)
        lse0 = torch.logaddexp(lh, lr)  # log sum of exp(s - m / T) over the whole row
        log_q = torch.cat([top_s - lse0[:, None], (lr - lse0)[:, None]], dim=1)  # [r, k+1] student bins
        with torch.enable_grad():
            lq = log_q.detach().requires_grad_(True)
            d = _divergence(log_p, lq, cfg.kind, cfg.skew_lambda)  # [r], the unfused code's own function
            (g,) = torch.autograd.grad((d * w_kd).sum(), lq)  # [r, k+1] d loss / d log q~
        per_kd[sel] = d.detach()
        g = torch.where(kd_rows[:, None], g, 0.0)  # masked rows: exactly zero, whatever they hold
        g_sum = g.sum(1)  # [r]
        q = log_q.exp()
        a = torch.where(empty, 0.0, g[:, k] - g_sum * q[:, k])
        c_tail = a / z_rest.clamp_min(1.0) / T  # per-row factor of e_t on the tail columns
        top = (g[:, :k] - g_sum[:, None] * q[:, :k]) / T  # [r, k] d loss / d x at the top-k columns
        if fold is not None:
            top = top.masked_fill(~inside, 0.0)
    else:
        k = 0
        c_tail = None

    if ce is not None:
        # e_1 = exp(x - m_rest) on the tail columns (all columns when there is no KD term)
        if both_t1:
            e_1, z1 = e_t, z_rest
        elif kd is not None:  # x still holds the logits: e_t went to the second buffer
            e_1 = untempered_exp(e_t, x, m_rest_safe, T)
            z1 = e_1.sum(1)
        else:
            e_1 = x.sub_(m_rest_safe[:, None]).exp_()
            z1 = e_1.sum(1)
        lse1 = torch.where(empty, _NEG_INF, (m_rest_safe - m) + z1.log())  # relative to m
        if k:
            lse1 = torch.logaddexp(torch.logsumexp(xs - m[:, None], dim=1), lse1)
        per_ce[sel] = torch.where(ce_rows, lse1 - (xy - m), 0.0)
        c_ce = torch.where(empty | ~ce_rows, 0.0, w_ce * torch.exp(m_rest_safe - m - lse1))
        if k:
            top = top + torch.where(ce_rows[:, None], w_ce[:, None] * torch.exp(xs - (m + lse1)[:, None]), 0.0)

    # ---- combine: tail columns are per-row multiples of the exponentials (which are 0 at top-k columns)
    if kd is None:
        out = e_1.mul_(c_ce[:, None])
    elif ce is None:
        out = e_t.mul_(c_tail[:, None])
    elif both_t1:
        out = e_t.mul_((c_tail + c_ce)[:, None])
    else:
        out = e_t.mul_(c_tail[:, None]).addcmul_(e_1, c_ce[:, None])
    if k:
        out.scatter_add_(1, ids, top)  # redirected (folded) ids add exactly 0
    if ce is not None:
        out.scatter_add_(1, labels[:, None], -w_ce[:, None])
    return out
