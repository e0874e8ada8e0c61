"""``kdpipe cache-teacher``: run a teacher over data once and store its sparse distribution."""

from __future__ import annotations

import contextlib
import math
import time

import click

from kdpipe.pipeline.cache.encoding import VALUE_ENCODINGS
from kdpipe.pipeline.cache.manifest import FORMAT_VERSION, MANIFEST_NAME, SHARD_DIR
from kdpipe.pipeline.cache.sampling import describe_draws
from kdpipe.pipeline.cache.storage.location import CacheLocation, parse_storage_options
from kdpipe.pipeline.capture import (
    CaptureSettings,
    finished_capture,
    launch_from_env,
    plan_capture,
    process_group,
    run_capture,
    with_teacher_weights,
)
from kdpipe.pipeline.capture.lock import LOCK_SUFFIX, out_lock
from kdpipe.pipeline.capture.plan import DEFAULT_SAMPLE, DEFAULT_TOP_K
from kdpipe.pipeline.capture.probe import probe_capture
from kdpipe.pipeline.capture.progress import PROGRESS_DIR, recorded_counts
from kdpipe.pipeline.distributed import DEFAULT_TIMEOUT_MIN, data_parallel_rank, peer_failures
from kdpipe.pipeline.errors import ConfigError
from kdpipe.stages.display import Progress, capture_fields, capture_progress, plural
from kdpipe.stages.options import storage_options_flag, threads_flag, user_errors


