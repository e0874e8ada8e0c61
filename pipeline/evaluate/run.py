"""Evaluating a trained student (or a teacher) on held-out data and against a teacher.

:func:`evaluate_model` streams over rows in batches and reports:

* on hard labels -- causal LM: ``ce`` (nats per predicted token), ``perplexity = exp(ce)``, next-token
  ``accuracy``, ``ece`` and ``tokens``; classification: ``accuracy``, ``macro_f1``, ``ece``;
* against the teacher, KL(teacher || student) at T = 1 under a name that says what it is
  (:data:`~kdpipe.pipeline.train.metrics.KL_MEANINGS`), ``top1_agreement`` (student argmax == the teacher's
  best id) and ``positions`` (how many were scored), over the valid positions:

  - ``kl_full``: over the full vocabulary. With ``teacher`` the teacher is run on the same rows (loaded
    as cache-teacher loads it; against a cache, its fingerprint must be the manifest's); without it, a
    top-k cache with k = V gives it exactly (up to the value encoding);
  - ``kl_topk_bins``: on a top-k cache's (k+1)-bin view (top-k + one tail bucket), k < V. Merging
    classes never increases a KL, so this is a **lower bound** of ``kl_full``, and can be far below it
    (docs/THEORY.md, section 3);
  - ``kl_full_estimate``: a sampled or mixed cache's unbiased estimate of the full KL from its draws.

  With both ``teacher`` and a cache, the cache's own KL is reported next to ``kl_full``;
  ``top1_agreement`` is then the teacher's argmax, else the cache's best id (absent for a sampled cache
  without a top-k). ``teacher_view`` says in words where the KL came from;
* ``rows``, ``rows_per_s`` and, for text models, ``tokens_per_s`` (attended input tokens per second of
  student forward pass, the teacher's not included; the first batch is a warm-up and is not timed
  unless it is the only one).

Without a cache the rows are ``data`` packed exactly as ``cache-teacher`` packs them. With a cache
the rows are the cache's rows: a text student is fed the cache's ``input_ids``; when ``data`` is
given too (required for classification caches, which store no attention mask or no input at all)
the inputs are ``data``'s rows at each cache row's ``sample_index``, checked by ``input_hash``.
Causal LM position ``t`` predicts token ``t + 1``: it is scored against the teacher where the
cache's (or the data rows') mask is True, and against ``input_ids[t + 1]`` where ``mask[t]`` and
``mask[t + 1]`` are (text), or where ``mask[t]`` is (chat data, whose mask marks the positions
predicting a target token).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from kdpipe.pipeline import data as datalib
from kdpipe.pipeline.cache.reader import TeacherCache, open_cache
from kdpipe.pipeline.capture.teachers import (
    Teacher,
    load_hf_teacher,
    load_module_teacher,
)
from kdpipe.pipeline.errors import CacheFormatError, ConfigError, DataError
from kdpipe.pipeline.models.devices import resolve_device, resolve_dtype
from kdpipe.pipeline.models.modules import is_module_spec
from kdpipe.pipeline.models.students import MODULE_META, load_saved_module
from kdpipe.pipeline.models.tokenizers import tokenizer_fingerprint
from kdpipe.pipeline.train import metrics

DEFAULT_SEQ_LEN = 256  # as cache-teacher; capped at the model's context (see data_seq_len)


# ----------------------------------------------------------------------------- loading a model dir
@dataclasses.dataclass
class EvalModel:
    kind: str  # "hf" or "module"
    task: str  # "causal-lm" or "classification"
    module: torch.nn.Module
    device: torch.device
    tokenizer: object | None = None
    max_positions: int | None = None
    num_outputs: int | None = None  # size of the logits' last axis; None for a module until it runs

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[B, P, V]`` (``P = L`` for a causal LM, 1 for a classifier) for inputs on ``device``."""
        if self.kind == "hf":
            out = self.module(input_ids=inputs, attention_mask=attention_mask).logits
        else:
            out = self.module(inputs)
        if self.task == "classification":
            if out.ndim != 2:
                raise ConfigError(f"the model returns shape {tuple(out.shape)}; a classifier must return logits [batch, classes]")
            out = out[:, None, :]
        return out


