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
  (:mod:`kdpipe.pipeline.train.fused_kd`: the ``[N, V]`` logits never exist, with draws or without);
  both terms are always reported, as means, sums with their counts, or per position (``reduction``);
- :class:`TargetCollator` is the library's ``collate_fn``: per-row tensors only
  (:mod:`~kdpipe.pipeline.train.batch_layout`), which ``accelerate`` and the Hugging Face ``Trainer``
  can split across processes; :class:`DistillationLoss` / :func:`distillation_loss` flatten them.
"""

from __future__ import annotations

import torch

from kdpipe.pipeline.cache.schema import CacheSchema
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.train import losses
from kdpipe.pipeline.train.batch_layout import flat_targets, one_batch, per_row
from kdpipe.pipeline.train.fused_kd import fused_linear_distillation_loss
from kdpipe.pipeline.train.losses import (
    KINDS,
    SAMPLED_KINDS,
    _check_unit,
    hard_label_ce,
    sampled_kd_loss,
    sparse_kd_loss,
)
from kdpipe.pipeline.train.targets import (
    IGNORE,
    Sampling,
    TeacherTargets,
    Vocabulary,
    fold_padded_vocab,
    student_vocab_in_use,
    teacher_targets,
)


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


def targets_for(schema: CacheSchema, batch: dict, *, temperature: float, kind: str = "forward-kl",
                vocabulary: Vocabulary | None = None) -> TeacherTargets:
    """Flat teacher targets (``[N = B * P]`` rows) of a batch of cache rows (``CacheDataset``'s
    ``[B, ...]`` tensors) at a captured ``temperature``, for a loss of ``kind``; ``vocabulary``
    (``Vocabulary.of(cache)``): the sizes the losses' vocabulary policy needs."""
    return teacher_targets(
        batch, temperature_index=schema.temperature_index(temperature), temperature=temperature, task=schema.task,
        mask_meaning=schema.mask_meaning, sampling=Sampling.of(schema) if uses_draws(schema, kind) else None,
        renormalize=schema.value_dtype == "quantized", vocabulary=vocabulary)


REDUCTIONS = ("mean", "sum", "none")


def distillation_objective(targets: TeacherTargets, *, alpha: float, temperature: float, kind: str = "forward-kl",
                           skew_lambda: float = 0.1, student_logits: torch.Tensor | None = None,
                           hidden: torch.Tensor | None = None, head_weight: torch.Tensor | None = None,
                           head_bias: torch.Tensor | None = None, reduction: str = "mean") -> dict:
    """``{"loss": alpha * kd + (1 - alpha) * ce, "kd", "ce", "kd_count", "ce_count"}`` on flat targets.

    ``kd`` is ``T**2`` times the divergence over the ``kd_count`` positions of ``targets.kd_mask``, ``ce``
    the hard-label cross-entropy (T = 1) over the ``ce_count`` positions with a label in ``ce_mask``, both
    always computed (a term of weight 0 without a gradient). ``reduction``: ``"mean"`` (each term
    averaged over its positions), ``"sum"`` (summed: divide by the counts summed over micro-batches or
    ranks to get the mean of the whole), ``"none"`` (``[N]`` per position, 0 where a term does not count;
    needs logits). Give either ``student_logits`` (``[N, V]`` or ``[B, P, V]`` raw logits) or ``hidden``
    (``[N, H]`` or ``[B, P, H]``, the student's last hidden states) with ``head_weight`` (``[V, H]``) and
    ``head_bias`` (``[V]`` or None) for the fused path. Targets with draws (see :func:`targets_for`) take
    the unbiased estimator, on the logits or fused with the head alike. Only ``"loss"`` is sure to carry a
    gradient; ``"kd"`` and ``"ce"`` are for logging.
    """
    alpha = _check_unit("alpha", alpha)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is invalid: use one of {', '.join(REDUCTIONS)}")
    if targets.temperature is not None and abs(targets.temperature - temperature) > 1e-6 * temperature:
        raise ValueError(f"the targets are at T={targets.temperature:g} but temperature={temperature:g}: "
                         "make the targets at the loss's temperature (targets_for / TargetCollator)")
    if student_logits is None and (hidden is None or head_weight is None):
        raise ValueError("pass student_logits, or hidden with head_weight (and head_bias) for the fused path")
    counts = {"kd_count": targets.kd_mask.sum(), "ce_count": (targets.ce_mask & (targets.labels != IGNORE)).sum()}
    options = dict(alpha=alpha, temperature=temperature, kind=kind, skew_lambda=skew_lambda)
    if hidden is not None:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    if student_logits is None:  # the [N, V] logits never exist
        if reduction == "none":
            raise ValueError("reduction='none' needs the student's logits (the fused head reduces as it goes): "
                             "pass student_logits, or reduction='mean' / 'sum'")
        terms = _fused_terms(hidden, head_weight, head_bias, targets, counts, reduction=reduction, **options)
        return {**terms, **counts}
    logits, targets = fold_padded_vocab(student_logits.reshape(-1, student_logits.shape[-1]).float(), targets)
    if reduction == "none":
        return {**_per_position_terms(logits, targets, **options), **counts}
    means = _mean_terms(logits, targets, **options)
    return {**_combine(means, counts, alpha=alpha, reduction=reduction), **counts}


