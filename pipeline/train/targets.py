"""From a batch of cache rows to the flat tensors the losses take, with the causal shift done once.

Causal LM: student logits at position ``t`` and the teacher's cached distribution at ``t`` both
predict token ``t + 1``; KD counts every position with ``mask[t]``. Hard-label CE at ``t`` uses target
``input_ids[t + 1]``; the last position of a row has no label. What else CE needs depends on the
cache's ``mask_meaning``: with ``"real-token"`` (text) ``mask`` marks real tokens, KD includes the last
one of a row (whose teacher target is the next row's first token) and CE counts ``t`` only when
``mask[t]`` and ``mask[t + 1]``; with ``"next-token-target"`` (chat) ``mask[t]`` already says that token
``t + 1`` is a target, so KD and CE count the same positions. Classification: one position, label =
the row's label.

Vocabulary policy (the same for ``train-student`` and the library's losses; see :class:`Vocabulary`):
a student's output layer has ``V_s`` rows, the teacher's ``V_t`` (its logits' rows), and the cache's
tokenizer ``V_tok`` real tokens (a classifier: ``V_t`` classes, and ``V_tok = V_t``).

- ``V_s > V_t`` (a padded student head, e.g. Qwen2.5-7B's 152,064 rows against 0.5B's 151,936): the
  extra logits are masked out of the student's distribution (the logits are cut to their first ``V_t``
  columns before any softmax), in the KD term and the CE alike, so the loss is that of the first
  ``V_t`` columns.
- ``V_s = V_t``: unchanged.
- ``V_tok <= V_s < V_t`` (a student sized to the tokenizer of a teacher with a padded vocabulary, Qwen:
  151,936 logits for 151,665 tokens): a padded id in the top-k cannot be scored by the student; its
  teacher mass is moved into the tail bucket and it drops out of the top-k (a drawn id of a sampled
  cache is dropped).
- ``V_s < V_tok``: refused (:class:`~kdpipe.pipeline.errors.ConfigError` naming both sizes).

The targets carry ``V_t`` and ``V_tok`` (``teacher_vocab_size``, ``min_student_vocab``: one value per
position, so that a loader can split and join a batch) when they were made from a cache; targets
built without them get the fold above for ids ``>= V_s`` and a refusal of hard labels ``>= V_s``.
"""

from __future__ import annotations

import dataclasses

import torch