def load_model(model_dir: str | Path, *, device: torch.device) -> EvalModel:
    """A Hugging Face model dir (config.json) or a kdpipe module dir (kdpipe_module.json), in fp32.

    A train-student run dir stands for its final model, ``model/``. A module dir's factory may name a
    ``.py`` file relative to the dir itself.
    """
    root = Path(model_dir)
    if not (root / MODULE_META).is_file() and not (root / "config.json").is_file() and (root / "model").is_dir():
        root = root / "model"  # a train-student run dir: its final model
    if (root / MODULE_META).is_file():
        return _load_module_dir(root, device)
    if (root / "config.json").is_file():
        return _load_hf_dir(root, device)
    raise ConfigError(
        f"--model {model_dir} holds neither config.json (Hugging Face) nor {MODULE_META} (module); "
        "point it at a train-student output dir or a model dir saved with save_pretrained"
    )


def _load_hf_dir(root: Path, device: torch.device) -> EvalModel:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    try:
        config = AutoConfig.from_pretrained(root, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
        archs = getattr(config, "architectures", None) or []
        task = "classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal-lm"
        auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
        model = auto.from_pretrained(root, dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot load model {root}: {first} "
                          "(it needs config.json, weights and tokenizer files)") from None
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    num_outputs = config.num_labels if task == "classification" else model.get_output_embeddings().weight.shape[0]
    return EvalModel("hf", task, model.to(device).eval(), device, tokenizer, max_positions, int(num_outputs))


def _load_module_dir(root: Path, device: torch.device) -> EvalModel:
    module = load_saved_module(root).to(device=device, dtype=torch.float32)
    return EvalModel("module", "classification", module.eval(), device)


# ----------------------------------------------------------------------------- rows and batches
def _data_rows(model: EvalModel, data: str | Path, seq_len: int | None, capture: dict | None = None) -> "_DataRows":
    """``data`` as model inputs, packed exactly as cache-teacher packs them (with the packing
    settings of the capture ``capture`` when evaluating against a cache)."""
    from kdpipe.pipeline.data.stream import BlockStream, collect

    source = datalib.resolve_source(data)
    if model.kind == "module":
        rows = datalib.rows_from_arrays(data)
        return _DataRows(rows, np.arange(len(rows), dtype=np.int64), "real-token")
    if source.kind == "arrays":
        raise DataError(f"--data {data} holds arrays, but --model is a text model; pass text data (.txt, .jsonl, .parquet, ...)")
    if model.max_positions is not None and seq_len is not None and seq_len > model.max_positions:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context of {model.max_positions} tokens; "
                          f"use --seq-len {model.max_positions} or less")
    capture = capture or {}
    fields = datalib.Fields(text=capture.get("text_field", "text"), messages=capture.get("messages_field", "messages"))
    first = next(datalib.data_documents(source, fields), None)
    if first is None:
        raise DataError(f"data {data} holds no records; give it non-empty documents")
    if first.is_chat:
        from kdpipe.pipeline.data.chat import check_chat_template

        check_chat_template(model.tokenizer, teacher=f"model {model_dir_name(model)}")
    spec = datalib.PackingSpec(
        model.task, seq_len, model.tokenizer,
        chat=first.is_chat, targets=capture.get("targets", "assistant"), packing=capture.get("packing", False),
    )
    rows, keys = collect(BlockStream(source, spec, fields))
    return _DataRows(rows, keys, "next-token-target" if first.is_chat else "real-token")


@dataclasses.dataclass
class _DataRows:
    rows: datalib.Rows
    keys: np.ndarray  # [N] sample_index of each row, as a capture of the same data numbers them
    mask_meaning: str

    def position(self) -> dict[int, int]:
        return {int(key): i for i, key in enumerate(self.keys)}


