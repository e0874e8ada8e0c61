"""The distillation objective on a cache's teacher targets, as ``train-student`` computes it.

One place decides which loss a batch gets, for ``train-student``, the fidelity report and library
users (``kdpipe.distillation_loss``, ``kdpipe.DistillationLoss``):

- :func:`targets_for` turns a batch of cache rows into flat :class:`TeacherTargets` at one captured
  temperature: the causal shift done, quantized values renormalised against the exact tail, and the
  draws of a sampled (or mixed) cache attached when the loss kind can use them
  (:data:`~kdpipe.pipeline.losses.SAMPLED_KINDS`);
- :func:`distillation_objective` computes ``alpha * kd + (1 - alpha) * ce`` on them: the unbiased
  estimator when the targets carry draws, else the (k+1)-bin view (top-k + tail bucket), from the
  student's logits or, given its last hidden states and lm-head, fused with the head
  (:mod:`kdpipe.pipeline.fused_kd`: the ``[N, V]`` logits never exist).
"""

from __future__ import annotations

import torch

from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.fused_kd import fused_linear_distillation_loss
from kdpipe.pipeline.losses import KINDS, SAMPLED_KINDS, _check_unit, distillation_loss, hard_label_ce, sampled_kd_loss
from kdpipe.pipeline.schema import CacheSchema
from kdpipe.pipeline.targets import Sampling, TeacherTargets, fold_padded_vocab, teacher_targets


def uses_draws(schema: CacheSchema, kind: str) -> bool:
    """Whether ``kind`` trains on the cache's draws (sampled or mixed cache, an estimable kind);
    raises naming the fix for a sampled-only cache and a kind the draws cannot estimate."""
    if kind not in KINDS:
        raise ConfigError(f"unknown loss kind {kind!r}; use one of {', '.join(KINDS)}")
    if not schema.sample_draws:
        return False
    if kind in SAMPLED_KINDS:
        return True
    if schema.top_k == 0:
        raise ConfigError(f"--loss {kind} is not defined on a sampled cache (its draws give the teacher's "
                          f"probabilities only where the teacher puts mass); use --loss {' or '.join(SAMPLED_KINDS)}, "
                          "or a cache captured with --top-k")
    return False  # a mixed cache: this kind takes the top-k + tail bins


def targets_for(schema: CacheSchema, batch: dict, *, temperature: float, kind: str = "forward-kl") -> TeacherTargets:
    """Flat teacher targets (``[N = B * P]`` rows) of a batch of cache rows (``CacheDataset``'s
    ``[B, ...]`` tensors) at a captured ``temperature``, for a loss of ``kind``."""
    return teacher_targets(
        batch, temperature_index=schema.temperature_index(temperature), temperature=temperature, task=schema.task,
        mask_meaning=schema.mask_meaning, sampling=Sampling.of(schema) if uses_draws(schema, kind) else None,
        renormalize=schema.value_dtype == "quantized")


def distillation_objective(targets: TeacherTargets, *, alpha: float, temperature: float, kind: str = "forward-kl",
                           skew_lambda: float = 0.1, student_logits: torch.Tensor | None = None,
                           hidden: torch.Tensor | None = None, head_weight: torch.Tensor | None = None,
                           head_bias: torch.Tensor | None = None) -> dict:
    """``{"loss": alpha * kd + (1 - alpha) * ce, "kd": kd, "ce": ce}`` (fp32 scalars).

    ``kd`` is ``T**2`` times the mean divergence over ``targets.kd_mask``; ``ce`` the mean hard-label
    cross-entropy (T = 1) over ``targets.ce_mask``. Give either ``student_logits`` (``[N, V]`` or
    ``[B, P, V]`` raw logits) or ``hidden`` (``[N, H]`` or ``[B, P, H]``, the student's last hidden
    states) with ``head_weight`` (``[V, H]``) and ``head_bias`` (``[V]`` or None) for the fused path.
    Targets with draws (see :func:`targets_for`) take the unbiased estimator on full logits (computed
    from ``hidden`` and the head when no logits are given). Only ``"loss"`` is sure to carry a
    gradient; ``"kd"`` and ``"ce"`` are for logging.
    """
    alpha = _check_unit("alpha", alpha)
    if targets.temperature is not None and abs(targets.temperature - temperature) > 1e-6 * temperature:
        raise ValueError(f"the targets are at T={targets.temperature:g} but temperature={temperature:g}: "
                         "make the targets at the loss's temperature (targets_for / TargetCollator)")
    if student_logits is None and (hidden is None or head_weight is None):
        raise ValueError("pass student_logits, or hidden with head_weight (and head_bias) for the fused path")
    if hidden is not None:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    if targets.sample_ids is None and student_logits is None:  # the [N, V] logits never exist
        return fused_linear_distillation_loss(
            hidden, head_weight, targets.labels, targets.topk_ids, targets.topk_logprobs, targets.tail_logprob,
            alpha=alpha, temperature=temperature, kind=kind, kd_mask=targets.kd_mask, ce_mask=targets.ce_mask,
            skew_lambda=skew_lambda, head_bias=head_bias)
    if student_logits is None:
        student_logits = torch.nn.functional.linear(hidden, head_weight, head_bias)
    logits, targets = fold_padded_vocab(student_logits.reshape(-1, student_logits.shape[-1]).float(), targets)
    if targets.sample_ids is None:
        return distillation_loss(logits, targets.labels, targets.topk_ids, targets.topk_logprobs, targets.tail_logprob,
                                 alpha=alpha, temperature=temperature, kind=kind, kd_mask=targets.kd_mask,
                                 ce_mask=targets.ce_mask, skew_lambda=skew_lambda)
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    kd = zero if alpha == 0.0 else sampled_kd_loss(
        logits, targets.topk_ids, targets.topk_logprobs, targets.sample_ids, targets.sample_logprobs,
        targets.sample_weights, temperature=temperature, kind=kind, mask=targets.kd_mask, skew_lambda=skew_lambda)
    ce = zero if alpha == 1.0 else hard_label_ce(logits, targets.labels, mask=targets.ce_mask)
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}
