"""From a batch of cache rows to the flat tensors the losses take, with the causal shift done once.

Causal LM: student logits at position ``t`` and the teacher's cached distribution at ``t`` both
predict token ``t + 1``; KD counts every position with ``mask[t]``. Hard-label CE at ``t`` uses target
``input_ids[t + 1]``; the last position of a row has no label. What else CE needs depends on the
cache's ``mask_meaning``: with ``"real-token"`` (text) ``mask`` marks real tokens, KD includes the last
one of a row (whose teacher target is the next row's first token) and CE counts ``t`` only when
``mask[t]`` and ``mask[t + 1]``; with ``"next-token-target"`` (chat) ``mask[t]`` already says that token
``t + 1`` is a target, so KD and CE count the same positions. Classification: one position, label =
the row's label.

Padded vocabulary: a teacher whose logits have more rows than its tokenizer has tokens (Qwen: 151,936
logits for 151,665 tokens) may put a padded id in the top-k. A student sized to the tokenizer cannot
score such ids: their teacher mass is moved into the tail bucket and they drop out of the top-k
(``fold_padded_vocab``; a drawn id of a sampled cache is dropped); a student smaller than the
tokenizer's real vocabulary is refused.
"""

from __future__ import annotations

import dataclasses

import torch

from kdpipe.pipeline.cache.sampling import sample_weights
from kdpipe.pipeline.errors import ConfigError

IGNORE = -100


@dataclasses.dataclass
class TeacherTargets:
    """The teacher's targets of ``N`` positions (a batch's ``B * P``, flattened) at one temperature."""

    topk_ids: torch.Tensor  # [N, k] int64
    topk_logprobs: torch.Tensor  # [N, k] log p_T
    tail_logprob: torch.Tensor  # [N] log tail mass at T
    kd_mask: torch.Tensor  # [N] bool
    labels: torch.Tensor  # [N] int64, IGNORE where there is none
    ce_mask: torch.Tensor  # [N] bool
    sample_ids: torch.Tensor | None = None  # [N, m] int64, sampled caches: ids drawn outside the top-k
    sample_logprobs: torch.Tensor | None = None  # [N, m] exact log p_T of those ids (-inf: empty slot)
    sample_weights: torch.Tensor | None = None  # [N, m] importance weights (0: empty slot), see sampling
    temperature: float | None = None  # the T of the log-probs and weights

    def to_dict(self) -> dict:
        """A plain dict (what a collate function returns: frameworks move its tensors to the device)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d) -> "TeacherTargets":
        """Back from :meth:`to_dict` (or any mapping with those keys)."""
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    def to(self, device) -> "TeacherTargets":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a sampled cache's draws were made: at captured temperature index ``index`` (``T0``), ``draws`` each."""
    index: int
    temperature: float
    draws: int

    @classmethod
    def of(cls, schema) -> "Sampling | None":
        if not schema.sample_draws:
            return None
        return cls(schema.temperature_index(schema.sample_temperature), schema.sample_temperature, schema.sample_draws)