def model_dir_name(model: EvalModel) -> str:
    return getattr(model.module, "name_or_path", None) or "(given)"


def _stack(items: list[dict]) -> dict:
    """Row dicts -> one batch dict; a field that is None in the rows stays None."""
    return {k: None if items[0][k] is None else np.stack([item[k] for item in items]) for k in items[0]}


def _data_batches(data: _DataRows, n: int, batch_size: int) -> Iterator[dict]:
    """Batches of ``inputs``, ``attention``, ``mask`` [B, P] and ``labels`` from in-memory rows."""
    rows = data.rows
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        yield {
            "inputs": rows.inputs[sl], "mask": rows.mask[sl],
            "attention": None if rows.attention_mask is None else rows.attention_mask[sl],
            "labels": None if rows.labels is None else rows.labels[sl],
        }


def _cache_batches(cache: TeacherCache, data: _DataRows | None, n: int, batch_size: int) -> Iterator[dict]:
    """Batches of the cache's first ``n`` rows at T = 1, with their inputs (see module doc)."""
    position = None if data is None else data.position()
    for start in range(0, n, batch_size):
        yield _stack([_cache_item(cache, i, data, position) for i in range(start, min(start + batch_size, n))])
        for shard in range(cache.locate(start)[0], cache.locate(min(start + batch_size, n) - 1)[0]):
            cache.release(shard)  # read to its end (a remote shard's copy may go)


def _cache_item(cache: TeacherCache, i: int, data: _DataRows | None, position: dict | None) -> dict:
    """Cache row ``i`` at T = 1 with its model input, checked against the row's ``input_hash``."""
    row = cache.read(i, temperature=1.0)
    sample, made_from = int(row["sample_index"]), cache.manifest["data"]["path"]
    if data is None:
        x = row["input_ids"]
        if cache.schema.mask_meaning == "real-token":
            attention = row["mask"].astype(np.int64)  # text: mask == attention
        else:  # chat rows are padded on the right, which no real position of a causal model attends to
            attention = np.ones_like(x)
    else:
        if sample not in position:
            raise DataError(f"cache row {i} is sample {sample}, which --data does not make ({len(data.keys)} rows); "
                            f"pass the data the cache was made from ({made_from})")
        x = data.rows.inputs[position[sample]]
        attention = None if data.rows.attention_mask is None else data.rows.attention_mask[position[sample]]
    if datalib.input_hash(x) != int(row["input_hash"]):
        raise DataError(f"cache row {i} (sample {sample}): the input's hash differs from the cache's input_hash; "
                        f"pass the data the cache was made from ({made_from})")
    with np.errstate(divide="ignore"):
        tail_logprob = np.log(row["tail_mass"])  # -inf where the tail is empty (k = V)
    item = {"inputs": x, "attention": attention, "mask": row["mask"], "labels": row.get("label"),
            "topk_ids": row["topk_ids"], "topk_logprobs": row["topk_logprobs"], "tail_logprob": tail_logprob}
    if "sample_ids" in row:  # a sampled cache: the KL is estimated from its draws
        item.update({k: row[k] for k in ("sample_ids", "sample_logprobs", "sample_weights")})
    return item