from kdpipe.pipeline.cache.reader import renormalized_topk_logprobs
from kdpipe.pipeline.cache.sampling import mixture_weights, sample_weights
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
    teacher_vocab_size: torch.Tensor | None = None  # [N] int64: V_t, the teacher's logit rows (see module doc)
    min_student_vocab: torch.Tensor | None = None  # [N] int64: V_tok, the ids a student must score

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
    """How a sampled cache's draws were made: ``draws`` each, at captured temperature index ``index``
    (``T0 = temperature``), or, with ``scheme = "temperature-mixture"``, split over all the captured
    ``temperatures`` (``index`` and ``temperature`` are then None; see :mod:`kdpipe.pipeline.cache.sampling`)."""
    index: int | None
    temperature: float | None
    draws: int
    scheme: str = "one-temperature"
    temperatures: tuple[float, ...] = ()

    @classmethod
    def of(cls, schema) -> "Sampling | None":
        if not schema.sample_draws:
            return None
        if schema.sample_scheme == "temperature-mixture":
            return cls(None, None, schema.sample_draws, "temperature-mixture", tuple(schema.temperatures))
        return cls(schema.temperature_index(schema.sample_temperature), schema.sample_temperature, schema.sample_draws,
                   "one-temperature", tuple(schema.temperatures))


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The sizes the vocabulary policy compares a student with (see module doc)."""
    teacher: int  # V_t: rows of the teacher's logits (ids 0 .. V_t - 1 may be cached)
    required: int  # V_tok: ids a student must score (the tokenizer's tokens; a classifier's classes)
    task: str | None = None  # only for the wording of a refusal

    @classmethod
    def of(cls, cache) -> "Vocabulary | None":
        """From a cache (``TeacherCache``) or its manifest (a dict); None for anything else (a bare schema)."""
        manifest = getattr(cache, "manifest", cache)
        if not isinstance(manifest, dict) or "teacher_vocab_size" not in manifest.get("capture", {}):
            return None
        teacher = int(manifest["capture"]["teacher_vocab_size"])
        tokenizer = manifest.get("tokenizer") or {}
        task = manifest.get("schema", {}).get("task", "causal-lm")
        causal = task == "causal-lm"
        return cls(teacher, int(tokenizer["vocab_size"]) if causal and tokenizer.get("vocab_size") else teacher, task)

    def check(self, student_vocab: int) -> None:
        """Refuse a student that cannot score every real token (or class) of the teacher."""
        if student_vocab < self.required:
            what = {"causal-lm": "tokens in the cache's tokenizer", "classification": "teacher classes"}.get(
                self.task, "ids of the teacher's vocabulary")
            raise ConfigError(
                f"the student's vocabulary ({student_vocab}) does not cover the {self.required} {what}; "
                "give the student a vocab_size (or num_labels) of at least that")


def with_vocabulary(targets: "TeacherTargets", vocabulary: Vocabulary | None) -> "TeacherTargets":
    """``targets`` carrying ``vocabulary`` (one value per position), so the losses apply the policy."""
    if vocabulary is None:
        return targets
    n = targets.kd_mask.shape[0]
    full = lambda value: torch.full((n,), value, dtype=torch.int64, device=targets.kd_mask.device)  # noqa: E731
    return dataclasses.replace(targets, teacher_vocab_size=full(vocabulary.teacher),
                               min_student_vocab=full(vocabulary.required))


def vocabulary_of(targets: "TeacherTargets") -> Vocabulary | None:
    """The :class:`Vocabulary` the targets carry, or None (targets built without a cache's sizes)."""
    if targets.teacher_vocab_size is None or targets.min_student_vocab is None or not targets.kd_mask.numel():
        return None
    teacher, required = int(targets.teacher_vocab_size[0]), int(targets.min_student_vocab[0])
    return Vocabulary(teacher, required)


def teacher_targets(
    batch: dict, *, temperature_index: int, temperature: float, task: str, mask_meaning: str = "real-token",
    sampling: Sampling | None = None, renormalize: bool = False, vocabulary: Vocabulary | None = None,
) -> TeacherTargets:
    """Flatten a collated batch (``[B, P, ...]``) into per-position targets at one temperature.

    ``sampling`` (sampled caches, see :class:`Sampling`): also the drawn ids with their exact
    log-probabilities and unbiased importance weights at this temperature.
    ``renormalize``: rescale the top-k so that it sums to ``1 - r_T`` (the exact tail bucket's
    complement), so that the k + 1 bins sum to 1 (quantized values: their rounding leaves the sum a
    little off 1; :func:`~kdpipe.pipeline.cache.reader.renormalized_topk_logprobs`, as
    ``TeacherCache.read`` does). ``vocabulary``: the cache's sizes, carried for the vocabulary policy
    (:class:`Vocabulary`, :func:`with_vocabulary`).
    """
    k = batch["topk_ids"].shape[-1]
    logsumexp = batch["logsumexp"][..., temperature_index]  # [B, P]
    logprobs = batch["topk_logits"] / temperature - logsumexp[..., None]  # [B, P, k]
    if renormalize:  # the top-k gets exactly the mass the (exact) tail leaves: 1 - r_T
        logprobs = renormalized_topk_logprobs(logprobs, batch["tail_logprob"][..., temperature_index])
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
    targets = with_vocabulary(targets, vocabulary)
    if sampling is None:
        return targets
    m = batch["sample_ids"].shape[-1]
    flat = lambda t: t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t.reshape(-1)  # noqa: E731
    if sampling.scheme == "temperature-mixture":
        log_p, weights = mixture_weights(
            flat(batch["sample_logits"]), flat(batch["sample_counts"]), logsumexp=flat(batch["logsumexp"]),
            tail_logprob=flat(batch["tail_logprob"]), temperatures=sampling.temperatures,
            temperature_index=temperature_index, draws=sampling.draws)
    else:
        log_p, weights = sample_weights(
            flat(batch["sample_logits"]), flat(batch["sample_counts"]), logsumexp=flat(logsumexp),
            logsumexp_t0=flat(batch["logsumexp"][..., sampling.index]),
            tail_logprob_t0=flat(batch["tail_logprob"][..., sampling.index]),
            temperature=temperature, sample_temperature=sampling.temperature, draws=sampling.draws)
    return dataclasses.replace(targets, sample_ids=batch["sample_ids"].reshape(-1, m), sample_logprobs=log_p,
                               sample_weights=weights)


def check_student_vocab(student_vocab: int, *, teacher_vocab: int, tokenizer_vocab: int | None, task: str) -> None:
    """A student must score every real token (or class) of the teacher (:meth:`Vocabulary.check`)."""
    required = tokenizer_vocab if (task == "causal-lm" and tokenizer_vocab) else teacher_vocab
    Vocabulary(teacher_vocab, required, task).check(student_vocab)


def student_vocab_in_use(student_vocab: int, targets: TeacherTargets) -> int:
    """How many of a student's ``student_vocab`` logits (output rows) enter its distribution: all of them,
    or the teacher's ``V_t`` when the student is larger; refuses a student smaller than ``V_tok``."""
    vocabulary = vocabulary_of(targets)
    if vocabulary is None:
        return student_vocab
    vocabulary.check(student_vocab)
    return min(student_vocab, vocabulary.teacher)


def apply_vocab_policy(student_logits: torch.Tensor, targets: TeacherTargets) -> tuple[torch.Tensor, TeacherTargets]:
    """The vocabulary policy of the module doc on ``student_logits [N, V_s]`` and their targets.

    Returns the logits cut to the teacher's ``V_t`` columns when the student is larger (a view), and
    the targets with teacher mass on ids the student does not have moved into the tail: such ids get
    ``-inf`` on both sides (the logits get ``-inf`` columns up to the largest cached id), so they
    contribute nothing to any divergence. Raises ConfigError for a student smaller than ``V_tok``, or
    (targets without the cache's sizes) one that cannot score a counted hard label.
    """
    vocab = student_vocab_in_use(student_logits.shape[-1], targets)
    if vocab < student_logits.shape[-1]:
        student_logits = student_logits[:, :vocab]
    counted = (targets.labels >= vocab) & targets.ce_mask
    if bool(counted.any()):
        raise ConfigError(f"the student's vocabulary ({vocab}) cannot score the hard label "
                          f"{int(targets.labels[counted].max())}; give the student a vocab_size (or num_labels) "
                          "of at least the teacher's")
    return _fold_padded_ids(student_logits, targets)


fold_padded_vocab = apply_vocab_policy  # the name its callers know


def _fold_padded_ids(student_logits: torch.Tensor, targets: TeacherTargets) -> tuple[torch.Tensor, TeacherTargets]:
    """Teacher mass on ids ``>= V_s`` into the tail (see :func:`apply_vocab_policy`)."""
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
