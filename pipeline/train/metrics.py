"""Evaluation metrics as pure torch functions, plus accumulators that sum them over batches.

Every per-batch function returns sums and counts (not means) where a metric averages over items,
so :class:`Mean`, :class:`ConfusionMatrix` and :class:`CalibrationBins` can add batches together and
an evaluation streams over a dataset with bounded memory. ``N`` is the number of items (token
positions or examples), ``V`` the student's vocabulary (or class count), ``k`` the cached top-k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdpipe.pipeline.train.losses import sampled_kd_loss, sparse_kd_loss

# ----------------------------------------------------------------------------- what a KL to the teacher is
# Every evaluation names its KL(teacher || student) by what was computed, never plainly "KL to teacher":
KL_FULL = "kl_full"  # over the full vocabulary: the teacher run on the rows, or a cache with k = V
KL_TOPK_BINS = "kl_topk_bins"  # on a top-k cache's (k+1)-bin view (k < V): a lower bound of the full KL
KL_FULL_ESTIMATE = "kl_full_estimate"  # a sampled cache's unbiased estimate of the full KL
LEGACY_KL = "kl_to_teacher"  # what runs of earlier versions wrote, in any of the three senses
KL_MEANINGS = {
    KL_FULL: "KL(teacher || student) over the full vocabulary",
    KL_TOPK_BINS: "KL on the cache's (k+1)-bin view (top-k + tail bucket): a lower bound of the full KL",
    KL_FULL_ESTIMATE: "unbiased estimate of the full-vocabulary KL from the cache's draws",
}


def cache_kl_name(*, top_k: int, vocab_size: int, sampled: bool) -> str:
    """The name of the KL a cache's targets give: :data:`KL_FULL_ESTIMATE` when the draws are used
    (``sampled``), :data:`KL_FULL` for a top-k with ``k = V``, else :data:`KL_TOPK_BINS`."""
    if sampled:
        return KL_FULL_ESTIMATE
    return KL_FULL if top_k >= vocab_size else KL_TOPK_BINS


# ----------------------------------------------------------------------------- per-batch functions
def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood (nats, fp32) over positions where ``mask`` is True, and their count.

    logits: [N, V] raw logits; targets: [N] int64 ids; mask: [N] bool.
    """
    nll = F.cross_entropy(logits.float(), targets, reduction="none")  # [N]
    return torch.where(mask, nll, 0.0).sum(), int(mask.sum())


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of ``pred [N] == target [N]``; NaN when N = 0."""
    return float((pred == target).float().mean()) if len(pred) else math.nan


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts, row = true class, column = predicted class. pred, target: [N] int64."""
    flat = target.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def f1_from_confusion(confusion: torch.Tensor) -> float:
    """Macro F1 from a ``[C, C]`` confusion matrix (rows true, columns predicted).

    Averages over the classes that occur as a target or a prediction (as scikit-learn does when no
    label list is given); a class never predicted, or never right, has F1 = 0. NaN when empty.
    """
    c = confusion.double()
    tp = c.diag()
    support, predicted = c.sum(1), c.sum(0)
    seen = (support + predicted) > 0
    if not seen.any():
        return math.nan
    f1 = 2 * tp / (support + predicted).clamp_min(1)  # = 2PR / (P + R)
    return float(f1[seen].mean())


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 (see :func:`f1_from_confusion`). pred, target: [N] int64."""
    return f1_from_confusion(confusion_matrix(pred, target, num_classes))


def expected_calibration_error(probs_max: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE: ``sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|`` over equal-width bins.

    probs_max: [N] probability of the predicted class; correct: [N] bool. Bin ``b`` holds
    confidences in ``(b / bins, (b + 1) / bins]`` (confidence 0 goes to the first bin). NaN when N = 0.
    """
    calibration = CalibrationBins(bins)
    calibration.add(probs_max, correct)
    return calibration.value