def teacher_targets(
    batch: dict, *, temperature_index: int, temperature: float, task: str, mask_meaning: str = "real-token",
    sampling: Sampling | None = None, renormalize: bool = False,
) -> TeacherTargets:
    """Flatten a collated batch (``[B, P, ...]``) into per-position targets at one temperature.

    ``sampling`` (sampled caches, see :class:`Sampling`): also the drawn ids with their exact
    log-probabilities and unbiased importance weights at this temperature.
    ``renormalize``: rescale the top-k so that it sums to ``1 - r_T`` (the exact tail bucket's
    complement), so that the k + 1 bins sum to 1 (quantized values: their rounding leaves the sum a
    little off 1).
    """
    k = batch["topk_ids"].shape[-1]
    logsumexp = batch["logsumexp"][..., temperature_index]  # [B, P]
    logprobs = batch["topk_logits"] / temperature - logsumexp[..., None]  # [B, P, k]
    if renormalize and k:  # the top-k gets exactly the mass the (exact) tail leaves: 1 - r_T
        head = _log1mexp(batch["tail_logprob"][..., temperature_index]) - torch.logsumexp(logprobs, dim=-1)
        logprobs = logprobs + torch.where(torch.isfinite(head), head, 0.0)[..., None]
    mask = batch["mask"]  # [B, P]
    if task == "causal-lm":
        ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE)
        labels[:, :-1] = ids[:, 1:]
        ce_mask = torch.zeros_like(mask)
        ce_mask[:, :-1] = mask[:, :-1] if mask_meaning == "next-token-target" else mask[:, :-1] & mask[:, 1:]
    else:
        labels = batch["label"][:, None]
        ce_mask = mask
    n = mask.numel()
    targets = TeacherTargets(
        batch["topk_ids"].reshape(n, k), logprobs.reshape(n, k),
        batch["tail_logprob"][..., temperature_index].reshape(-1), mask.reshape(-1),
        labels.reshape(-1), ce_mask.reshape(-1), temperature=float(temperature),
    )
    if sampling is None:
        return targets
    m = batch["sample_ids"].shape[-1]
    flat = lambda t: t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t.reshape(-1)  # noqa: E731
    log_p, weights = sample_weights(
        flat(batch["sample_logits"]), flat(batch["sample_counts"]), logsumexp=flat(logsumexp),
        logsumexp_t0=flat(batch["logsumexp"][..., sampling.index]),
        tail_logprob_t0=flat(batch["tail_logprob"][..., sampling.index]),
        temperature=temperature, sample_temperature=sampling.temperature, draws=sampling.draws)
    return dataclasses.replace(targets, sample_ids=batch["sample_ids"].reshape(-1, m), sample_logprobs=log_p,
                               sample_weights=weights)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (``-inf`` at ``x = 0``)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def check_student_vocab(student_vocab: int, *, teacher_vocab: int, tokenizer_vocab: int | None, task: str) -> None:
    """A student must score every real token (or class) of the teacher."""
    needed = tokenizer_vocab if (task == "causal-lm" and tokenizer_vocab) else teacher_vocab
    if student_vocab < needed:
        what = "tokens in the cache's tokenizer" if task == "causal-lm" else "teacher classes"
        raise ConfigError(
            f"the student's vocabulary ({student_vocab}) does not cover the {needed} {what}; "
            "give the student a vocab_size (or num_labels) of at least that"
        )


def fold_padded_vocab(student_logits: torch.Tensor, targets: TeacherTargets) -> tuple[torch.Tensor, TeacherTargets]:
    """Move teacher mass on ids the student does not have into the tail (see module doc).

    The student's logits get ``-inf`` columns up to the largest cached id, so those ids have
    probability 0 on both sides and contribute nothing to any divergence.
    """
    vocab = student_logits.shape[-1]
    if targets.sample_ids is not None:  # a drawn id the student cannot score is dropped (weight 0)
        gone = targets.sample_ids >= vocab
        if bool(gone.any()):
            targets = dataclasses.replace(
                targets, sample_ids=targets.sample_ids.masked_fill(gone, 0),
                sample_logprobs=targets.sample_logprobs.masked_fill(gone, float("-inf")),
                sample_weights=targets.sample_weights.masked_fill(gone, 0.0))
    outside = targets.topk_ids >= vocab  # [N, k]
    if not bool(outside.any()):
        return student_logits, targets
    folded = torch.where(outside, targets.topk_logprobs, torch.full_like(targets.topk_logprobs, float("-inf")))
    tail = torch.logaddexp(targets.tail_logprob, torch.logsumexp(folded, dim=-1))
    logprobs = targets.topk_logprobs.masked_fill(outside, float("-inf"))
    pad = int(targets.topk_ids.max()) + 1 - vocab
    logits = torch.cat([student_logits, student_logits.new_full((student_logits.shape[0], pad), float("-inf"))], dim=-1)
    return logits, dataclasses.replace(targets, topk_logprobs=logprobs, tail_logprob=tail)
