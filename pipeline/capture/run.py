"""Stage one: run a teacher over data once and store its sparse output distribution.

:func:`plan_capture` loads the teacher (or only its config, for a dry run) and checks every setting;
:func:`run_capture` streams the data as blocks of rows (:mod:`kdpipe.pipeline.data.stream`:
tokenised by worker processes ahead of the teacher, memory bounded whatever the corpus size), runs
the teacher batch by batch, turns logits into the sparse view (:mod:`kdpipe.pipeline.capture.topk`) and hands
finished shards to a background writer thread, so the teacher never waits for the disk. A block's
rows are cut into shards of at most ``rows_per_shard`` rows named ``b<block>-p<part>``, so a shard's
name and content depend only on the settings and the data: a rerun skips shards already finished
(their hashes are checked), rank ``r`` of ``W`` captures the blocks ``b % W == r``, and a cache
written by ``W`` ranks equals the one a single process writes.

Several ranks: under torchrun, pass the :class:`~kdpipe.pipeline.distributed.Group`; every rank
captures its blocks, waits for the others at a barrier, then rank 0 alone writes the manifest and a
last barrier holds the others until it is written. Ranks started on their own (``--rank``) need no
group: the last one to finish writes the manifest.

Crash safety: every shard and every progress record lands atomically (``*.tmp``, fsync, rename), so
a capture killed at any moment (SIGKILL included) leaves finished shards, stray ``*.tmp`` files and at
most one shard renamed but not yet recorded. Restarting with the same command removes the stray files,
keeps the recorded shards whose sha256 still matches and redoes the rest (see
:mod:`kdpipe.pipeline.capture.progress`). A failed write (disk full, read-only --out) stops the capture with a
:class:`~kdpipe.pipeline.errors.WriteError`; what was written before stays valid.

``--out`` on an object store (``s3://bucket/prefix``): a shard is written to a local staging folder,
hashed, then uploaded, and becomes visible only once its upload completes; records and the manifest
are single PUTs (see :mod:`kdpipe.pipeline.capture.progress`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kdpipe.pipeline import data as datalib
from kdpipe.pipeline.cache.manifest import FORMAT_NAME, FORMAT_VERSION, shard_name, software_versions
from kdpipe.pipeline.cache.sampling import Samples, draw_mixture, draw_samples, split_draws
from kdpipe.pipeline.cache.schema import encode_rows
from kdpipe.pipeline.cache.text_spans import text_columns
from kdpipe.pipeline.cache.storage.base import get_format
from kdpipe.pipeline.cache.storage.location import CacheLocation
from kdpipe.pipeline.capture import progress as progresslib
from kdpipe.pipeline.capture import followers
from kdpipe.pipeline.capture.lock import out_lock
from kdpipe.pipeline.capture.plan import CHUNK_ROWS, CapturePlan
from kdpipe.pipeline.capture.topk import SparseView, sparse_view_of_logits
from kdpipe.pipeline.data.stream import Block
from kdpipe.pipeline.distributed import Group
from kdpipe.pipeline.errors import ConfigError, TeacherError, WriteError
from kdpipe.pipeline.fileio import sha256_file, write_errors
from kdpipe.pipeline.provenance import command_record


def batch_rows(plan: CapturePlan, block: Block, index: np.ndarray, draws: "Draws | None" = None) -> dict[str, np.ndarray]:
    """Run the teacher on rows ``index`` of ``block`` and return their logical cache rows (see
    :mod:`kdpipe.pipeline.cache.schema`; the writer thread encodes them); ``draws``: the shard's seeded
    generator, for a sampled capture."""
    teacher, schema, rows = plan.teacher, plan.schema, block.rows
    inputs = torch.from_numpy(rows.inputs[index]).to(teacher.device)
    if teacher.kind == "module":
        inputs = inputs.to(next(teacher.model.parameters()).dtype)
    attention = None
    if rows.attention_mask is not None:
        attention = torch.from_numpy(rows.attention_mask[index]).to(teacher.device)
    mask = rows.mask[index]  # [B, P]
    samples = None
    try:
        if schema.sample_draws:  # draws need the logits
            view, samples = _sampled_view(plan, inputs, attention, mask, draws)
        else:  # the head-fused path where the teacher allows it: its [B*P, V] logits never exist
            view = teacher.sparse_view(inputs, attention, mask, top_k=schema.top_k, temperatures=schema.temperatures)
    except FloatingPointError as exc:
        position = int(str(exc).rsplit(" ", 1)[-1])
        row = int(block.sample_index[index[np.nonzero(mask.reshape(-1))[0][position] // schema.positions]])
        raise TeacherError(f"teacher logits are NaN or infinite in row {row}; check the teacher's weights and --dtype (try --dtype float32)") from None
    return _rows(plan, block, index, mask, view, samples)


def _sampled_view(plan: CapturePlan, inputs, attention, mask, draws: "Draws") -> tuple[SparseView, Samples]:
    """The sparse view (exact top-k, possibly none) and the draws outside it, from the teacher's logits."""
    teacher, schema = plan.teacher, plan.schema
    teacher.fused_head, teacher.fused_head_reason = False, "sampling draws from the logits"
    logits = teacher.masked_logits(inputs, attention, mask)  # [n, V]
    k = schema.top_k
    view = sparse_view_of_logits(logits, top_k=max(k, 1), temperatures=schema.temperatures)
    if k == 0:  # sampled only: everything is "tail"
        view = SparseView(view.topk_ids[:, :0], view.topk_logits[:, :0], view.logsumexp,
                          torch.zeros_like(view.tail_logprob))
    generator = draws.generator(logits.device)
    if schema.sample_scheme == "temperature-mixture":  # the default: split over every captured temperature
        samples = draw_mixture(logits, view.topk_ids, temperatures=schema.temperatures, draws=schema.sample_draws,
                               generator=generator)
    else:  # --sample-temperature: all at one temperature
        samples = draw_samples(logits, view.topk_ids, temperature=schema.sample_temperature,
                               draws=schema.sample_draws, generator=generator)
    return view, samples


