"""Stage one: run a teacher over data once and store its sparse output distribution.

:func:`plan_capture` loads the teacher (or only its config, for a dry run), prepares the rows and
checks every setting; :func:`run_capture` runs the teacher batch by batch, turns logits into the
sparse view (:mod:`kdpipe.pipeline.topk`) and hands finished shards to a background writer thread,
so the teacher never waits for the disk. Rows are cut into shards of a fixed number of rows, so a
shard's name and content depend only on the settings: a rerun skips shards already finished (their
hashes are checked) and a rank writes only the shards ``s`` with ``s % world_size == rank``.

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
from kdpipe.pipeline.errors import ConfigError, TeacherError
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
    shard_size_mb: float = 256.0
    task: str | None = None
    trust_remote_code: bool = False
    rank: int = 0
    world_size: int = 1

    def content_settings(self) -> dict:
        """The settings that decide the cache's content (compared when resuming)."""
        return {
            "top_k": self.top_k, "temperatures": list(self.temperatures), "seq_len": self.seq_len,
            "format": self.format, "value_dtype": self.value_dtype, "seed": self.seed,
            "limit_rows": self.limit_rows, "shard_size_mb": self.shard_size_mb, "task": self.task,
            "world_size": self.world_size,
        }


@dataclasses.dataclass
class CapturePlan:
    settings: CaptureSettings
    teacher: Teacher
    rows: datalib.Rows
    schema: CacheSchema
    rows_per_shard: int
    fingerprints: dict

    @property
    def num_rows(self) -> int:
        return len(self.rows.inputs)

    @property
    def num_tokens(self) -> int:
        return int(self.rows.mask.sum())

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_rows / self.rows_per_shard)

    def estimated_bytes(self) -> int:
        return int(self.num_rows * self.schema.row_nbytes() * ESTIMATED_COMPRESSION[self.settings.format])

    def shard_rows(self, shard: int) -> range:
        start = shard * self.rows_per_shard
        return range(start, min(start + self.rows_per_shard, self.num_rows))

    def my_shards(self) -> list[int]:
        s = self.settings
        return [i for i in range(self.num_shards) if i % s.world_size == s.rank]