@click.command("cache-teacher")
@click.option("--teacher", required=True, help="HF model directory or hub id, or package.module:factory / file.py:factory.")
@click.option("--weights", default=None, help="safetensors weights for a module:factory teacher.")
@click.option("--data", required=True, help="A file, folder or glob of .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet/.arrow; a datasets save_to_disk folder; hf:NAME[:SPLIT] (Hub dataset); or .npz (x, y) for module teachers.")
@click.option("--text-field", default="text", show_default=True, help="Record field holding plain text.")
@click.option("--messages-field", default="messages", show_default=True, help="Record field holding a chat conversation (a list of {role, content}); rendered with the teacher's chat template.")
@click.option("--targets", type=click.Choice(["assistant", "all"]), default="assistant", show_default=True, help="Chat data: distil on the assistant's tokens only, or on every token.")
@click.option("--packing", is_flag=True, help="Chat data: pack several whole conversations into a row (default: one per row).")
@click.option("--text/--no-text", "record_text", default=True, show_default=True, help="Causal LM: record each row's text and its tokens' byte spans (docs/FORMAT.md), which a student with another tokenizer needs; ~1-2 bytes/token.")
@click.option("--out", required=True, help="Cache directory to create (or resume), or an s3:// (gs://, az://) URL.")
@click.option("--top-k", default=DEFAULT_TOP_K, show_default=True, type=int, help="Ids kept exactly per position, best first (0 with --sample alone). The default, top-k plus --sample's default draws, is the smallest capture that matched online KD in docs/choosing-k.md.")
@click.option("--temperature", "temperatures", multiple=True, type=float, default=(1.0, 2.0), show_default=True, help="Temperature to capture exactly; repeat for several.")
@click.option("--seq-len", default=256, show_default=True, type=int, help="Tokens per packed row.")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--format", "storage", type=click.Choice(["zarr", "parquet"]), default="zarr", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (under torchrun, auto and cuda mean cuda:LOCAL_RANK).")
@click.option("--device-map", type=click.Choice(["none", "auto"]), default="none", show_default=True, help="auto: spread a Hugging Face teacher over the machine's GPUs (accelerate; under torchrun over this process's group of GPU count / --nproc-per-node GPUs); without GPUs it all runs on the CPU.")
@click.option("--tensor-parallel", default=1, show_default=True, type=int, help="Under torchrun: processes each teacher is split over with its model's tensor-parallel plan (transformers, DTensor); groups of this many consecutive ranks, which split the data blocks as single ranks do (WORLD_SIZE must be a multiple).")
@click.option("--dtype", default="auto", show_default=True, help="Teacher weights dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")
@click.option("--values", "--value-dtype", "value_dtype", type=click.Choice(VALUE_ENCODINGS), default="quantized", show_default=True, help="How the cached logits are stored: quantized (a 1/16-nat grid, error <= 1/(32 T) nats in log p_T, ~2.5 bits each) or a float dtype (format 1's fp16 costs ~12 bits).")
@click.option("--sample", default=DEFAULT_SAMPLE, show_default=True, type=int, help="Draws per position from the teacher's distribution, stored as unique ids with counts (with --top-k: drawn outside the top-k, mixed targets; alone: sampled targets only; 0 with --top-k alone: none). Trains with an unbiased estimator of the KD loss.")
@click.option("--sample-temperature", default=None, type=float, help="Make all the draws at this captured temperature (the others reuse them with exact importance weights) [default: the draws split evenly over every --temperature, each drawn stratified, all of them used at every temperature].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--limit-rows", default=None, type=int, help="Capture only the first N rows (stops reading there).")
@click.option("--max-tokens", default=None, type=int, help="Capture only the first N tokens of the data (stops reading there; chat data keeps whole conversations, so it may end up to one conversation past N).")
@click.option("--num-workers", default=None, type=int, help="Tokenizer processes running ahead of the teacher [default: none for data of one block, else one per spare core, up to 8].")
@click.option("--block-mb", default=4.0, show_default=True, type=float, help="Data block size in millions of characters: the unit of tokenizer work, of a rank's share and of resuming; use smaller blocks when ranks outnumber the blocks of a small corpus.")
@click.option("--shard-size-mb", default=256.0, show_default=True, type=float, help="Uncompressed size cap of one shard.")
@click.option("--task", type=click.Choice(["causal-lm", "classification"]), default=None, help="Override the task read from the model config.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model's own Python code to run.")
@click.option("--rank", default=None, type=int, help="This writer's rank, for processes a scheduler starts (Slurm array, Kubernetes job) [default: 0; under torchrun: its RANK].")
@click.option("--world-size", default=None, type=int, help="Number of writer processes [default: 1; under torchrun: its WORLD_SIZE].")
@click.option("--dist-timeout", default=DEFAULT_TIMEOUT_MIN, show_default=True, type=float, help="Under torchrun: minutes a rank waits for the others (e.g. for the slowest to finish) before it fails.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache in --out that has other settings.")
@click.option("--dry-run", is_flag=True, help="Print rows, tokens and the estimated size; load no weights (unless --probe-rows).")
@click.option("--probe-rows", default=0, show_default=True, type=int, help="With --dry-run: load the teacher and capture this many rows into a throwaway shard to measure the size (e.g. 16).")
@storage_options_flag
@threads_flag
@user_errors(on_interrupt="finished shards are kept; re-run the same command to resume")
def cache_teacher(storage, temperatures, overwrite, dry_run, probe_rows, rank, world_size, device_map, dist_timeout,
                  tensor_parallel, storage_options, **options):
    """Run TEACHER over DATA once; store top-k logits, exact at each temperature, plus the tail mass.

    Killed or failed (disk full), the same command resumes: finished shards are checked and kept.
    Under torchrun (torchrun --nproc-per-node N kdpipe cache-teacher ...) the processes split the
    data blocks and rank 0 writes the manifest once all are done; with --tensor-parallel TP each group
    of TP processes runs one teacher split over them.
    """
    launch = launch_from_env(rank=rank, world_size=world_size)
    data_rank, data_world = data_parallel_rank(launch, tensor_parallel) if launch.torchrun else (launch.rank, launch.world_size)
    given = {name: click.get_current_context().get_parameter_source(name).name != "DEFAULT" for name in ("top_k", "sample")}
    if given["sample"] and options["sample"] and not given["top_k"]:
        options["top_k"] = 0  # --sample alone: sampled targets only
    if given["top_k"] and not given["sample"]:
        options["sample"] = 0  # --top-k alone: exact top-k only
    settings = CaptureSettings(
        format=storage, temperatures=tuple(temperatures), rank=data_rank, world_size=data_world,
        local_rank=launch.local_rank, local_world_size=launch.local_world_size, tensor_parallel=tensor_parallel,
        device_map=None if device_map == "none" else device_map,
        storage_options=parse_storage_options(storage_options), **options,
    )
    main = not launch.torchrun or launch.rank == 0  # under torchrun only rank 0 speaks
    if not main:
        _quiet_transformers()
    plan = plan_capture(settings, load_weights=False)
    if probe_rows and not dry_run:
        raise ConfigError("--probe-rows measures a capture's size in a dry run; add --dry-run (or drop --probe-rows)")
    if probe_rows < 0:
        raise ConfigError(f"--probe-rows {probe_rows} must be 0 (no probe) or more")
    if probe_rows and settings.tensor_parallel > 1:
        raise ConfigError("--probe-rows runs the teacher in one process; drop --tensor-parallel for the probe "
                          "(the cache's size does not depend on it), or drop --probe-rows")
    if dry_run:
        if main:
            _print_plan(plan, probe_rows)
        return
    out = CacheLocation(settings.out, settings.storage_options)  # a folder, or a URL (shown without user info)
    if not overwrite and finished_capture(plan) is not None:
        if main:
            click.echo(f"{out} already holds this finished capture; nothing to do (kdpipe verify {out} checks it)")
        return
    if not overwrite and not out.is_empty() and not _has_progress(out):
        raise ConfigError(f"--out {out} exists and is not a kdpipe cache; choose an empty or new directory")
    split = settings.tensor_parallel > 1  # loaded inside the group, over its tensor-parallel ranks
    if not split:
        plan = with_teacher_weights(plan)  # a teacher that fails to load leaves --out untouched
    with process_group(launch, plan.teacher.device, timeout_min=dist_timeout, tensor_parallel=tensor_parallel) as group, \
            _writer_lock(out, settings.rank, group):  # refuses a second process writing this rank of --out
        if split:
            with peer_failures(launch, "while the ranks load the teacher"):
                plan = with_teacher_weights(plan, group=group)
        if overwrite and main:
            _clear_cache(out)
        if group is not None:  # no rank writes before rank 0 has cleared --out
            group.barrier("for the other ranks to load the teacher")
        with peer_failures(launch, "while capturing"):
            manifest = _capture(plan, group, show=main)
    if manifest is None:
        if group is None:
            click.echo(f"rank {settings.rank} finished; the manifest is written when every rank is done")
        return
    t = manifest["totals"]
    truncated = f", {t['truncated_rows']} rows truncated at --seq-len {settings.seq_len}" if t.get("truncated_rows") else ""
    ranks = f" by {settings.world_size} ranks" if group is not None and settings.world_size > 1 else ""
    if split:
        ranks = f" by {launch.world_size} processes ({plural(settings.world_size, 'group')} of tensor-parallel {tensor_parallel})"
    click.echo(
        f"wrote {out}{ranks}: {plural(t['rows'], 'row')}, {plural(t['tokens'], 'token')}, {plural(t['shards'], 'shard')}, "
        f"{t['bytes'] / 2**20:.1f} MiB ({t['bytes_per_token']:.1f} B/token){truncated}"
    )