def _mean_terms(logits, targets: TeacherTargets, *, alpha, temperature, kind, skew_lambda) -> dict:
    """``{"kd", "ce"}`` means on ``[N, V]`` logits; a term of weight 0 is computed without a gradient."""
    def kd():
        if targets.sample_ids is not None:
            return sampled_kd_loss(logits, targets.topk_ids, targets.topk_logprobs, targets.sample_ids,
                                   targets.sample_logprobs, targets.sample_weights, temperature=temperature,
                                   kind=kind, mask=targets.kd_mask, skew_lambda=skew_lambda)
        return sparse_kd_loss(logits, targets.topk_ids, targets.topk_logprobs, targets.tail_logprob,
                              temperature=temperature, kind=kind, mask=targets.kd_mask, skew_lambda=skew_lambda)

    def ce():
        return hard_label_ce(logits, targets.labels, mask=targets.ce_mask)

    return {"kd": _weighted(kd, alpha > 0.0), "ce": _weighted(ce, alpha < 1.0)}


def _weighted(term, weighted: bool) -> torch.Tensor:
    if weighted:
        return term()
    with torch.no_grad():  # reported, not trained on
        return term()


def _combine(means: dict, counts: dict, *, alpha: float, reduction: str) -> dict:
    """``loss``, ``kd`` and ``ce`` of a reduction from the two means (a term of weight 0 stays out of
    ``loss``: ``0 * inf`` would be NaN)."""
    kd, ce = means["kd"], means["ce"]
    if reduction == "sum":
        kd, ce = kd * counts["kd_count"].to(kd.device), ce * counts["ce_count"].to(ce.device)
    loss = torch.zeros((), dtype=torch.float32, device=kd.device)
    if alpha > 0.0:
        loss = loss + alpha * kd
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * ce
    return {"loss": loss, "kd": kd, "ce": ce}


def _per_position_terms(logits, targets: TeacherTargets, *, alpha, temperature, kind, skew_lambda) -> dict:
    """``{"loss", "kd", "ce"}`` as ``[N]`` tensors (0 where a term does not count), on ``[N, V]`` logits:
    the terms whose means :func:`_mean_terms` takes."""
    if targets.sample_ids is None:
        log_q = losses.student_bin_logprobs(logits, targets.topk_ids, temperature)  # [N, k+1]
        tail = targets.tail_logprob.float()[:, None]
        if kind == "reverse-kl":
            tail = tail.clamp_min(losses.TAIL_LOGPROB_FLOOR)
        log_p = torch.cat([targets.topk_logprobs.float(), tail], dim=1)  # [N, k+1]
        divergence = losses._divergence(log_p, log_q, kind, skew_lambda)
    else:
        losses._check_sampled_kind(kind)
        ids = torch.cat([targets.topk_ids, targets.sample_ids], dim=1)
        log_q = losses._student_logprobs_at(logits, ids, temperature)  # [N, k+m]
        top = targets.topk_logprobs.float()
        log_p = torch.cat([top, targets.sample_logprobs.float()], dim=1)
        weights = torch.cat([top.exp(), targets.sample_weights.float()], dim=1)
        divergence = losses._weighted_log_ratio(weights, log_p, log_q, kind, skew_lambda)
    kd = temperature ** 2 * torch.where(targets.kd_mask, divergence, 0.0)
    labels = targets.labels.masked_fill(~targets.ce_mask, IGNORE)
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    loss = torch.zeros_like(kd)
    if alpha > 0.0:
        loss = loss + alpha * kd
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * ce
    return {"loss": loss, "kd": kd if alpha > 0.0 else kd.detach(), "ce": ce if alpha < 1.0 else ce.detach()}