def _validate(settings: CaptureSettings) -> None:
    if settings.top_k <= 0:
        raise ConfigError(f"--top-k {settings.top_k} must be at least 1")
    if not settings.temperatures or any(not (t > 0 and math.isfinite(t)) for t in settings.temperatures):
        raise ConfigError(f"temperatures {list(settings.temperatures)} must all be finite and > 0 (e.g. --temperature 1 --temperature 2)")
    if len(set(settings.temperatures)) != len(settings.temperatures):
        raise ConfigError(f"temperatures {list(settings.temperatures)} repeat a value; give each once")
    if settings.seq_len <= 0 or settings.batch_size <= 0:
        raise ConfigError("--seq-len and --batch-size must be positive")
    if settings.limit_rows is not None and settings.limit_rows <= 0:
        raise ConfigError(f"--limit-rows {settings.limit_rows} must be positive")
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
    """Check settings, load the teacher (config only if ``load_weights`` is False) and the rows."""
    _validate(settings)
    teacher = load_teacher(settings, load_weights=load_weights)
    if settings.top_k > teacher.vocab_size:
        raise ConfigError(f"--top-k {settings.top_k} exceeds the teacher's {teacher.vocab_size} outputs; use at most {teacher.vocab_size}")
    if teacher.kind == "module":
        rows = datalib.rows_from_arrays(settings.data)
    else:
        if teacher.max_positions is not None and settings.seq_len > teacher.max_positions:
            raise ConfigError(f"--seq-len {settings.seq_len} exceeds the teacher's context of {teacher.max_positions} tokens; use --seq-len {teacher.max_positions} or less")
        docs = datalib.read_documents(settings.data)
        make_rows = datalib.pack_causal_lm if teacher.task == "causal-lm" else datalib.rows_for_classification
        rows = make_rows(docs, teacher.tokenizer, seq_len=settings.seq_len)
    if settings.limit_rows is not None:
        rows = _take(rows, settings.limit_rows)
    schema = CacheSchema(
        task=teacher.task,
        positions=rows.mask.shape[1],
        top_k=settings.top_k,
        temperatures=tuple(float(t) for t in settings.temperatures),
        id_dtype=narrowest_id_dtype(max(teacher.vocab_size, len(teacher.tokenizer) if teacher.tokenizer else 0)),
        value_dtype=settings.value_dtype,
        input_len=settings.seq_len if teacher.kind == "hf" else None,
        has_label=rows.labels is not None,
    )
    rows_per_shard = max(1, int(settings.shard_size_mb * 2**20 // schema.row_nbytes()))
    fingerprints = {
        "teacher": teacher.fingerprint,
        "tokenizer": teacher.tokenizer_fingerprint,
        "data": {**datalib.data_fingerprint(settings.data), "packing": rows.packing,
                 "rows": len(rows.inputs), "limit_rows": settings.limit_rows},
    }
    return CapturePlan(settings, teacher, rows, schema, rows_per_shard, fingerprints)


def finished_capture(plan: CapturePlan) -> dict | None:
    """The manifest of the finished capture in ``--out`` when it has these settings; None when there
    is none; raises naming the differing setting when there is one with other settings."""
    from kdpipe.pipeline.manifest import MANIFEST_NAME, load_manifest
    from kdpipe.pipeline.progress import capture_identity, check_same_identity, manifest_identity

    out = Path(plan.settings.out)
    if not (out / MANIFEST_NAME).is_file():
        return None
    manifest = load_manifest(out)
    check_same_identity(manifest_identity(manifest, plan), capture_identity(plan), out)
    return manifest


def with_teacher_weights(plan: CapturePlan) -> CapturePlan:
    """The same plan with the teacher's weights loaded (a plan from ``load_weights=False`` has none)."""
    if plan.teacher.model is not None:
        return plan
    return dataclasses.replace(plan, teacher=load_teacher(plan.settings, load_weights=True))


def _take(rows: datalib.Rows, n: int) -> datalib.Rows:
    cut = lambda a: None if a is None else a[:n]  # noqa: E731
    return datalib.Rows(cut(rows.inputs), cut(rows.mask), cut(rows.labels), cut(rows.attention_mask), rows.packing)


def _batch_columns(plan: CapturePlan, index: np.ndarray) -> dict[str, np.ndarray]:
    """Run the teacher on rows ``index`` and return their cache columns."""
    teacher, schema, rows = plan.teacher, plan.schema, plan.rows
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
        row = int(index[np.nonzero(mask.reshape(-1))[0][position] // schema.positions])
        raise TeacherError(f"teacher logits are NaN or infinite in row {row}; check the teacher's weights and --dtype (try --dtype float32)") from None
    return _columns(plan, index, mask, view)


def _scatter(values: torch.Tensor, mask: np.ndarray, dtype) -> np.ndarray:
    """Put per-valid-position values back into a zero-filled ``[B, P, ...]`` array."""
    out = np.zeros(mask.shape + tuple(values.shape[1:]), dtype=dtype)
    out[mask] = values.cpu().numpy()
    return out


def _columns(plan: CapturePlan, index, mask, view) -> dict[str, np.ndarray]:
    schema, rows = plan.schema, plan.rows
    topk_logits = view.topk_logits
    if schema.value_dtype == "bfloat16":
        topk_logits = topk_logits.to(torch.bfloat16).view(torch.int16)
    columns = {
        "sample_index": index.astype(np.int64),
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
    fmt = get_format(settings.format)
    writer = _ShardWriter(fmt, plan, log)
    try:
        for shard in plan.my_shards():
            if log.is_done(shard):
                if on_rows:
                    on_rows(len(plan.shard_rows(shard)), int(plan.rows.mask[plan.shard_rows(shard)].sum()))
                continue
            parts = []
            shard_rows = np.asarray(plan.shard_rows(shard))
            for start in range(0, len(shard_rows), settings.batch_size):
                index = shard_rows[start : start + settings.batch_size]
                parts.append(_batch_columns(plan, index))
                if on_rows:
                    on_rows(len(index), int(plan.rows.mask[index].sum()))
                writer.check()
            columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            writer.put(shard, columns)
    finally:
        writer.close()
    log.finish()
    return progresslib.finalize(out, plan=plan, header=manifest_header(plan))


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
    """Writes finished shards on a background thread; errors surface on the next ``check``/``put``."""

    def __init__(self, fmt, plan: CapturePlan, log):
        self._fmt, self._plan, self._log = fmt, plan, log
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="kdpipe-shard-writer", daemon=True)
        self._thread.start()

    def _loop(self):
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            shard, columns = item
            try:
                self._write(shard, columns)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                self._error = exc

    def _write(self, shard: int, columns: dict) -> None:
        plan, settings = self._plan, self._plan.settings
        name = shard_name(rank=settings.rank, index=shard, suffix=self._fmt.suffix)
        path = Path(settings.out) / name
        with write_errors(f"shard {name}", settings.out):
            self._fmt.write(path, columns, schema=plan.schema, chunk_rows=CHUNK_ROWS)
        self._log.shard_done({
            "name": name, "index": shard, "rank": settings.rank,
            "rows": len(columns["sample_index"]), "tokens": int(columns["mask"].sum()),
            "bytes": os.path.getsize(path), "sha256": sha256_file(path),
        })

    def check(self):
        if self._error is not None:
            raise self._error

    def put(self, shard: int, columns: dict):
        self.check()
        self._queue.put((shard, columns))

    def close(self):
        self._queue.put(None)
        self._thread.join()
        self.check()
