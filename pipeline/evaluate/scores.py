"""Scoring a batch: hard-label metrics, and the KL to the teacher (run here, or the cache's targets)
under the name that says what it is; :class:`Scores` sums them over batches."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from kdpipe.pipeline.capture.teachers import Teacher
from kdpipe.pipeline.errors import ConfigError, DataError
from kdpipe.pipeline.evaluate.bits_per_byte import ByteScores
from kdpipe.pipeline.evaluate.model import EvalModel
from kdpipe.pipeline.train import metrics


class Scores:
    """Everything summed over batches; :meth:`result` turns it into the reported numbers."""

    def __init__(self, task: str):
        self.task = task
        self.nll, self.top1 = metrics.Mean(), metrics.Mean()
        self.kl_dense, self.kl_cache = metrics.Mean(), metrics.Mean()  # the teacher run here; the cache's targets
        self.kl_cache_name: str | None = None  # what the cache's KL is (metrics.cache_kl_name)
        self.calibration = metrics.CalibrationBins()
        self.confusion: metrics.ConfusionMatrix | None = None
        self.rows = 0
        self.timings: list[tuple[float, int, int]] = []  # per batch: forward seconds, rows, fed tokens
        self.byte_scores: ByteScores | None = None  # bits per byte of text --data (evaluate/bits_per_byte.py)

    def result(self, *, text: bool) -> dict:
        out: dict = {"rows": self.rows}
        if self.task == "causal-lm":
            ce = self.nll.value
            out.update(tokens=self.nll.count, ce=ce, perplexity=_perplexity(ce),
                       accuracy=self.calibration_accuracy(), ece=self.calibration.value)
            if self.byte_scores is not None:
                out.update(self.byte_scores.result())
        else:
            out.update(accuracy=self.confusion.accuracy, macro_f1=self.confusion.macro_f1, ece=self.calibration.value)
        out.update(self.teacher_metrics())
        seconds, rows, tokens = (sum(t) for t in zip(*self.timings[1:] or self.timings))  # first batch: warm-up
        out["rows_per_s"] = rows / seconds if seconds else math.nan
        if text:
            out["tokens_per_s"] = tokens / seconds if seconds else math.nan
        return out

    def teacher_metrics(self) -> dict:
        """Positions, each KL by its name (see module doc) and top-1 agreement; {} without a teacher."""
        out: dict = {}
        if self.kl_dense.count:
            out.update(positions=self.kl_dense.count, kl_full=self.kl_dense.value)
        if self.kl_cache.count and self.kl_cache_name not in out:  # a k = V cache adds nothing to the dense KL
            out.setdefault("positions", self.kl_cache.count)
            out[self.kl_cache_name] = self.kl_cache.value
        if self.top1.count:  # a sampled cache without a top-k does not know the teacher's best id
            out["top1_agreement"] = self.top1.value
        return out

    def calibration_accuracy(self) -> float:
        n = float(self.calibration.count.sum())
        return float(self.calibration.correct.sum()) / n if n else math.nan


def _perplexity(ce: float) -> float:
    """``exp(ce)``: inf past float range, NaN when nothing was counted."""
    return math.exp(ce) if ce < 709.0 else (math.inf if ce == ce else math.nan)


def _forward(model: EvalModel, batch: dict, scores: Scores) -> torch.Tensor:
    """Student logits ``[B * P, V]`` (fp32), timing the forward pass."""
    inputs = torch.from_numpy(batch["inputs"]).to(model.device)
    attention = None if batch["attention"] is None else torch.from_numpy(batch["attention"]).to(model.device)
    started = time.perf_counter()
    logits = model.logits(inputs, attention)  # [B, P, V]
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    fed_tokens = int(attention.sum()) if attention is not None else 0  # text models only
    scores.timings.append((time.perf_counter() - started, len(inputs), fed_tokens))
    scores.rows += len(inputs)
    return logits.reshape(-1, logits.shape[-1]).float()


def _hard_targets(model: EvalModel, batch: dict, v: int, mask_meaning: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard targets ``[B * P]`` and where they are valid ``[B * P]`` (see module doc)."""
    if model.task == "causal-lm":
        ids, mask = torch.from_numpy(batch["inputs"]), torch.from_numpy(batch["mask"])  # [B, L]
        valid = mask.clone() if mask_meaning == "next-token-target" else mask & mask.roll(-1, dims=1)
        valid[:, -1] = False  # the last position's next token lies in the next row
        targets, valid = ids.roll(-1, dims=1).reshape(-1), valid.reshape(-1)
    else:
        targets = torch.from_numpy(np.asarray(batch["labels"], dtype=np.int64))  # [B]
        valid = torch.ones(len(targets), dtype=torch.bool)
    if valid.any() and int(targets[valid].max()) >= v:
        raise DataError(f"target id {int(targets[valid].max())} is out of range for a model with {v} outputs; "
                        "evaluate on data whose labels (or token ids) the model can predict")
    return targets, valid


