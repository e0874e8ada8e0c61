"""Stage one: run a teacher over data once and store its sparse output distribution.

:func:`plan_capture` loads the teacher (or only its config, for a dry run) and checks every setting;
:func:`run_capture` streams the data as blocks of rows (:mod:`kdpipe.pipeline.data.stream`:
tokenised by worker processes ahead of the teacher, memory bounded whatever the corpus size), runs
the teacher batch by batch, turns logits into the sparse view (:mod:`kdpipe.pipeline.topk`) and hands
finished shards to a background writer thread, so the teacher never waits for the disk. A block's
rows are cut into shards of at most ``rows_per_shard`` rows named ``r<rank>-b<block>-p<part>``, so a
shard's name and content depend only on the settings and the data: a rerun skips shards already
finished (their hashes are checked) and rank ``r`` of ``W`` captures the blocks ``b % W == r``.

Crash safety: every shard and every progress record lands atomically (``*.tmp``, fsync, rename), so
a capture killed at any moment (SIGKILL included) leaves finished shards, stray ``*.tmp`` files and at
most one shard renamed but not yet recorded. Restarting with the same command removes the stray files,
keeps the recorded shards whose sha256 still matches and redoes the rest (see
:mod:`kdpipe.pipeline.progress`). A failed write (disk full, read-only --out) stops the capture with a
:class:`~kdpipe.pipeline.errors.WriteError`; what was written before stays valid.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kdpipe.pipeline import data as datalib
from kdpipe.pipeline import progress as progresslib
from kdpipe.pipeline.data.arrays import ARRAY_PACKING
from kdpipe.pipeline.data.stream import BLOCK_CHARS, Block, BlockStream
from kdpipe.pipeline.errors import ConfigError, DataError, TeacherError
from kdpipe.pipeline.fileio import sha256_file, write_errors
from kdpipe.pipeline.manifest import FORMAT_NAME, FORMAT_VERSION, shard_name, software_versions
from kdpipe.pipeline.schema import CacheSchema, narrowest_id_dtype
from kdpipe.pipeline.storage.base import get_format
from kdpipe.pipeline.teachers import (
    Teacher, is_module_spec, load_hf_teacher, load_module_teacher, resolve_device, resolve_dtype,
)
from kdpipe.pipeline.topk import sparse_view_of_logits

# Compressed size / raw size of a shard, measured on the demo cache (see benchmarks/capture.py).
ESTIMATED_COMPRESSION = {"zarr": 0.80, "parquet": 0.80}
CHUNK_ROWS = 16  # rows per zarr chunk / parquet row group
TARGETS = ("assistant", "all")


@dataclasses.dataclass
class CaptureSettings:
    teacher: str
    data: str
    out: str
    weights: str | None = None
    top_k: int = 64
    temperatures: tuple[float, ...] = (1.0, 2.0)
    seq_len: int = 256
    batch_size: int = 8
    format: str = "zarr"
    device: str = "auto"
    dtype: str = "auto"
    value_dtype: str = "float16"
    seed: int = 0
    limit_rows: int | None = None
    max_tokens: int | None = None
    shard_size_mb: float = 256.0
    task: str | None = None
    trust_remote_code: bool = False
    rank: int = 0
    world_size: int = 1
    text_field: str = "text"
    messages_field: str = "messages"
    targets: str = "assistant"  # chat data: which tokens are distillation targets
    packing: bool = False  # chat data: several conversations per row
    num_workers: int | None = None  # tokenizer processes; None = automatic
    block_mb: float = BLOCK_CHARS / 2**20  # data block size, in millions of characters (2**20)

    @property
    def block_chars(self) -> int:
        return max(1, int(self.block_mb * 2**20))

    def content_settings(self) -> dict:
        """The settings that decide the cache's content (compared when resuming)."""
        return {
            "top_k": self.top_k, "temperatures": list(self.temperatures), "seq_len": self.seq_len,
            "format": self.format, "value_dtype": self.value_dtype, "seed": self.seed,
            "limit_rows": self.limit_rows, "max_tokens": self.max_tokens,
            "shard_size_mb": self.shard_size_mb, "task": self.task, "world_size": self.world_size,
            "text_field": self.text_field, "messages_field": self.messages_field,
            "targets": self.targets, "packing": self.packing, "block_chars": self.block_chars,
        }

    @property
    def fields(self) -> datalib.Fields:
        return datalib.Fields(text=self.text_field, messages=self.messages_field)


