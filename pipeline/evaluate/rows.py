"""The rows ``kdpipe evaluate`` scores, in batches: ``data`` packed as cache-teacher packs it, or a
cache's rows with their inputs (the cache's own tokens, or ``data``'s rows checked by ``input_hash``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np

from kdpipe.pipeline import data as datalib
from kdpipe.pipeline.cache.reader import TeacherCache
from kdpipe.pipeline.errors import ConfigError, DataError
from kdpipe.pipeline.evaluate.model import EvalModel, model_dir_name
from kdpipe.pipeline.models.tokenizers import tokenizer_fingerprint


def data_rows(model: EvalModel, data: str | Path, seq_len: int | None, capture: dict | None = None) -> DataRows:
    """``data`` as model inputs, packed exactly as cache-teacher packs them (with the packing
    settings of the capture ``capture`` when evaluating against a cache)."""
    from kdpipe.pipeline.data.stream import BlockStream, collect

    source = datalib.resolve_source(data)
    if model.kind == "module":
        rows = datalib.rows_from_arrays(data)
        return DataRows(rows, np.arange(len(rows), dtype=np.int64), "real-token")
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
    return DataRows(rows, keys, "next-token-target" if first.is_chat else "real-token")


@dataclasses.dataclass
class DataRows:
    rows: datalib.Rows
    keys: np.ndarray  # [N] sample_index of each row, as a capture of the same data numbers them
    mask_meaning: str

    def position(self) -> dict[int, int]:
        return {int(key): i for i, key in enumerate(self.keys)}


def _stack(items: list[dict]) -> dict:
    """Row dicts -> one batch dict; a field that is None in the rows stays None."""
    return {k: None if items[0][k] is None else np.stack([item[k] for item in items]) for k in items[0]}


def data_batches(data: DataRows, n: int, batch_size: int) -> Iterator[dict]:
    """Batches of ``inputs``, ``attention``, ``mask`` [B, P] and ``labels`` from in-memory rows, and
    ``text_lengths`` [B, L] (bytes of each token) for text rows that record their text."""
    rows = data.rows
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        batch = {
            "inputs": rows.inputs[sl], "mask": rows.mask[sl],
            "attention": None if rows.attention_mask is None else rows.attention_mask[sl],
            "labels": None if rows.labels is None else rows.labels[sl],
        }
        if rows.text is not None:
            batch["text_lengths"] = rows.text.lengths[sl]
        yield batch


def cache_batches(cache: TeacherCache, data: DataRows | None, n: int, batch_size: int) -> Iterator[dict]:
    """Batches of the cache's first ``n`` rows at T = 1, with their inputs (see module doc)."""
    position = None if data is None else data.position()
    for start in range(0, n, batch_size):
        yield _stack([_cache_item(cache, i, data, position) for i in range(start, min(start + batch_size, n))])
        for shard in range(cache.locate(start)[0], cache.locate(min(start + batch_size, n) - 1)[0]):
            cache.release(shard)  # read to its end (a remote shard's copy may go)


def _cache_item(cache: TeacherCache, i: int, data: DataRows | None, position: dict | None) -> dict:
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


def check_cache_fits(model: EvalModel, cache: TeacherCache, data, seq_len) -> None:
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