def _check_cache_fits(model: EvalModel, cache: TeacherCache, data, seq_len) -> None:
    """Refuse a cache of another task, seq_len or tokenizer, or one whose inputs need ``data``."""
    schema, manifest = cache.schema, cache.manifest
    if schema.task != model.task:
        raise ConfigError(f"cache {cache.root} is for a {schema.task} teacher but --model is a {model.task} model; "
                          "evaluate against a cache of the same task")
    if seq_len is not None and schema.input_len is not None and seq_len != schema.input_len:
        raise ConfigError(f"--seq-len {seq_len} differs from the cache's seq_len {schema.input_len}; "
                          "drop --seq-len when evaluating against a cache")
    if data is None and (schema.input_len is None or schema.task == "classification"):
        raise ConfigError(f"cache {cache.root} holds classification rows, whose inputs are read from the data "
                          f"it was made from: pass --data {manifest['data']['path']}")
    cached, mine = manifest.get("tokenizer"), model.tokenizer
    if (cached is None) != (mine is None):
        raise ConfigError(f"cache {cache.root} and --model disagree on having a tokenizer (a text model against "
                          "an array cache or the reverse); use a cache made by the same kind of model")
    if mine is not None and (sha := tokenizer_fingerprint(mine)["sha256"]) != cached["sha256"]:
        raise ConfigError(f"the model's tokenizer (sha256 {sha[:12]}) differs from the cache's "
                          f"({cached['sha256'][:12]}); the student must use the teacher's tokenizer")


# ----------------------------------------------------------------------------- scoring
class _Scores:
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

    def result(self, *, text: bool) -> dict:
        out: dict = {"rows": self.rows}
        if self.task == "causal-lm":
            ce = self.nll.value
            out.update(tokens=self.nll.count, ce=ce, perplexity=_perplexity(ce),
                       accuracy=self.calibration_accuracy(), ece=self.calibration.value)
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


def _forward(model: EvalModel, batch: dict, scores: _Scores) -> torch.Tensor:
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


def _score_batch(model: EvalModel, batch: dict, scores: _Scores, mask_meaning: str, teacher: Teacher | None) -> None:
    if "topk_ids" in batch and model.num_outputs is not None:
        _check_teacher_ids(batch, model.num_outputs)  # before the forward pass can fail on them
    logits = _forward(model, batch, scores)  # [N, V]
    v = logits.shape[-1]
    targets, valid = (t.to(logits.device) for t in _hard_targets(model, batch, v, mask_meaning))  # [N], [N]
    scores.nll.add(*metrics.token_cross_entropy(logits, targets, valid))
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


def _score_dense_teacher(logits: torch.Tensor, teacher: Teacher, batch: dict, scores: _Scores) -> None:
    """The full-vocabulary KL and top-1 agreement against the teacher run on the batch's inputs."""
    inputs = torch.from_numpy(batch["inputs"]).to(teacher.device)
    attention = None if batch["attention"] is None else torch.from_numpy(batch["attention"]).to(teacher.device)
    teacher_logits = teacher.logits(inputs, attention)  # [B, P, V_t], in the teacher's dtype
    teacher_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(logits.device).float()  # [N, V_t]
    mask = torch.from_numpy(np.asarray(batch["mask"])).reshape(-1).to(logits.device)  # [N]
    scores.kl_dense.add(*metrics.dense_kl_to_teacher(logits, teacher_logits, mask))
    scores.top1.add(*metrics.top1_agreement(logits, teacher_logits.argmax(-1, keepdim=True), mask))


def _score_cached_teacher(logits: torch.Tensor, batch: dict, scores: _Scores, *, top1: bool) -> None:
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


# ----------------------------------------------------------------------------- seq-len of data rows
def data_seq_len(model: EvalModel, model_dir, seq_len: int | None) -> tuple[int, str]:
    """Tokens per row for text ``data`` without a cache, and where that number comes from: ``seq_len``
    when given; else the seq_len of the cache a train-student model was trained on (its run dir's
    ``run.json`` names the cache), so the model is scored on rows like those it learnt from; else
    :data:`DEFAULT_SEQ_LEN`, capped at the model's context."""
    if seq_len is not None:
        return seq_len, "--seq-len"
    trained = _training_cache_seq_len(Path(model_dir))
    if trained is not None:
        return trained
    if model.max_positions is not None and model.max_positions < DEFAULT_SEQ_LEN:
        return model.max_positions, f"the model's context (default {DEFAULT_SEQ_LEN}, capped at it; --seq-len sets it)"
    return DEFAULT_SEQ_LEN, f"default {DEFAULT_SEQ_LEN} (--seq-len sets it)"