@dataclasses.dataclass
class CapturePlan:
    settings: CaptureSettings
    teacher: Teacher
    source: datalib.Source
    spec: datalib.PackingSpec | None  # None for array data
    schema: CacheSchema
    rows_per_shard: int
    fingerprints: dict

    def stream(self, *, skip: Callable[[int], bool] = lambda block: False, num_workers: int | None = None) -> BlockStream:
        """This rank's blocks of rows (see :class:`~kdpipe.pipeline.data.stream.BlockStream`)."""
        s = self.settings
        workers = s.num_workers if num_workers is None else num_workers
        return BlockStream(
            self.source, self.spec, s.fields, rank=s.rank, world_size=s.world_size,
            num_workers=auto_workers(self.source, s.block_chars) if workers is None else workers, skip=skip,
            limit_rows=s.limit_rows, max_tokens=s.max_tokens, block_chars=s.block_chars,
            rows_per_block=self.rows_per_shard,
        )

    def estimate(self) -> dict:
        """Rows, tokens and bytes of the capture, from its first block of data (extrapolated by the
        data's size in bytes when the data is larger; ``exact`` says which)."""
        s = self.settings
        stream = self.stream(num_workers=0)
        stream.rank, stream.world_size = 0, 1
        first = next(iter(stream), None)
        rows, tokens = (len(first.rows), first.tokens) if first else (0, 0)
        total, read = self.source.total_bytes, stream.state.bytes_done
        at_limit = (s.limit_rows is not None and rows >= s.limit_rows) or (s.max_tokens is not None and tokens >= s.max_tokens)
        exact = first is None or at_limit or (total is not None and read >= total)
        if not exact and total and read:
            scale = total / read
            rows, tokens = int(rows * scale), int(tokens * scale)
            rows = rows if s.limit_rows is None else min(rows, s.limit_rows)
            tokens = tokens if s.max_tokens is None else min(tokens, s.max_tokens)
        nbytes = int(rows * self.schema.row_nbytes() * ESTIMATED_COMPRESSION[s.format])
        return {"rows": rows, "tokens": tokens, "bytes": nbytes, "exact": exact,
                "sample_bytes": read, "data_bytes": total}


def auto_workers(source: datalib.Source, block_chars: int = BLOCK_CHARS) -> int:
    """Tokenizer processes when none are asked for: none for data of one block (nothing to overlap
    with the teacher), else one per spare core, up to 8."""
    if source.kind == "arrays" or (source.total_bytes is not None and source.total_bytes <= block_chars):
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _validate(settings: CaptureSettings) -> None:
    if settings.top_k <= 0:
        raise ConfigError(f"--top-k {settings.top_k} must be at least 1")
    if not settings.temperatures or any(not (t > 0 and math.isfinite(t)) for t in settings.temperatures):
        raise ConfigError(f"temperatures {list(settings.temperatures)} must all be finite and > 0 (e.g. --temperature 1 --temperature 2)")
    if len(set(settings.temperatures)) != len(settings.temperatures):
        raise ConfigError(f"temperatures {list(settings.temperatures)} repeat a value; give each once")
    if settings.seq_len <= 0 or settings.batch_size <= 0:
        raise ConfigError("--seq-len and --batch-size must be positive")
    for name in ("limit_rows", "max_tokens"):
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be positive")
    if not settings.block_mb > 0:
        raise ConfigError(f"--block-mb {settings.block_mb} must be positive (the default is {BLOCK_CHARS / 2**20:g})")
    if settings.num_workers is not None and settings.num_workers < 0:
        raise ConfigError(f"--num-workers {settings.num_workers} must be 0 (tokenise in the main process) or more")
    if settings.targets not in TARGETS:
        raise ConfigError(f"--targets {settings.targets!r} must be one of {', '.join(TARGETS)}")
    if not 0 <= settings.rank < settings.world_size:
        raise ConfigError(f"rank {settings.rank} is outside world size {settings.world_size}")
    if Path(settings.out).exists() and not Path(settings.out).is_dir():
        raise ConfigError(f"--out {settings.out} is a file; give a directory (a new one, or one holding this capture)")
    get_format(settings.format)