class Draws:
    """The seeded generator of one shard's draws, made on the logits' device at first use: a shard's
    draws depend only on the seed and its name, so a resumed or split capture draws the same."""

    def __init__(self, seed: int, block: int, part: int):
        digest = hashlib.blake2b(f"kdpipe-draws:{seed}:{block}:{part}".encode(), digest_size=8).digest()
        self.seed = int.from_bytes(digest, "little") & (2**63 - 1)
        self._generator = None

    def generator(self, device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator


def _scatter(values: torch.Tensor, mask: np.ndarray, dtype) -> np.ndarray:
    """Put per-valid-position values back into a zero-filled ``[B, P, ...]`` array."""
    out = np.zeros(mask.shape + tuple(values.shape[1:]), dtype=dtype)
    out[mask] = values.cpu().numpy()
    return out


def _rows(plan: CapturePlan, block: Block, index, mask, view: SparseView, samples: Samples | None) -> dict[str, np.ndarray]:
    """The logical rows (see :mod:`kdpipe.pipeline.cache.schema`) of rows ``index``; padding positions hold zeros."""
    schema, rows = plan.schema, block.rows
    columns = {
        "sample_index": block.sample_index[index],
        "input_hash": np.array([datalib.input_hash(rows.inputs[i]) for i in index], dtype=np.uint64),
    }
    if schema.input_len is not None:
        columns["input_ids"] = rows.inputs[index].astype(np.int64)
    columns["mask"] = mask
    columns["topk_ids"] = _scatter(view.topk_ids, mask, np.int64)
    columns["topk_logits"] = _scatter(view.topk_logits, mask, np.float32)
    columns["logsumexp"] = _scatter(view.logsumexp, mask, np.float32)
    columns["tail_logprob"] = _scatter(view.tail_logprob, mask, np.float32)
    if samples is not None:
        columns["sample_ids"] = _scatter(samples.ids, mask, np.int64)
        columns["sample_counts"] = _scatter(samples.counts, mask, np.int64)
        columns["sample_logits"] = _scatter(samples.logits, mask, np.float32)
    if schema.has_label:
        columns["label"] = rows.labels[index]
    if schema.text_token_bytes is not None:  # the rows' text, for students with another tokenizer
        text = rows.text
        columns.update(text_columns(schema, text.lengths[index], text.segments[index], text.texts[index]))
    return columns


def run_capture(
    plan: CapturePlan, *, on_rows: Callable[[int, int], None] | None = None,
    on_start: Callable[[progresslib.RankProgress], None] | None = None,
    on_data: Callable[[int], None] | None = None, group: Group | None = None,
) -> dict | None:
    """Capture every shard of this rank not already finished; return the manifest once all ranks are done.

    ``group``: the torchrun group this rank belongs to (see the module doc); then only rank 0
    writes and returns the manifest, after every rank has finished, and the others return None once
    it is written.

    ``on_start(progress)`` is called once the rank's record is loaded and checked (``progress.record``
    holds the finished shards kept, ``progress.redo`` the recorded ones found damaged or missing);
    ``on_rows(rows, tokens)`` after every batch and ``on_data(bytes_read)`` after every data block
    (for progress bars: ``plan.source.total_bytes`` is the total, when known). Returns the manifest dict when
    the cache is complete, or None when other ranks still have shards to write.
    """
    settings = plan.settings
    torch.manual_seed(settings.seed)
    out = CacheLocation(settings.out, settings.storage_options)
    if group is not None and (group.capture_rank, group.capture_world_size) != (settings.rank, settings.world_size):
        raise ConfigError(f"rank {settings.rank} of {settings.world_size} in the settings, but {group.capture_rank} of "
                          f"{group.capture_world_size} in the torchrun group; take both from the same launch")
    writes = group is None or group.writes  # a tensor-parallel group has one writer
    with out_lock(out, rank=settings.rank) if writes else contextlib.nullcontext():  # one process per rank
        return _run_locked(plan, out, group, on_rows=on_rows, on_start=on_start, on_data=on_data)


def _run_locked(plan: CapturePlan, out: CacheLocation, group: Group | None, *, on_rows, on_start, on_data) -> dict | None:
    settings = plan.settings
    writes = group is None or group.writes
    log = progresslib.RankProgress(out, rank=settings.rank, world_size=settings.world_size,
                                   writes_manifest=(group.is_main if group is not None else None)) \
        if writes else followers.FollowerProgress()
    log.start(plan)
    if group is not None and group.tensor_parallel > 1:  # the group's ranks run the same batches
        followers.share_progress(log, group)
    if on_start:
        on_start(log)
    stream = plan.stream(skip=log.block_done)
    fmt = get_format(settings.format)
    writer = _ShardWriter(fmt, plan, log) if writes else followers.DiscardWriter(fmt.suffix)
    try:
        for block in stream:
            _capture_block(plan, block, log, writer, on_rows)
            if on_data:
                on_data(block.bytes_read)
    finally:
        writer.close()
    data_sha256 = stream.state.complete_hashes() if plan.source.files and writes else {}
    log.finish(num_blocks=stream.num_blocks, data_sha256=data_sha256)
    if group is None:
        return progresslib.finalize(out, plan=plan, header=manifest_header(plan))
    group.barrier("for the other ranks to finish their blocks")
    manifest = progresslib.finalize(out, plan=plan, header=manifest_header(plan)) if group.is_main else None
    group.barrier("for rank 0 to write the manifest")
    return manifest


def _capture_block(plan: CapturePlan, block: Block, log, writer: "_ShardWriter", on_rows) -> None:
    """Run the teacher over one block's rows, shard by shard, skipping shards already finished."""
    settings, n = plan.settings, len(block.rows)
    starts = range(0, n, plan.rows_per_shard)
    for part, start in enumerate(starts):
        name = shard_name(block=block.index, part=part, suffix=writer.suffix)
        if log.is_done(name):
            continue
        shard_rows = np.arange(start, min(start + plan.rows_per_shard, n))
        draws = Draws(settings.seed, block.index, part) if plan.schema.sample_draws else None
        parts = []
        for first in range(0, len(shard_rows), settings.batch_size):
            index = shard_rows[first : first + settings.batch_size]
            parts.append(batch_rows(plan, block, index, draws))
            if on_rows:
                on_rows(len(index), int(block.rows.mask[index].sum()))
            writer.check()
        columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        writer.put_shard(name, block.index, part, columns, data_bytes=block.bytes_read)
    writer.put_block(block.index, {"parts": len(starts), "rows": n, "tokens": block.tokens,
                                   "truncated_rows": block.truncated_rows}, data_bytes=block.bytes_read)


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
                    "batch_size": s.batch_size, "device_map": s.device_map, "id_bits": plan.schema.id_bits,
                    "tensor_parallel": s.tensor_parallel, "data_parallel": s.world_size,
                    "teacher_vocab_size": plan.teacher.vocab_size,
                    "rows_per_shard": plan.rows_per_shard, "chunk_rows": CHUNK_ROWS,
                    "sparse_view": sparse_view_path(plan.teacher),
                    "value_space": "logits minus the position's max logit",
                    **({"sampling": sampling_record(plan)} if plan.schema.sample_draws else {})},
        "schema": plan.schema.to_dict(),
        "software": software_versions(),
        "device": device_name,
        "command": command_record(),  # None when run from Python rather than the kdpipe command
    }


