"""The distillation objective on a cache's teacher targets, as ``train-student`` computes it.

One place decides which loss a batch gets, for ``train-student``, the fidelity report and library
users (``kdpipe.distillation_loss``, ``kdpipe.DistillationLoss``):

- :func:`targets_for` turns a batch of cache rows into flat :class:`TeacherTargets` at one captured
  temperature: the causal shift done, quantized values renormalised against the exact tail, and the
  draws of a sampled (or mixed) cache attached when the loss kind can use them
  (:data:`~kdpipe.pipeline.train.losses.SAMPLED_KINDS`);
- :func:`distillation_objective` computes ``alpha * kd + (1 - alpha) * ce`` on them: the unbiased
  estimator when the targets carry draws, else the (k+1)-bin view (top-k + tail bucket), from the
  student's logits or, given its last hidden states and lm-head, fused with the head
  (:mod:`kdpipe.pipeline.train.fused_kd`: the ``[N, V]`` logits never exist).
"""

from __future__ import annotations

import torch

from kdpipe.pipeline.cache.schema import CacheSchema
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.train import losses
from kdpipe.pipeline.train.fused_kd import fused_linear_distillation_loss
from kdpipe.pipeline.train.losses import KINDS, SAMPLED_KINDS, _check_unit, hard_label_ce, sampled_kd_loss
from kdpipe.pipeline.train.targets import Sampling, TeacherTargets, fold_padded_vocab, teacher_targets


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
        return losses.distillation_loss(logits, targets.labels, targets.topk_ids, targets.topk_logprobs, targets.tail_logprob,
                                 alpha=alpha, temperature=temperature, kind=kind, kd_mask=targets.kd_mask,
                                 ce_mask=targets.ce_mask, skew_lambda=skew_lambda)
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    kd = zero if alpha == 0.0 else sampled_kd_loss(
        logits, targets.topk_ids, targets.topk_logprobs, targets.sample_ids, targets.sample_logprobs,
        targets.sample_weights, temperature=temperature, kind=kind, mask=targets.kd_mask, skew_lambda=skew_lambda)
    ce = zero if alpha == 1.0 else hard_label_ce(logits, targets.labels, mask=targets.ce_mask)
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}


class TargetCollator:
    """Collate function for :class:`~kdpipe.pipeline.train.dataset.CacheDataset` batches: the student's
    inputs plus the flat teacher targets at one captured temperature (picklable, so it runs in the
    DataLoader's worker processes)::

        loader = DataLoader(CacheDataset(cache, batch_size=16), batch_size=None,
                            collate_fn=TargetCollator(cache, temperature=2.0), num_workers=2)

    Each batch is a dict: ``input_ids [B, L]`` int64 (text caches) and, where the cache's mask marks
    real tokens of a causal LM, ``attention_mask [B, L]``; or ``inputs [B, ...]`` (module teachers,
    from the dataset's ``inputs``); ``sample_index [B]`` (the rows' keys); and ``teacher``:
    :meth:`TeacherTargets.to_dict` of ``N = B * P``
    positions (causal LM: position ``t`` predicts token ``t + 1``; its hard label is in
    ``teacher["labels"]``). ``kind``: the loss the targets are for (a sampled cache's draws are
    attached for the kinds that can use them; see :func:`uses_draws`).
    """

    def __init__(self, cache, *, temperature: float = 1.0, kind: str = "forward-kl"):
        self.schema = cache.schema if hasattr(cache, "schema") else cache
        self.schema.temperature_index(temperature)  # refuses a temperature the cache did not capture
        uses_draws(self.schema, kind)  # refuses a kind a sampled cache cannot serve
        self.temperature, self.kind = float(temperature), kind

    def __call__(self, batch: dict) -> dict:
        targets = targets_for(self.schema, batch, temperature=self.temperature, kind=self.kind)
        out = {}
        if "input_ids" in batch:
            out["input_ids"] = batch["input_ids"]
            if self.schema.task == "causal-lm" and self.schema.mask_meaning == "real-token":
                out["attention_mask"] = batch["mask"].long()
        else:
            out["inputs"] = batch["inputs"]
        out["sample_index"] = batch["sample_index"]  # [B]: the rows' keys in the cache
        out["teacher"] = targets.to_dict()
        return out


class DistillationLoss(torch.nn.Module):
    """``alpha * T**2 * D(p_T || q_T) + (1 - alpha) * CE`` on a cache's teacher targets, as a module.

    ``D`` is ``kind``: forward-kl, reverse-kl, js, tvd or skew-kl (``KL(p || lam p + (1 - lam) q)``,
    ``lam = skew_lambda``), on the (k+1)-bin view of the top-k and the tail bucket, or the unbiased
    estimator on a sampled cache's draws (forward-kl and skew-kl). ``forward(teacher, student_logits)``
    takes the targets (:class:`TeacherTargets` or the ``"teacher"`` dict of :class:`TargetCollator`)
    and the student's raw logits ``[B, P, V]`` or ``[N, V]``; or, for the fused path that never makes the
    ``[N, V]`` logits, ``hidden=[B, P, H]`` with ``head_weight=[V, H]`` and ``head_bias`` (see
    :func:`kdpipe.pipeline.train.fused_kd.output_head`). Returns ``{"loss", "kd", "ce"}`` (fp32 scalars;
    ``"loss"`` carries the gradient).
    """

    def __init__(self, *, alpha: float = 0.5, temperature: float = 1.0, kind: str = "forward-kl",
                 skew_lambda: float = 0.1):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown kind={kind!r}: use one of {', '.join(KINDS)}")
        self.alpha, self.temperature = _check_unit("alpha", alpha), float(temperature)
        self.kind, self.skew_lambda = kind, _check_unit("skew_lambda", skew_lambda)

    def forward(self, teacher, student_logits: torch.Tensor | None = None, *, hidden: torch.Tensor | None = None,
                head_weight: torch.Tensor | None = None, head_bias: torch.Tensor | None = None) -> dict:
        return distillation_loss(teacher, student_logits, hidden=hidden, head_weight=head_weight, head_bias=head_bias,
                                 alpha=self.alpha, temperature=self.temperature, kind=self.kind,
                                 skew_lambda=self.skew_lambda)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, kind={self.kind!r}"


def distillation_loss(teacher, student_logits: torch.Tensor | None = None, *, alpha: float, temperature: float,
                      kind: str = "forward-kl", skew_lambda: float = 0.1, hidden: torch.Tensor | None = None,
                      head_weight: torch.Tensor | None = None, head_bias: torch.Tensor | None = None) -> dict:
    """The function form of :class:`DistillationLoss` (same arguments and result)."""
    targets = teacher if isinstance(teacher, TeacherTargets) else TeacherTargets.from_dict(teacher)
    device = (student_logits if student_logits is not None else hidden).device
    return distillation_objective(targets.to(device), alpha=alpha, temperature=temperature, kind=kind,
                                  skew_lambda=skew_lambda, student_logits=student_logits, hidden=hidden,
                                  head_weight=head_weight, head_bias=head_bias)