def _writer_lock(out, rank: int, group):
    """The lock of ``rank`` on ``--out`` (see :func:`out_lock`), taken by the process that writes it
    (of a tensor-parallel group, its first rank only)."""
    return out_lock(out, rank=rank) if group is None or group.writes else contextlib.nullcontext()


def _capture(plan, group, *, show: bool) -> dict | None:
    """run_capture with a progress display (``show``: this process shows it and the resume report).
    With several ranks the display counts the rows and tokens of every rank (:class:`_AllRanks`)."""
    with Progress("cache-teacher", **capture_progress(plan), show=show) as bar:
        counts = _AllRanks(plan, bar)

        def on_data(bytes_read):  # data read so far: the position when counting bytes
            if bar.unit == "B":
                bar.set(bytes_read)

        on_start = (lambda log: counts.start(log, report=True)) if show else None
        manifest = run_capture(plan, on_rows=counts.add if show else None, on_start=on_start, on_data=on_data,
                               group=group)
        if manifest is not None and show:
            counts.show(manifest["totals"]["rows"], manifest["totals"]["tokens"])
        return manifest


class _AllRanks:
    """What a capture's display counts: this rank's rows and tokens, plus (several ranks) those the
    other ranks' progress records hold, read at most every ``POLL_S`` seconds."""

    POLL_S = 2.0

    def __init__(self, plan, bar):
        self.bar, self.out = bar, CacheLocation(plan.settings.out, plan.settings.storage_options)
        self.others = [r for r in range(plan.settings.world_size) if r != plan.settings.rank]
        self.rows = self.tokens = self.tokens_before = 0  # this rank's (kept and new), the kept tokens of all
        self.other_rows = self.other_tokens = 0
        self.polled_at = -math.inf

    def start(self, log, *, report: bool) -> None:
        kept = log.record["shards"].values()
        self.rows, self.tokens = sum(e["rows"] for e in kept), sum(e["tokens"] for e in kept)
        self._poll()
        self.tokens_before = self.tokens + self.other_tokens
        if self.bar.unit == "row":
            self.bar.start_at(self.rows + self.other_rows)
        if report:
            _report_resume(log, self.bar)

    def add(self, new_rows: int, new_tokens: int) -> None:
        self.rows, self.tokens = self.rows + new_rows, self.tokens + new_tokens
        if time.monotonic() - self.polled_at >= self.POLL_S:
            self._poll()
        self.show(self.rows + self.other_rows, self.tokens + self.other_tokens)

    def show(self, rows: int, tokens: int) -> None:
        fields = capture_fields(rows, tokens - self.tokens_before, self.bar.elapsed(), unit=self.bar.unit)
        if self.bar.unit == "row":
            self.bar.set(rows, **fields)
        else:
            self.bar.update(0, **fields)

    def _poll(self) -> None:
        self.polled_at = time.monotonic()
        if self.others:
            self.other_rows, self.other_tokens = recorded_counts(self.out, ranks=self.others)