def _fused_terms(hidden, head_weight, head_bias, targets: TeacherTargets, counts: dict, *, alpha, temperature, kind,
                 skew_lambda, reduction) -> dict:
    """The fused head's ``loss``, ``kd`` and ``ce``. A sum is ``c * (a * kd + (1 - a) * ce)`` with
    ``c = alpha * n_kd + (1 - alpha) * n_ce`` and ``a = alpha * n_kd / c``: one pass, the same gradient."""
    n_kd, n_ce = float(counts["kd_count"]), float(counts["ce_count"])
    scale = alpha * n_kd + (1.0 - alpha) * n_ce if reduction == "sum" else 1.0
    weight = alpha * n_kd / scale if reduction == "sum" and scale > 0 else alpha
    vocab = student_vocab_in_use(head_weight.shape[0], targets)

    def run(a: float) -> dict:
        return fused_linear_distillation_loss(
            hidden, head_weight, targets.labels, targets.topk_ids, targets.topk_logprobs, targets.tail_logprob,
            alpha=a, temperature=temperature, kind=kind, kd_mask=targets.kd_mask, ce_mask=targets.ce_mask,
            skew_lambda=skew_lambda, head_bias=head_bias, vocab_size=vocab, sample_ids=targets.sample_ids,
            sample_logprobs=targets.sample_logprobs, sample_weights=targets.sample_weights)

    out = run(weight)
    means = {"kd": out["kd"], "ce": out["ce"]}
    if weight in (0.0, 1.0):  # the pass left a term out: its value alone, without gradients
        with torch.no_grad():
            if weight == 0.0:
                means["kd"] = run(1.0)["kd"]
            else:
                means["ce"] = run(0.0)["ce"]
    if reduction == "sum":
        return {"loss": out["loss"] * scale, "kd": means["kd"] * n_kd, "ce": means["ce"] * n_ce}
    return {"loss": out["loss"], **means}


class TargetCollator:
    """Collate function for :class:`~kdpipe.pipeline.train.dataset.CacheDataset` batches: the student's
    inputs plus the teacher targets at one captured temperature, every value a tensor with one row per
    cache row, so that loaders (``accelerate``, the Hugging Face ``Trainer``) can split and join batches
    (picklable, so it runs in the DataLoader's worker processes)::

        loader = DataLoader(CacheDataset(cache, batch_size=16), batch_size=None,
                            collate_fn=TargetCollator(cache, temperature=2.0), num_workers=2)

    Each batch is a dict: ``input_ids [B, L]`` int64 (text caches) and, where the cache's mask marks
    real tokens of a causal LM, ``attention_mask [B, L]``; or ``inputs [B, ...]`` (module teachers,
    from the dataset's ``inputs``); ``sample_index [B]`` (the rows' keys); and ``teacher``: the
    targets of the ``P`` positions of each row (:func:`~kdpipe.pipeline.train.batch_layout.per_row`:
    ``topk_ids [B, P, k]``, ``kd_mask [B, P]``, ``labels [B, P]``, ..., ``temperature [B, P]``; causal
    LM: position ``t`` predicts token ``t + 1``, its hard label is ``teacher["labels"][:, t]``). The losses
    flatten them to ``N = B * P`` positions. ``kind``: the loss the targets are for (a sampled cache's
    draws are attached for the kinds that can use them; see :func:`uses_draws`). A list of one batch
    (a DataLoader with ``batch_size=1``) is that batch; a list of several is refused.
    """

    def __init__(self, cache, *, temperature: float = 1.0, kind: str = "forward-kl"):
        self.schema = cache.schema if hasattr(cache, "schema") else cache
        self.vocabulary = Vocabulary.of(cache)  # the sizes the losses' vocabulary policy needs
        self.schema.temperature_index(temperature)  # refuses a temperature the cache did not capture
        uses_draws(self.schema, kind)  # refuses a kind a sampled cache cannot serve
        self.temperature, self.kind = float(temperature), kind

    def __call__(self, batch) -> dict:
        batch = one_batch(batch, who="TargetCollator")
        targets = targets_for(self.schema, batch, temperature=self.temperature, kind=self.kind,
                              vocabulary=self.vocabulary)
        out = {}
        if "input_ids" in batch:
            out["input_ids"] = batch["input_ids"]
            if self.schema.task == "causal-lm" and self.schema.mask_meaning == "real-token":
                out["attention_mask"] = batch["mask"].long()
        else:
            out["inputs"] = batch["inputs"]
        out["sample_index"] = batch["sample_index"]  # [B]: the rows' keys in the cache
        out["teacher"] = per_row(targets, len(batch["sample_index"]))
        return out