def _training_cache_seq_len(model_dir: Path) -> tuple[int, str] | None:
    """The row length a train-student run dir (``model_dir`` or its parent) trained on: recorded in its
    ``run.json``, or (runs of earlier versions) read from the manifest of the cache it names, when that
    cache is a folder here; None otherwise."""
    from kdpipe.pipeline.cache.manifest import MANIFEST_NAME
    from kdpipe.pipeline.train.checkpoint import RUN_MANIFEST

    run = next((d / RUN_MANIFEST for d in (model_dir, model_dir.parent) if (d / RUN_MANIFEST).is_file()), None)
    if run is None:
        return None
    try:
        record = json.loads(run.read_text())
        cache = record.get("cache_path") or ""
        if record.get("seq_len"):  # recorded by the run itself (wherever its cache is now)
            return int(record["seq_len"]), f"the training run {run.parent} (its cache's rows)"
        manifest = Path(cache) / MANIFEST_NAME
        seq_len = json.loads(manifest.read_text())["schema"]["input_len"] if manifest.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (int(seq_len), f"the training cache {cache}") if seq_len else None


# ----------------------------------------------------------------------------- entry point
def evaluate_model(model_dir, *, data=None, cache=None, teacher=None, weights=None, seq_len=None, batch_size=16,
                   device="auto", max_rows=None, storage_options=None, on_rows=None) -> dict:
    """Metrics of the model in ``model_dir`` on ``data`` and/or against the teacher ``cache``, and
    against ``teacher`` run on the same rows.

    model_dir: a Hugging Face model dir or a kdpipe module dir. data: text path (causal LM / text
    classifier) or ``.npz`` (module). cache: a teacher cache dir or object-store URL (read with
    ``storage_options``, see :class:`~kdpipe.pipeline.cache.reader.TeacherCache`). teacher: a model dir, hub id
    or ``file.py:factory`` (with its ``weights``) to run on the rows for the full-vocabulary KL; against
    a cache it must be the cache's teacher. seq_len: row length for text data without a cache (see
    :func:`data_seq_len`; with a cache, the cache's). on_rows(new_rows, total): called after each batch.
    Returns a flat JSON-ready dict (see the module doc for the keys; text models add ``seq_len`` and
    ``seq_len_from``).
    """
    if data is None and cache is None:
        raise ConfigError("nothing to evaluate on: pass --data, --cache, or both")
    if batch_size < 1 or (max_rows is not None and max_rows < 1):
        raise ConfigError("--batch-size and --max-rows must be at least 1")
    model = load_model(model_dir, device=resolve_device(device))
    scores, report = _Scores(model.task), on_rows or (lambda new_rows, total: None)
    teacher = None if teacher is None else str(teacher)
    if cache is None:
        seq_len, seq_len_from = data_seq_len(model, model_dir, seq_len) if model.kind == "hf" else (None, None)
        rows = _data_rows(model, data, seq_len)
        run_teacher = None if teacher is None else _data_teacher(teacher, weights, model, rows, device)
        view = None if teacher is None else f"full vocabulary: teacher {teacher} run on the rows"
        n = min(len(rows.keys), max_rows or len(rows.keys))
        for batch in _data_batches(rows, n, batch_size):
            _score_batch(model, batch, scores, rows.mask_meaning, run_teacher)
            report(len(batch["inputs"]), n)
    else:
        with open_cache(cache, storage_options=storage_options) as c:
            _check_cache_fits(model, c, data, seq_len)
            seq_len, seq_len_from = c.schema.input_len, "the cache"
            rows = None if data is None else _data_rows(model, data, c.schema.input_len, c.manifest["capture"])
            n = min(len(c), max_rows or len(c))
            if n == 0:
                raise CacheFormatError(f"cache {c.root} holds no rows; re-run cache-teacher")
            run_teacher = None if teacher is None else _cache_teacher(c, teacher, weights, device)
            scores.kl_cache_name, view = _cache_view(c, teacher)
            c.schedule(list(range(c.locate(n - 1)[0] + 1)))  # rows are read in order: shards too
            for batch in _cache_batches(c, rows, n, batch_size):
                _score_batch(model, batch, scores, c.schema.mask_meaning, run_teacher)
                report(len(batch["inputs"]), n)
    header = {"model": str(model_dir), "task": model.task, "evaluated_on": "data" if cache is None else "cache"}
    if model.kind == "hf" and seq_len is not None:
        header.update(seq_len=seq_len, seq_len_from=seq_len_from)
    result = {**header, **scores.result(text=model.kind == "hf")}
    if view is not None:
        result.update(teacher_view=view, kl_temperature=1.0)
    return result


