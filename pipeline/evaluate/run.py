"""Evaluating a trained student (or a teacher) on held-out data and against a teacher.

:func:`evaluate_model` streams over rows in batches and reports:

* on hard labels -- causal LM: ``ce`` (nats per predicted token), ``perplexity = exp(ce)``, next-token
  ``accuracy``, ``ece`` and ``tokens``; on text ``--data``, also ``bits_per_byte`` (with ``bytes`` and
  ``bpb_tokens``), comparable across tokenizers (:mod:`.bits_per_byte`); classification: ``accuracy``,
  ``macro_f1``, ``ece``;
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

import numpy as np
import torch

from kdpipe.pipeline.cache.reader import TeacherCache, open_cache
from kdpipe.pipeline.capture.teachers import Teacher, load_hf_teacher, load_module_teacher
from kdpipe.pipeline.errors import CacheFormatError, ConfigError
from kdpipe.pipeline.evaluate.bits_per_byte import ByteScores, start_logprobs
from kdpipe.pipeline.evaluate.model import EvalModel, data_seq_len, load_model, training_teacher_vocab
from kdpipe.pipeline.evaluate.rows import DataRows, cache_batches, check_cache_fits, data_batches, data_rows
from kdpipe.pipeline.evaluate.scores import Scores, score_batch
from kdpipe.pipeline.models.devices import resolve_device, resolve_dtype
from kdpipe.pipeline.models.modules import is_module_spec
from kdpipe.pipeline.models.tokenizers import tokenizer_fingerprint
from kdpipe.pipeline.train import metrics


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
    :func:`~kdpipe.pipeline.evaluate.model.data_seq_len`; with a cache, the cache's). on_rows(new_rows, total): called after each batch.
    Returns a flat JSON-ready dict (see the module doc for the keys; text models add ``seq_len`` and
    ``seq_len_from``).
    """
    if data is None and cache is None:
        raise ConfigError("nothing to evaluate on: pass --data, --cache, or both")
    if batch_size < 1 or (max_rows is not None and max_rows < 1):
        raise ConfigError("--batch-size and --max-rows must be at least 1")
    model = load_model(model_dir, device=resolve_device(device))
    model.vocab_in_use = training_teacher_vocab(model_dir)  # a padded head scored as it was trained
    scores, report = Scores(model.task), on_rows or (lambda new_rows, total: None)
    teacher = None if teacher is None else str(teacher)
    if cache is None:
        seq_len, seq_len_from = data_seq_len(model, model_dir, seq_len) if model.kind == "hf" else (None, None)
        rows = data_rows(model, data, seq_len)
        run_teacher = None if teacher is None else _data_teacher(teacher, weights, model, rows, device)
        if run_teacher is not None and model.task == "causal-lm":
            model.vocab_in_use = run_teacher.vocab_size
        view = None if teacher is None else f"full vocabulary: teacher {teacher} run on the rows"
        n = min(len(rows.keys), max_rows or len(rows.keys))
        if model.task == "causal-lm" and rows.rows.text is not None and rows.mask_meaning == "real-token":
            scores.byte_scores = ByteScores(start_logprobs(model, model.tokenizer.eos_token_id))  # text: bits per byte
        for batch in data_batches(rows, n, batch_size):
            score_batch(model, batch, scores, rows.mask_meaning, run_teacher)
            report(len(batch["inputs"]), n)
    else:
        with open_cache(cache, storage_options=storage_options) as c:
            check_cache_fits(model, c, data, seq_len)
            model.vocab_in_use = int(c.manifest["capture"]["teacher_vocab_size"])
            seq_len, seq_len_from = c.schema.input_len, "the cache"
            rows = None if data is None else data_rows(model, data, c.schema.input_len, c.manifest["capture"])
            n = min(len(c), max_rows or len(c))
            if n == 0:
                raise CacheFormatError(f"cache {c.root} holds no rows; re-run cache-teacher")
            run_teacher = None if teacher is None else _cache_teacher(c, teacher, weights, device)
            scores.kl_cache_name, view = _cache_view(c, teacher)
            c.schedule(list(range(c.locate(n - 1)[0] + 1)))  # rows are read in order: shards too
            for batch in cache_batches(c, rows, n, batch_size):
                score_batch(model, batch, scores, c.schema.mask_meaning, run_teacher)
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


def _data_teacher(teacher: str, weights: str | None, model: EvalModel, rows: DataRows, device: str) -> Teacher:
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