class DistillationLoss(torch.nn.Module):
    """``alpha * T**2 * D(p_T || q_T) + (1 - alpha) * CE`` on a cache's teacher targets, as a module.

    ``D`` is ``kind``: forward-kl, reverse-kl, js, tvd or skew-kl (``KL(p || lam p + (1 - lam) q)``,
    ``lam = skew_lambda``), on the (k+1)-bin view of the top-k and the tail bucket, or the unbiased
    estimator on a sampled cache's draws (forward-kl and skew-kl). ``forward(teacher, student_logits)``
    takes the targets (the ``"teacher"`` dict of :class:`TargetCollator`, or :class:`TeacherTargets`)
    and the student's raw logits ``[B, P, V]`` or ``[N, V]``; or, for the fused path that never makes the
    ``[N, V]`` logits, ``hidden=[B, P, H]`` with ``head_weight=[V, H]`` and ``head_bias`` (see
    :func:`kdpipe.pipeline.train.fused_kd.output_head`). Returns ``{"loss", "kd", "ce", "kd_count",
    "ce_count"}``: both terms always computed, ``"loss"`` carries the gradient; ``reduction`` as in
    :func:`distillation_objective` (``"none"``: ``[B, P]`` tensors for per-row targets).
    """

    def __init__(self, *, alpha: float = 0.5, temperature: float = 1.0, kind: str = "forward-kl",
                 skew_lambda: float = 0.1, reduction: str = "mean"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown kind={kind!r}: use one of {', '.join(KINDS)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is invalid: use one of {', '.join(REDUCTIONS)}")
        self.alpha, self.temperature = _check_unit("alpha", alpha), float(temperature)
        self.kind, self.skew_lambda, self.reduction = kind, _check_unit("skew_lambda", skew_lambda), reduction

    def forward(self, teacher, student_logits: torch.Tensor | None = None, *, hidden: torch.Tensor | None = None,
                head_weight: torch.Tensor | None = None, head_bias: torch.Tensor | None = None) -> dict:
        return distillation_loss(teacher, student_logits, hidden=hidden, head_weight=head_weight, head_bias=head_bias,
                                 alpha=self.alpha, temperature=self.temperature, kind=self.kind,
                                 skew_lambda=self.skew_lambda, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, kind={self.kind!r}, reduction={self.reduction!r}"


def distillation_loss(teacher, student_logits: torch.Tensor | None = None, *, alpha: float, temperature: float,
                      kind: str = "forward-kl", skew_lambda: float = 0.1, hidden: torch.Tensor | None = None,
                      head_weight: torch.Tensor | None = None, head_bias: torch.Tensor | None = None,
                      reduction: str = "mean") -> dict:
    """The function form of :class:`DistillationLoss` (same arguments and result)."""
    targets = flat_targets(teacher)
    device = (student_logits if student_logits is not None else hidden).device
    out = distillation_objective(targets.to(device), alpha=alpha, temperature=temperature, kind=kind,
                                 skew_lambda=skew_lambda, student_logits=student_logits, hidden=hidden,
                                 head_weight=head_weight, head_bias=head_bias, reduction=reduction)
    if reduction == "none" and not isinstance(teacher, TeacherTargets) and teacher["kd_mask"].dim() == 2:
        shape = teacher["kd_mask"].shape  # per-row targets: per-row results [B, P]
        out = {**out, **{key: out[key].reshape(shape) for key in ("loss", "kd", "ce")}}
    return out