def load_teacher(settings: CaptureSettings, *, load_weights: bool) -> Teacher:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if is_module_spec(settings.teacher):
        num_classes = int(datalib.rows_from_arrays(settings.data).labels.max()) + 1
        return load_module_teacher(
            settings.teacher, weights=settings.weights, device=device, dtype=dtype,
            num_classes=num_classes, load_weights=load_weights,
        )
    return load_hf_teacher(
        settings.teacher, device=device, dtype=dtype, trust_remote_code=settings.trust_remote_code,
        load_weights=load_weights, task=settings.task,
    )


def plan_capture(settings: CaptureSettings, *, load_weights: bool = True) -> CapturePlan:
    """Check settings and data, load the teacher (config and tokenizer only if ``load_weights`` is False).

    Reads the data's first record only (to tell text from chat); the rows are made while capturing.
    """
    _validate(settings)
    source = datalib.resolve_source(settings.data)
    teacher = load_teacher(settings, load_weights=load_weights)
    if settings.top_k > teacher.vocab_size:
        raise ConfigError(f"--top-k {settings.top_k} exceeds the teacher's {teacher.vocab_size} outputs; use at most {teacher.vocab_size}")
    spec = packing_spec(settings, source, teacher)
    schema = CacheSchema(
        task=teacher.task,
        positions=settings.seq_len if teacher.task == "causal-lm" else 1,
        top_k=settings.top_k,
        temperatures=tuple(float(t) for t in settings.temperatures),
        id_dtype=narrowest_id_dtype(max(teacher.vocab_size, len(teacher.tokenizer) if teacher.tokenizer else 0)),
        value_dtype=settings.value_dtype,
        input_len=settings.seq_len if teacher.kind == "hf" else None,
        has_label=teacher.task == "classification",
        mask_meaning="next-token-target" if spec is not None and spec.chat else "real-token",
    )
    rows_per_shard = max(1, int(settings.shard_size_mb * 2**20 // schema.row_nbytes()))
    data = {**source.identity(), "packing": spec.describe() if spec else ARRAY_PACKING,
            "limit_rows": settings.limit_rows, "max_tokens": settings.max_tokens}
    if spec is not None:
        data["fields"] = {"text": settings.text_field, "messages": settings.messages_field}
    fingerprints = {"teacher": teacher.fingerprint, "tokenizer": teacher.tokenizer_fingerprint, "data": data}
    return CapturePlan(settings, teacher, source, spec, schema, rows_per_shard, fingerprints)


def packing_spec(settings: CaptureSettings, source: datalib.Source, teacher: Teacher) -> datalib.PackingSpec | None:
    """How this teacher's rows are made from this data; None for array data (module teachers)."""
    if teacher.kind == "module":
        if source.kind != "arrays":
            raise DataError(f"a module teacher reads .npz arrays with 'x' and 'y'; got {settings.data}")
        return None
    if source.kind == "arrays":
        raise DataError(f"--data {settings.data} holds arrays, but the teacher is a text model; pass text data (.txt, .jsonl, .parquet, ...)")
    if teacher.max_positions is not None and settings.seq_len > teacher.max_positions:
        raise ConfigError(f"--seq-len {settings.seq_len} exceeds the teacher's context of {teacher.max_positions} tokens; use --seq-len {teacher.max_positions} or less")
    first = next(datalib.data_documents(source, settings.fields), None)
    if first is None or source.total_bytes == 0:
        raise DataError(f"data {settings.data} holds no text; give it non-empty documents")
    if first.is_chat:
        from kdpipe.pipeline.data.chat import check_chat_template

        if teacher.task != "causal-lm":
            raise DataError(f"{first.where} is a conversation, but the teacher is a {teacher.task} model; chat data needs a causal-lm teacher")
        check_chat_template(teacher.tokenizer, teacher=settings.teacher)
    return datalib.PackingSpec(teacher.task, settings.seq_len, teacher.tokenizer, chat=first.is_chat,
                               targets=settings.targets, packing=settings.packing)


def finished_capture(plan: CapturePlan) -> dict | None:
    """The manifest of the finished capture in ``--out`` when it has these settings and data; None
    when there is none; raises naming the differing setting (or data file) when there is another."""
    from kdpipe.pipeline.manifest import MANIFEST_NAME, load_manifest
    from kdpipe.pipeline.progress import capture_identity, check_same_data, check_same_identity, manifest_identity

    out = Path(plan.settings.out)
    if not (out / MANIFEST_NAME).is_file():
        return None
    manifest = load_manifest(out)
    check_same_identity(manifest_identity(manifest, plan), capture_identity(plan), out)
    if plan.source.files:  # hashing costs one read of the data (see docs/FORMAT.md)
        check_same_data(manifest["data"].get("sha256_by_file") or {}, datalib.ReadState(plan.source).complete_hashes(), out)
    return manifest


def with_teacher_weights(plan: CapturePlan) -> CapturePlan:
    """The same plan with the teacher's weights loaded (a plan from ``load_weights=False`` has none)."""
    if plan.teacher.model is not None:
        return plan
    return dataclasses.replace(plan, teacher=load_teacher(plan.settings, load_weights=True))


def _batch_columns(plan: CapturePlan, block: Block, index: np.ndarray) -> dict[str, np.ndarray]:
    """Run the teacher on rows ``index`` of ``block`` and return their cache columns."""
    teacher, schema, rows = plan.teacher, plan.schema, block.rows
    inputs = torch.from_numpy(rows.inputs[index]).to(teacher.device)
    if teacher.kind == "module":
        inputs = inputs.to(next(teacher.model.parameters()).dtype)
    attention = None
    if rows.attention_mask is not None:
        attention = torch.from_numpy(rows.attention_mask[index]).to(teacher.device)
    logits = teacher.logits(inputs, attention)  # [B, P, V]
    if logits.shape[1:] != (schema.positions, teacher.vocab_size):
        raise TeacherError(f"teacher output has shape {tuple(logits.shape)}, expected [batch, {schema.positions}, {teacher.vocab_size}]")
    mask = rows.mask[index]  # [B, P]
    flat_mask = torch.from_numpy(mask.reshape(-1)).to(teacher.device)
    try:
        view = sparse_view_of_logits(logits.reshape(-1, teacher.vocab_size)[flat_mask], top_k=schema.top_k, temperatures=schema.temperatures)
    except FloatingPointError as exc:
        position = int(str(exc).rsplit(" ", 1)[-1])
        row = int(block.sample_index[index[np.nonzero(mask.reshape(-1))[0][position] // schema.positions]])
        raise TeacherError(f"teacher logits are NaN or infinite in row {row}; check the teacher's weights and --dtype (try --dtype float32)") from None
    return _columns(plan, block, index, mask, view)


def _scatter(values: torch.Tensor, mask: np.ndarray, dtype) -> np.ndarray:
    """Put per-valid-position values back into a zero-filled ``[B, P, ...]`` array."""
    out = np.zeros(mask.shape + tuple(values.shape[1:]), dtype=dtype)
    out[mask] = values.cpu().numpy()
    return out


def _columns(plan: CapturePlan, block: Block, index, mask, view) -> dict[str, np.ndarray]:
    schema, rows = plan.schema, block.rows
    topk_logits = view.topk_logits
    if schema.value_dtype == "bfloat16":
        topk_logits = topk_logits.to(torch.bfloat16).view(torch.int16)
    columns = {
        "sample_index": block.sample_index[index],
        "input_hash": np.array([datalib.input_hash(rows.inputs[i]) for i in index], dtype=np.uint64),
    }
    fields = schema.fields()
    if "input_ids" in fields:
        columns["input_ids"] = rows.inputs[index].astype(fields["input_ids"][1])
    columns["mask"] = mask
    columns["topk_ids"] = _scatter(view.topk_ids, mask, fields["topk_ids"][1])
    columns["topk_logits"] = _scatter(topk_logits, mask, fields["topk_logits"][1])  # fp32 view, or bf16 bits
    columns["logsumexp"] = _scatter(view.logsumexp, mask, np.float32)
    columns["tail_logprob"] = _scatter(view.tail_logprob, mask, np.float32)
    if schema.has_label:
        columns["label"] = rows.labels[index]
    return columns


def run_capture(
    plan: CapturePlan, *, on_rows: Callable[[int, int], None] | None = None,
    on_start: Callable[[progresslib.RankProgress], None] | None = None,
) -> dict | None:
    """Capture every shard of this rank not already finished; return the manifest once all ranks are done.

    ``on_start(progress)`` is called once the rank's record is loaded and checked (``progress.record``
    holds the finished shards kept, ``progress.redo`` the recorded ones found damaged or missing);
    ``on_rows(rows, tokens)`` after every batch (for progress bars). Returns the manifest dict when
    the cache is complete, or None when other ranks still have shards to write.
    """
    settings = plan.settings
    torch.manual_seed(settings.seed)
    out = Path(settings.out)
    log = progresslib.RankProgress(out, rank=settings.rank, world_size=settings.world_size)
    log.start(plan)
    if on_start:
        on_start(log)
    stream = plan.stream(skip=log.block_done)
    writer = _ShardWriter(get_format(settings.format), plan, log)
    try:
        for block in stream:
            _capture_block(plan, block, log, writer, on_rows)
    finally:
        writer.close()
    data_sha256 = stream.state.complete_hashes() if plan.source.files else {}
    log.finish(num_blocks=stream.num_blocks, data_sha256=data_sha256)
    return progresslib.finalize(out, plan=plan, header=manifest_header(plan))


def _capture_block(plan: CapturePlan, block: Block, log, writer: "_ShardWriter", on_rows) -> None:
    """Run the teacher over one block's rows, shard by shard, skipping shards already finished."""
    settings, n = plan.settings, len(block.rows)
    starts = range(0, n, plan.rows_per_shard)
    for part, start in enumerate(starts):
        name = shard_name(rank=settings.rank, block=block.index, part=part, suffix=writer.suffix)
        if log.is_done(name):
            continue
        shard_rows = np.arange(start, min(start + plan.rows_per_shard, n))
        parts = []
        for first in range(0, len(shard_rows), settings.batch_size):
            index = shard_rows[first : first + settings.batch_size]
            parts.append(_batch_columns(plan, block, index))
            if on_rows:
                on_rows(len(index), int(block.rows.mask[index].sum()))
            writer.check()
        columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        writer.put_shard(name, block.index, part, columns)
    writer.put_block(block.index, {"parts": len(starts), "rows": n, "tokens": block.tokens,
                                   "truncated_rows": block.truncated_rows})


def manifest_header(plan: CapturePlan) -> dict:
    s = plan.settings
    device = plan.teacher.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "task": plan.schema.task,
        **plan.fingerprints,
        "capture": {**s.content_settings(), "teacher": s.teacher, "data": s.data,
                    "batch_size": s.batch_size, "id_dtype": plan.schema.id_dtype,
                    "teacher_vocab_size": plan.teacher.vocab_size,
                    "rows_per_shard": plan.rows_per_shard, "chunk_rows": CHUNK_ROWS,
                    "value_space": "logits minus the position's max logit"},
        "schema": plan.schema.to_dict(),
        "software": software_versions(),
        "device": device_name,
    }


class _ShardWriter:
    """Writes finished shards on a background thread, in order, recording each shard and then each
    completed block in the rank's progress record; errors surface on the next ``check``/``put``."""

    def __init__(self, fmt, plan: CapturePlan, log):
        self._fmt, self._plan, self._log = fmt, plan, log
        self.suffix = fmt.suffix
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="kdpipe-shard-writer", daemon=True)
        self._thread.start()

    def _loop(self):
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                item()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                self._error = exc

    def _write(self, name: str, block: int, part: int, columns: dict) -> None:
        settings = self._plan.settings
        path = Path(settings.out) / name
        with write_errors(f"shard {name}", settings.out):
            self._fmt.write(path, columns, schema=self._plan.schema, chunk_rows=CHUNK_ROWS)
        self._log.shard_done({
            "name": name, "block": block, "part": part, "rank": settings.rank,
            "rows": len(columns["sample_index"]), "tokens": int(columns["mask"].sum()),
            "bytes": os.path.getsize(path), "sha256": sha256_file(path),
        })

    def check(self):
        if self._error is not None:
            raise self._error

    def put_shard(self, name: str, block: int, part: int, columns: dict):
        self.check()
        self._queue.put(lambda: self._write(name, block, part, columns))

    def put_block(self, block: int, info: dict):
        """Record ``block`` as complete once its shards (queued before) are written."""
        self.check()
        self._queue.put(lambda: self._log.block_done_with(block, info))

    def close(self):
        self._queue.put(None)
        self._thread.join()
        self.check()