def _quiet_transformers() -> None:
    """No "Loading weights" bars from the ranks that stay quiet."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


def _report_resume(log, bar) -> None:
    kept, blocks = len(log.record["shards"]), len(log.record["blocks"])
    if kept or log.redo or log.stale_tmp:
        bar.write(
            f"resuming {log.out}: {plural(kept, 'shard')} ({plural(blocks, 'data block')}) already finished"
            + (f"; redoing {len(log.redo)} damaged or missing ({', '.join(log.redo[:3])}"
               f"{', ...' if len(log.redo) > 3 else ''})" if log.redo else "")
            + (f"; removed {plural(len(log.stale_tmp), 'stray temporary file')}" if log.stale_tmp else "")
        )


def _print_plan(plan, probe_rows: int) -> None:
    s, estimate = plan.settings, plan.estimate()
    probe = None
    if probe_rows:
        probe = probe_capture(with_teacher_weights(plan), probe_rows)
        if probe["rows"]:
            shards = max(1, -(-estimate["rows"] // plan.rows_per_shard))
            estimate["bytes"] = int(estimate["rows"] * probe["bytes_per_row"] + shards * probe["shard_overhead"])
    how = ("exact: the whole data was read" if estimate["exact"] else
           f"extrapolated from the first {estimate['sample_bytes'] / 2**20:.1f} of {estimate['data_bytes'] / 2**20:.1f} MiB"
           if estimate["data_bytes"] else "from the first block only: a Hub dataset's size is not known before reading it")
    click.echo(f"teacher:   {s.teacher} ({plan.teacher.task}, {plan.teacher.vocab_size} outputs)")
    click.echo(f"data:      {s.data} ({plan.source.kind}, {plural(len(plan.source.files), 'file')}, "
               f"{(plan.spec.scheme if plan.spec else 'arrays')})")
    click.echo(f"rows:      {estimate['rows']} (seq-len {s.seq_len}; {how})")
    click.echo(f"tokens:    {estimate['tokens']}")
    click.echo(f"shards:    at most {plan.rows_per_shard} rows each")
    schema = plan.schema
    targets = (f"top-{schema.top_k}" if schema.top_k else "") + (" + " if schema.top_k and s.sample else "") + \
        (describe_draws(s.sample, sample_temperature=s.sampling_temperature, temperatures=s.temperatures) if s.sample else "")
    click.echo(f"encoding:  {targets}, ids {schema.id_bits} bits, values {schema.value_dtype}, "
               f"{len(schema.temperatures)} temperatures, format {FORMAT_VERSION}")
    how = (f"measured on {probe['rows']} probe rows" if probe and probe["rows"] else
           "nominal compression; add --probe-rows 16 to measure it on the teacher")
    click.echo(f"estimated: {estimate['bytes'] / 2**20:.1f} MiB ({estimate['bytes']:,} bytes, "
               f"{estimate['bytes'] / max(estimate['tokens'], 1):.1f} B/token) in {s.format} ({how})")
    if probe and probe["rows"]:
        fields = ", ".join(f"{name} {bits:.2f}" for name, bits in probe["bits_per_entry"].items() if bits >= 0.01)
        click.echo(f"bits per cached id, by field: {fields}")


def _has_progress(out: CacheLocation) -> bool:
    return bool(out.listing(PROGRESS_DIR)) if out.is_remote else out.local(PROGRESS_DIR).is_dir()


def _clear_cache(out: CacheLocation) -> None:
    """Remove what kdpipe wrote (manifest, shards, progress records), nothing else. The ranks' lock
    files stay: removing a held one would let another process lock a new file of the same name."""
    out.remove(MANIFEST_NAME)  # first: the cache is unfinished from here on
    out.remove_folder(SHARD_DIR)
    if out.is_remote:
        out.remove_folder(PROGRESS_DIR)
        return
    for path in out.local(PROGRESS_DIR).glob("*"):
        if not path.name.endswith(LOCK_SUFFIX):
            path.unlink(missing_ok=True)