def sparse_kl_to_teacher(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
                         mask, *, temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || student) at T = 1 on the (k+1)-bin view, and the number of positions.

    student_logits: [N, V]; topk_ids: [N, k] int64; teacher_topk_logprobs: [N, k] ``log p(i)``;
    teacher_tail_logprob: [N] ``log(1 - sum_topk p)`` (``-inf`` when empty); mask: [N] bool.
    Lumping the tail into one bin can only lose divergence, so this is a lower bound of the full-vocabulary
    KL, exact at k = V. Computed by :func:`kdpipe.pipeline.train.losses.sparse_kd_loss` (forward KL); at
    another ``temperature`` the teacher log-probs must be at that T and the student is tempered alike
    (the result is the plain KL, without the loss's T^2 factor).
    """
    count = int(mask.sum())
    mean = sparse_kd_loss(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
                          temperature=temperature, kind="forward-kl", mask=mask)
    return mean.detach() * count / temperature**2, count


def sampled_kl_to_teacher(student_logits, topk_ids, teacher_topk_logprobs, sample_ids, sample_logprobs,
                          sample_weights, mask, *, temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || student) of a sampled cache's targets, and the number of positions.

    Shapes as :func:`kdpipe.pipeline.train.losses.sampled_kd_loss` (exact top-k ``[N, k]``, possibly
    ``k = 0``, plus importance-weighted draws ``[N, m]``); mask: [N] bool. An unbiased estimate of
    the full-vocabulary KL (not a bound): plain KL, without the loss's T^2 factor.
    """
    count = int(mask.sum())
    mean = sampled_kd_loss(student_logits, topk_ids, teacher_topk_logprobs, sample_ids, sample_logprobs,
                           sample_weights, temperature=temperature, kind="forward-kl", mask=mask)
    return mean.detach() * count / temperature**2, count


def dense_kl_to_teacher(student_logits, teacher_logits, mask, *, temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """Summed KL(p_T || q_T) over the full vocabulary, and the number of positions where ``mask`` is True.

    student_logits: [N, V_s]; teacher_logits: [N, V_t] raw logits with ``V_t <= V_s`` (a student's
    padded vocabulary: its extra ids have teacher probability 0 and count only in ``q_T``'s
    normaliser); mask: [N] bool. Plain KL at ``temperature``, without the loss's T^2 factor, in fp32.
    """
    v_student, v_teacher = student_logits.shape[-1], teacher_logits.shape[-1]
    if v_teacher > v_student:
        raise ValueError(f"the teacher has {v_teacher} outputs but the student only {v_student}; "
                         "the student's vocabulary must cover the teacher's")
    log_q = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)[:, :v_teacher]  # [n, V_t]
    log_p = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)  # [n, V_t]
    kl = torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0).sum(-1)  # [n]; p = 0 adds nothing
    return kl.sum().detach(), int(mask.sum())


def top1_agreement(student_logits: torch.Tensor, topk_ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """Positions where the student's argmax is the teacher's best id ``topk_ids[:, 0]``, and the count.

    student_logits: [N, V]; topk_ids: [N, k] int64, best first; mask: [N] bool.
    """
    agree = (student_logits.argmax(-1) == topk_ids[:, 0]) & mask
    return int(agree.sum()), int(mask.sum())


# ----------------------------------------------------------------------------- accumulators
class Mean:
    """A running ``total / count``; ``value`` is NaN before anything was counted."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, total, count: int) -> None:
        self.total += float(total)
        self.count += int(count)

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else math.nan


class ConfusionMatrix:
    """A ``[C, C]`` confusion matrix summed over batches (rows true, columns predicted)."""

    def __init__(self, num_classes: int):
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.counts += confusion_matrix(pred.cpu(), target.cpu(), len(self.counts))

    @property
    def accuracy(self) -> float:
        n = int(self.counts.sum())
        return float(self.counts.diag().sum()) / n if n else math.nan

    @property
    def macro_f1(self) -> float:
        return f1_from_confusion(self.counts)


class CalibrationBins:
    """Per-bin count, summed confidence and summed correctness; ``value`` is the ECE so far."""

    def __init__(self, bins: int = 15):
        if bins < 1:
            raise ValueError(f"bins={bins} is invalid: pass at least 1 bin (15 is usual)")
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.confidence = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def add(self, probs_max: torch.Tensor, correct: torch.Tensor) -> None:
        """probs_max: [N] in [0, 1]; correct: [N] bool."""
        p = probs_max.detach().double().cpu()
        b = (torch.ceil(p * self.bins).long() - 1).clamp(0, self.bins - 1)  # (b/M, (b+1)/M] -> b
        self.count += torch.bincount(b, minlength=self.bins).double()
        self.confidence += torch.bincount(b, weights=p, minlength=self.bins)
        self.correct += torch.bincount(b, weights=correct.detach().double().cpu(), minlength=self.bins)

    @property
    def value(self) -> float:
        n = float(self.count.sum())
        if n == 0:
            return math.nan
        return float((self.correct - self.confidence).abs().sum() / n)  # sum_b |B_b|/N |acc_b - conf_b|
