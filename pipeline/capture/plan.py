"""Planning a capture: its settings, the teacher, how the data becomes rows, the cache's schema.

:func:`plan_capture` checks every setting, loads the teacher (only its config and tokenizer for a
dry run) and reads the data's first record (to tell text from chat); the rows themselves are made
while capturing (:meth:`CapturePlan.stream`). :func:`finished_capture` tells a rerun of a finished
capture (a no-op) from a capture with other settings in the same ``--out`` (refused).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable

import torch

from kdpipe.pipeline import data as datalib
from kdpipe.pipeline.cache import encoding
from kdpipe.pipeline.cache.schema import CacheSchema, narrowest_id_dtype
from kdpipe.pipeline.cache.storage.base import get_format
from kdpipe.pipeline.cache.storage.location import CacheLocation, is_url
from kdpipe.pipeline.capture import tensor_parallel
from kdpipe.pipeline.capture.teachers import Teacher, load_hf_teacher, load_module_teacher
from kdpipe.pipeline.data.arrays import ARRAY_PACKING
from kdpipe.pipeline.data.stream import BLOCK_CHARS, BlockStream
from kdpipe.pipeline.errors import ConfigError, DataError
from kdpipe.pipeline.models.devices import resolve_device, resolve_dtype
from kdpipe.pipeline.models.modules import is_module_spec

# Compressed size / raw size of each stored field without a probe (a dry run that loads no weights):
# rounded from benchmarks/cache_size.py on the demo teacher (fp16 values 11.8 bits of 16, quantized
# values 2.5 of 16, packed ids incompressible); a probe (--probe-rows) measures the real teacher.
NOMINAL_COMPRESSION = {"logit_steps": 0.2, "float16": 0.75, "bfloat16": 0.45, "float32": 0.9, "ids": 1.0,
                       "mask": 0.05, "counts": 0.3, "other": 0.9, "text": 0.1}
CHUNK_ROWS = 16  # rows per zarr chunk / parquet row group
TARGETS = ("assistant", "all")
MAX_DRAWS = 255  # draws per position: counts are stored in one byte
# What `kdpipe cache-teacher` and `kdpipe demo` capture by default (exact top-k + tail draws): the smallest
# capture that reached online dense KD in benchmarks/k_sweep.py (docs/choosing-k.md).
DEFAULT_TOP_K, DEFAULT_SAMPLE = 6, 8


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
    value_dtype: str = "quantized"  # how values are stored: "quantized" (1/16-nat grid) or a float dtype
    sample: int = 0  # draws per position from the teacher (outside the top-k); 0: none
    sample_temperature: float | None = None  # the temperature they are drawn at; None: split over every temperature
    seed: int = 0
    limit_rows: int | None = None
    max_tokens: int | None = None
    shard_size_mb: float = 256.0
    task: str | None = None
    trust_remote_code: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None  # under torchrun: this process's rank on its machine (picks its GPUs)
    local_world_size: int = 1  # under torchrun: processes on this machine
    device_map: str | None = None  # "auto": spread an HF teacher over the GPUs (accelerate)
    tensor_parallel: int = 1  # torchrun processes per teacher (rank, world_size: the data-parallel groups)
    text_field: str = "text"
    messages_field: str = "messages"
    targets: str = "assistant"  # chat data: which tokens are distillation targets
    packing: bool = False  # chat data: several conversations per row
    record_text: bool = True  # causal LM: rows record their text (--no-text: not; cache/text_spans.py)
    num_workers: int | None = None  # tokenizer processes; None = automatic
    block_mb: float = BLOCK_CHARS / 2**20  # data block size, in millions of characters (2**20)
    storage_options: dict | None = None  # fsspec options for an s3:// (gs://, az://) --out; never recorded

    @property
    def block_chars(self) -> int:
        return max(1, int(self.block_mb * 2**20))

    def content_settings(self) -> dict:
        """The settings that decide the cache's content (compared when resuming)."""
        return {
            "top_k": self.top_k, "temperatures": list(self.temperatures), "seq_len": self.seq_len,
            "format": self.format, "value_dtype": self.value_dtype, "seed": self.seed,
            "sample": self.sample, "sample_temperature": self.sampling_temperature,
            "limit_rows": self.limit_rows, "max_tokens": self.max_tokens,
            "shard_size_mb": self.shard_size_mb, "task": self.task, "world_size": self.world_size,
            "text_field": self.text_field, "messages_field": self.messages_field,
            "targets": self.targets, "packing": self.packing, "block_chars": self.block_chars,
            **({"tensor_parallel": self.tensor_parallel} if self.tensor_parallel > 1 else {}),
        }

    @property
    def sampling_temperature(self) -> float | None:
        """The one temperature draws are made at: None without sampling, and for the default draws split
        over every captured temperature (:attr:`sample_scheme`)."""
        if not self.sample or self.sample_temperature is None:
            return None
        return float(self.sample_temperature)

    @property
    def sample_scheme(self) -> str | None:
        """How draws are made (:data:`kdpipe.pipeline.cache.sampling.SCHEMES`; None without sampling):
        ``"one-temperature"`` with ``--sample-temperature``, else ``"temperature-mixture"``."""
        if not self.sample:
            return None
        return "temperature-mixture" if self.sample_temperature is None else "one-temperature"

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
        if workers is None:
            workers = auto_workers(self.source, s.block_chars, processes=s.local_world_size)
        return BlockStream(
            self.source, self.spec, s.fields, rank=s.rank, world_size=s.world_size, num_workers=workers, skip=skip,
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
        nbytes = int(rows * nominal_row_bytes(self.schema))
        return {"rows": rows, "tokens": tokens, "bytes": nbytes, "exact": exact,
                "sample_bytes": read, "data_bytes": total}


def nominal_row_bytes(schema: CacheSchema) -> float:
    """Expected stored bytes of one row, from each field's raw size and its nominal compression."""
    total = 0.0
    for name, (shape, dtype) in schema.fields().items():
        raw = math.prod(shape) * dtype.itemsize
        if name.endswith("_logit_steps"):
            kind = "logit_steps"
        elif name.endswith("_logits"):
            kind = schema.value_dtype
        elif name.startswith("text_"):  # the row's text (zero-padded), token byte lengths, segments: measured
            kind = "text"
        elif name.endswith("_ids") or name.endswith("_ids_packed"):
            kind = "ids"
        else:
            kind = {"mask": "mask", "sample_counts": "counts"}.get(name, "other")
        total += raw * NOMINAL_COMPRESSION[kind]
    return total


def auto_workers(source: datalib.Source, block_chars: int = BLOCK_CHARS, *, processes: int = 1) -> int:
    """Tokenizer processes when none are asked for: none for data of one block (nothing to overlap
    with the teacher), else one per spare core, up to 8 (the cores shared by the ``processes``
    captures on this machine, under torchrun)."""
    if source.kind == "arrays" or (source.total_bytes is not None and source.total_bytes <= block_chars):
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // max(1, processes) - 1))


def _validate(settings: CaptureSettings) -> None:
    if settings.top_k < 0 or (settings.top_k == 0 and not settings.sample):
        raise ConfigError(f"--top-k {settings.top_k} must be at least 1 (0 only with --sample N: sampled targets only)")
    if not 0 <= settings.sample <= MAX_DRAWS:
        raise ConfigError(f"--sample {settings.sample} must be between 0 (no sampling) and {MAX_DRAWS} draws per position")
    if settings.value_dtype not in encoding.VALUE_ENCODINGS:
        raise ConfigError(f"--values {settings.value_dtype!r} must be one of {', '.join(encoding.VALUE_ENCODINGS)}")
    if not settings.temperatures or any(not (t > 0 and math.isfinite(t)) for t in settings.temperatures):
        raise ConfigError(f"temperatures {list(settings.temperatures)} must all be finite and > 0 (e.g. --temperature 1 --temperature 2)")
    if len(set(settings.temperatures)) != len(settings.temperatures):
        raise ConfigError(f"temperatures {list(settings.temperatures)} repeat a value; give each once")
    if settings.sample_temperature is not None and settings.sample_temperature not in settings.temperatures:
        raise ConfigError(f"--sample-temperature {settings.sample_temperature:g} is not a captured temperature; "
                          f"use one of {', '.join(f'{t:g}' for t in settings.temperatures)} (or add it with --temperature)")
    if settings.seq_len <= 0 or settings.batch_size <= 0:
        raise ConfigError("--seq-len and --batch-size must be positive")
    for name in ("limit_rows", "max_tokens"):
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be positive")
    if not (settings.shard_size_mb > 0 and math.isfinite(settings.shard_size_mb)):
        raise ConfigError(f"--shard-size-mb {settings.shard_size_mb:g} must be a positive size in MiB "
                          f"(the default is {CaptureSettings.shard_size_mb:g}; e.g. 0.5 for small shards)")
    if not settings.block_mb > 0:
        raise ConfigError(f"--block-mb {settings.block_mb} must be positive (the default is {BLOCK_CHARS / 2**20:g})")
    if settings.num_workers is not None and settings.num_workers < 0:
        raise ConfigError(f"--num-workers {settings.num_workers} must be 0 (tokenise in the main process) or more")
    if settings.targets not in TARGETS:
        raise ConfigError(f"--targets {settings.targets!r} must be one of {', '.join(TARGETS)}")
    if not 0 <= settings.rank < settings.world_size:
        raise ConfigError(f"rank {settings.rank} is outside world size {settings.world_size}")
    if settings.device_map is not None:
        if settings.device_map != "auto":
            raise ConfigError(f"--device-map {settings.device_map!r} is not supported; use auto or none")
        if is_module_spec(settings.teacher):
            raise ConfigError("--device-map auto places a Hugging Face teacher's layers; a package.module:factory "
                              "teacher runs on one --device: drop --device-map")
        if settings.device not in ("auto", "cuda"):
            raise ConfigError(f"--device-map auto places the teacher on the GPUs itself (or the CPU without GPUs); "
                              f"drop --device {settings.device}, or drop --device-map to run on {settings.device}")
    _validate_tensor_parallel(settings)
    if not is_url(settings.out) and Path(settings.out).exists() and not Path(settings.out).is_dir():
        raise ConfigError(f"--out {settings.out} is a file; give a directory (a new one, or one holding this capture)")
    get_format(settings.format)


def _validate_tensor_parallel(settings: CaptureSettings) -> None:
    tp = settings.tensor_parallel
    if tp < 1:
        raise ConfigError(f"--tensor-parallel {tp} must be 1 (no tensor parallelism) or more")
    if tp == 1:
        return
    if settings.device_map is not None:
        raise ConfigError(f"--tensor-parallel {tp} splits every layer of the teacher over torchrun processes and "
                          "--device-map auto places whole layers on the GPUs of one process; use one of them")
    if is_module_spec(settings.teacher):
        raise ConfigError("--tensor-parallel splits a Hugging Face teacher with its model's tensor-parallel plan, which a "
                          "package.module:factory teacher has not; drop --tensor-parallel (--device-map auto spreads "
                          "an HF teacher over the GPUs)")
    if settings.local_rank is None:
        raise ConfigError(f"--tensor-parallel {tp} splits the teacher over torchrun processes; start the capture with "
                          f"torchrun --nproc-per-node N (N a multiple of {tp})")


def capture_device(settings: CaptureSettings) -> torch.device:
    """Where the teacher runs: ``--device``; under torchrun with ``--device`` auto or cuda and CUDA
    present, ``cuda:LOCAL_RANK`` (with ``--device-map auto``: the first GPU of the process's group)."""
    device = resolve_device(settings.device)
    if device.type != "cuda" or settings.local_rank is None or settings.device not in ("auto", "cuda"):
        return device
    gpus = gpu_group(settings)
    return torch.device("cuda", gpus[0])


def gpu_group(settings: CaptureSettings) -> list[int] | None:
    """The GPUs this process may use (None: all, or no CUDA). Under torchrun, local rank ``l`` of
    ``n`` processes on a machine with ``G`` GPUs gets GPUs ``[l*g, (l+1)*g)``, ``g = G // n``: one
    GPU each without ``--device-map``, a group of ``g`` with it."""
    if settings.local_rank is None or not torch.cuda.is_available():
        return None
    count, n, local = torch.cuda.device_count(), settings.local_world_size, settings.local_rank
    per = count // n if settings.device_map else 1
    if per < 1 or (local + 1) * per > count:
        raise ConfigError(
            f"torchrun started {n} processes on this machine but only {count} GPUs are visible; "
            f"use --nproc-per-node {count} or fewer" + (" (--device-map auto gives each process a group of GPUs)" if settings.device_map else "")
        )
    return list(range(local * per, (local + 1) * per))


def _max_memory(settings: CaptureSettings) -> dict | None:
    """accelerate's ``max_memory`` restricting a torchrun process to its group of GPUs (and its share
    of the machine's CPU memory); None without torchrun or CUDA (accelerate decides)."""
    gpus = gpu_group(settings)
    if gpus is None:
        return None
    from accelerate.utils import get_max_memory

    available = get_max_memory()
    memory: dict = {i: available[i] for i in gpus}
    if "cpu" in available:
        memory["cpu"] = available["cpu"] // max(1, settings.local_world_size)
    return memory


def load_teacher(settings: CaptureSettings, *, load_weights: bool, group=None) -> Teacher:
    """The teacher of ``settings`` (its weights when ``load_weights``); with ``--tensor-parallel``, split
    over the tensor-parallel ranks of ``group`` (the torchrun group, needed then to load weights)."""
    device = capture_device(settings)
    dtype = resolve_dtype(settings.dtype, device)
    if is_module_spec(settings.teacher):
        num_classes = int(datalib.rows_from_arrays(settings.data).labels.max()) + 1
        return load_module_teacher(
            settings.teacher, weights=settings.weights, device=device, dtype=dtype,
            num_classes=num_classes, load_weights=load_weights,
        )
    if settings.tensor_parallel > 1:
        return _tensor_parallel_teacher(settings, device, dtype, load_weights=load_weights, group=group)
    return load_hf_teacher(
        settings.teacher, device=device, dtype=dtype, trust_remote_code=settings.trust_remote_code,
        load_weights=load_weights, task=settings.task, device_map=settings.device_map,
        max_memory=_max_memory(settings) if settings.device_map and load_weights else None,
    )


def _tensor_parallel_teacher(settings: CaptureSettings, device, dtype, *, load_weights: bool, group) -> Teacher:
    """The HF teacher checked for ``--tensor-parallel`` (see :mod:`.tensor_parallel`), split over
    ``group``'s tensor-parallel ranks when ``load_weights``."""
    from transformers import AutoConfig

    teacher = load_hf_teacher(settings.teacher, device=device, dtype=dtype, trust_remote_code=settings.trust_remote_code,
                              load_weights=False, task=settings.task)
    if teacher.task != "causal-lm":
        raise ConfigError(f"--tensor-parallel splits a causal LM's vocabulary; teacher {settings.teacher} is a "
                          f"{teacher.task} model: drop --tensor-parallel (or use --device-map auto)")
    config = AutoConfig.from_pretrained(settings.teacher, trust_remote_code=settings.trust_remote_code)
    tensor_parallel.check_tensor_parallel_config(config, settings.tensor_parallel, teacher=settings.teacher,
                                                 top_k=0 if settings.sample else settings.top_k)
    if not load_weights:
        return teacher
    if group is None or group.tensor_parallel != settings.tensor_parallel:
        raise ConfigError(f"--tensor-parallel {settings.tensor_parallel} loads the teacher inside its torchrun group; "
                          "start the capture with torchrun")
    model = tensor_parallel.load_tensor_parallel_model(settings.teacher, group=group, dtype=dtype,
                                                       trust_remote_code=settings.trust_remote_code)
    return tensor_parallel.TensorParallelTeacher.of(teacher, model, group)


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
    input_vocab = max(teacher.vocab_size, len(teacher.tokenizer) if teacher.tokenizer else 0)
    schema = CacheSchema(
        task=teacher.task,
        positions=settings.seq_len if teacher.task == "causal-lm" else 1,
        top_k=settings.top_k,
        temperatures=tuple(float(t) for t in settings.temperatures),
        id_dtype=narrowest_id_dtype(input_vocab),
        value_dtype=settings.value_dtype,
        input_len=settings.seq_len if teacher.kind == "hf" else None,
        has_label=teacher.task == "classification",
        mask_meaning="next-token-target" if spec is not None and spec.chat else "real-token",
        id_bits=encoding.id_bits(teacher.vocab_size),
        input_id_bits=encoding.id_bits(input_vocab) if teacher.kind == "hf" else None,
        sample_draws=settings.sample,
        sample_temperature=settings.sampling_temperature,
        sample_scheme="temperature-mixture" if settings.sample_scheme == "temperature-mixture" else None,
        text_token_bytes=spec.text_token_bytes if spec is not None else None,  # the rows' text (issue 24)
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
                               targets=settings.targets, packing=settings.packing, record_text=settings.record_text)


def finished_capture(plan: CapturePlan) -> dict | None:
    """The manifest of the finished capture in ``--out`` when it has these settings and data; None
    when there is none; raises naming the differing setting (or data file) when there is another."""
    from kdpipe.pipeline.cache.manifest import MANIFEST_NAME
    from kdpipe.pipeline.cache.reader import read_manifest
    from kdpipe.pipeline.capture.progress import (
        capture_identity,
        check_same_data,
        check_same_identity,
        manifest_identity,
    )

    location = CacheLocation(plan.settings.out, plan.settings.storage_options)
    if location.info(MANIFEST_NAME) is None:
        return None
    manifest, _ = read_manifest(location)
    out = location.root
    check_same_identity(manifest_identity(manifest, plan), capture_identity(plan), out)
    if plan.source.files:  # hashing costs one read of the data (see docs/FORMAT.md)
        check_same_data(manifest["data"].get("sha256_by_file") or {}, datalib.ReadState(plan.source).complete_hashes(), out)
    return manifest


def with_teacher_weights(plan: CapturePlan, *, group=None) -> CapturePlan:
    """The same plan with the teacher's weights loaded (a plan from ``load_weights=False`` has none);
    ``group``: the torchrun group, which a ``--tensor-parallel`` teacher is split over."""
    if plan.teacher.model is not None:
        return plan
    return dataclasses.replace(plan, teacher=load_teacher(plan.settings, load_weights=True, group=group))