# ----------------------------------------------------------------------------- the teacher
def _cache_teacher(cache: TeacherCache, teacher: str, weights: str | None, device: str) -> Teacher:
    """``teacher`` loaded as cache-teacher loads it, refused unless its fingerprint is the cache's teacher's."""
    from kdpipe.pipeline.evaluate.fidelity import load_cache_teacher

    return load_cache_teacher(cache, teacher=teacher, weights=weights, device=device)


def _data_teacher(teacher: str, weights: str | None, model: EvalModel, rows: "_DataRows", device: str) -> Teacher:
    """``teacher`` loaded as cache-teacher loads it, for scoring ``data``'s rows; its tokenizer must be the model's."""
    run_on = resolve_device(device)
    if is_module_spec(teacher):
        labels = rows.rows.labels
        num_classes = int(np.max(labels)) + 1 if labels is not None and len(labels) else 0
        loaded = load_module_teacher(teacher, weights=weights, device=run_on, dtype=torch.float32, num_classes=num_classes)
    else:
        loaded = load_hf_teacher(teacher, device=run_on, dtype=resolve_dtype("auto", run_on), task=model.task)
    if loaded.task != model.task:
        raise ConfigError(f"--teacher {teacher} is a {loaded.task} model but --model is a {model.task} model; "
                          "pass the teacher the student was distilled from")
    theirs, mine = loaded.tokenizer_fingerprint, model.tokenizer
    if (theirs is None) != (mine is None) or (mine is not None and tokenizer_fingerprint(mine)["sha256"] != theirs["sha256"]):
        raise ConfigError(f"--teacher {teacher} and --model use different tokenizers; pass the teacher the student "
                          "was distilled from (they must share one tokenizer)")
    return loaded


def _cache_view(cache: TeacherCache, teacher: str | None) -> tuple[str, str]:
    """The name of the KL the cache's targets give, and in words where the reported KL comes from."""
    schema, vocab = cache.schema, int(cache.manifest["capture"]["teacher_vocab_size"])
    name = metrics.cache_kl_name(top_k=schema.top_k, vocab_size=vocab, sampled=bool(schema.sample_draws))
    if teacher is not None:
        return name, f"full vocabulary: teacher {teacher} run on the cache's rows ({name}: {metrics.KL_MEANINGS[name]})"
    what = {metrics.KL_FULL: f"top-{schema.top_k} of {vocab} cached ids, the full vocabulary",
            metrics.KL_TOPK_BINS: f"top-{schema.top_k} of {vocab} cached ids + a tail bucket: a lower bound of the "
                                  "full KL (--teacher gives the full KL)",
            metrics.KL_FULL_ESTIMATE: f"{schema.sample_draws} draws per position"
                                      + (f" + top-{schema.top_k}" if schema.top_k else "")
                                      + ": an unbiased estimate of the full KL"}[name]
    return name, f"the cache's {what}"


def cache_holds_inputs(cache, *, storage_options=None) -> bool:
    """Whether a cache's rows hold their own model inputs (a causal LM's tokens), so scoring them
    needs no ``data``."""
    with open_cache(cache, storage_options=storage_options) as c:
        return c.schema.task == "causal-lm" and c.schema.input_len is not None