def sampling_record(plan: CapturePlan) -> dict:
    """How the draws were made (recorded in the manifest)."""
    s = plan.settings
    record = {"draws": s.sample, "scheme": s.sample_scheme, "temperature": s.sampling_temperature, "seed": s.seed,
              "from": "the teacher's distribution outside the top-k" if s.top_k else "the teacher's distribution",
              "generator": "torch.multinomial, one generator per shard seeded by blake2b(seed, block, part)"}
    if s.sample_scheme == "temperature-mixture":
        record["draws_by_temperature"] = {f"{t:g}": m for t, m in zip(s.temperatures, split_draws(s.sample, s.temperatures))}
        record["generator"] = ("stratified: draw j uniform in the j-th of M_T equal slices of the proposal's cumulative "
                               "distribution (ids in order), one generator per shard seeded by blake2b(seed, block, part)")
        record["weights"] = "count / M * p_T / pi_mix, pi_mix = sum_T' (M_T' / M) * (p_T' outside the top-k, renormalised)"
    return record


def sparse_view_path(teacher) -> str:
    """How the sparse view was made (recorded in the manifest; see ``Teacher.sparse_view_path``)."""
    return teacher.sparse_view_path()


class _ShardWriter:
    """Writes finished shards on a background thread, in order, recording each shard and then each
    completed block in the rank's progress record; errors surface on the next ``check``/``put``."""

    def __init__(self, fmt, plan: CapturePlan, log):
        self._fmt, self._plan, self._log = fmt, plan, log
        self.suffix = fmt.suffix
        self._out: CacheLocation = log.location
        # A remote shard is written here first, then uploaded; removed when the writer closes.
        self._staging = Path(tempfile.mkdtemp(prefix="kdpipe-staging-")) if self._out.is_remote else None
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

    def _write(self, name: str, block: int, part: int, columns: dict, data_bytes: int) -> None:
        settings = self._plan.settings
        remote = self._out.is_remote
        path = (self._staging if remote else self._out.local()) / name
        stored = encode_rows(self._plan.schema, columns)  # here, off the teacher's thread
        with write_errors(f"shard {name}" + (f" (staged in {self._staging})" if remote else ""), self._out.root):
            self._fmt.write(path, stored, schema=self._plan.schema, chunk_rows=CHUNK_ROWS)
        entry = {
            "name": name, "block": block, "part": part, "rank": settings.rank,
            "rows": len(columns["sample_index"]), "tokens": int(columns["mask"].sum()),
            "bytes": os.path.getsize(path), "sha256": sha256_file(path),
        }
        if remote:  # visible only once the upload completes
            stored = self._out.upload(path, name)
            path.unlink()
            if stored.size != entry["bytes"]:
                raise WriteError(f"the store kept {stored.size} of the {entry['bytes']} bytes of shard {name} in "
                                 f"{self._out}; re-run the same command to redo it")
            entry["etag"] = stored.etag
        self._log.shard_done(entry, data_bytes=data_bytes)

    def check(self):
        if self._error is not None:
            raise self._error

    def put_shard(self, name: str, block: int, part: int, columns: dict, *, data_bytes: int):
        """Encode (see :func:`~kdpipe.pipeline.cache.schema.encode_rows`) and write the logical rows
        ``columns``, made from the data read up to byte ``data_bytes`` (``Block.bytes_read``)."""
        self.check()
        self._queue.put(lambda: self._write(name, block, part, columns, data_bytes))

    def put_block(self, block: int, info: dict, *, data_bytes: int):
        """Record ``block`` as complete once its shards (queued before) are written."""
        self.check()
        self._queue.put(lambda: self._log.block_done_with(block, info, data_bytes=data_bytes))

    def close(self):
        self._queue.put(None)
        self._thread.join()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        self.check()