def score_batch(model: EvalModel, batch: dict, scores: Scores, mask_meaning: str, teacher: Teacher | None) -> None:
    if "topk_ids" in batch and model.num_outputs is not None:
        _check_teacher_ids(batch, model.num_outputs)  # before the forward pass can fail on them
    logits = _forward(model, batch, scores)  # [N, V]
    v = logits.shape[-1]
    targets, valid = (t.to(logits.device) for t in _hard_targets(model, batch, v, mask_meaning))  # [N], [N]
    scores.nll.add(*metrics.token_cross_entropy(logits, targets, valid))
    if scores.byte_scores is not None:
        scores.byte_scores.add(logits, batch["inputs"], batch["mask"], batch["text_lengths"])
    probs_max, pred = torch.softmax(logits, dim=-1).max(dim=-1)  # [N], [N]
    scores.calibration.add(probs_max[valid], (pred == targets)[valid])
    if model.task == "classification":
        scores.confusion = scores.confusion or metrics.ConfusionMatrix(v)
        scores.confusion.add(pred[valid], targets[valid])
    if teacher is not None:
        _score_dense_teacher(logits, teacher, batch, scores)
    if "topk_ids" in batch:
        _score_cached_teacher(logits, batch, scores, top1=teacher is None)


def _check_teacher_ids(batch: dict, v: int) -> None:
    cached = batch["topk_ids"][batch["mask"]]  # [n_valid, k]
    if "sample_ids" in batch:  # drawn ids of real slots too
        drawn = batch["sample_ids"][batch["mask"]][np.isfinite(batch["sample_logprobs"][batch["mask"]])]
        cached = np.concatenate([cached.reshape(-1), drawn.reshape(-1)])
    if cached.size and int(cached.max()) >= v:
        raise ConfigError(f"the cache holds teacher id {int(cached.max())} but the model has only {v} outputs; "
                          "the student's vocabulary must cover the teacher's")


def _score_dense_teacher(logits: torch.Tensor, teacher: Teacher, batch: dict, scores: Scores) -> None:
    """The full-vocabulary KL and top-1 agreement against the teacher run on the batch's inputs."""
    inputs = torch.from_numpy(batch["inputs"]).to(teacher.device)
    attention = None if batch["attention"] is None else torch.from_numpy(batch["attention"]).to(teacher.device)
    teacher_logits = teacher.logits(inputs, attention)  # [B, P, V_t], in the teacher's dtype
    teacher_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(logits.device).float()  # [N, V_t]
    mask = torch.from_numpy(np.asarray(batch["mask"])).reshape(-1).to(logits.device)  # [N]
    scores.kl_dense.add(*metrics.dense_kl_to_teacher(logits, teacher_logits, mask))
    scores.top1.add(*metrics.top1_agreement(logits, teacher_logits.argmax(-1, keepdim=True), mask))


def _score_cached_teacher(logits: torch.Tensor, batch: dict, scores: Scores, *, top1: bool) -> None:
    """The KL the cache's targets give (named by what it is) and, when ``top1``, the top-1 agreement."""
    _check_teacher_ids(batch, logits.shape[-1])
    k = batch["topk_ids"].shape[-1]
    mask = torch.from_numpy(batch["mask"]).reshape(-1).to(logits.device)  # [N]
    n = mask.numel()
    topk_ids = torch.from_numpy(batch["topk_ids"]).reshape(n, k).to(logits.device)  # [N, k]
    topk_logprobs = torch.from_numpy(batch["topk_logprobs"]).reshape(n, k).to(logits.device)
    tail_logprob = torch.from_numpy(batch["tail_logprob"]).reshape(-1).to(logits.device)
    if "sample_ids" in batch:  # an unbiased estimate of the full KL from the draws (+ exact top-k)
        m = batch["sample_ids"].shape[-1]
        flat = lambda a: torch.from_numpy(a).reshape(n, m).to(logits.device)  # noqa: E731
        scores.kl_cache.add(*metrics.sampled_kl_to_teacher(logits, topk_ids, topk_logprobs, flat(batch["sample_ids"]),
                                                     flat(batch["sample_logprobs"]), flat(batch["sample_weights"]), mask))
    else:
        scores.kl_cache.add(*metrics.sparse_kl_to_teacher(logits, topk_ids, topk_logprobs, tail_logprob, mask))
    if k and top1:  # the teacher's best id is known only with a top-k
        scores.top1.add(*metrics.top1_agreement(logits, topk_ids, mask))
