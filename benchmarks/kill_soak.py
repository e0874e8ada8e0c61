"""Kill soak: SIGKILL ``kdpipe cache-teacher`` at N random moments, resume, compare with an uninterrupted run.

    python benchmarks/kill_soak.py                      # 30 kills, tiny random teacher, Shakespeare text
    python benchmarks/kill_soak.py --kills 20 --seed 1
    python benchmarks/kill_soak.py --teacher DIR --data PATH --rows 400
    python benchmarks/kill_soak.py train                # the same for train-student (benchmarks/kill_soak_train.py)

A cycle starts the capture into an empty --out and kills it at a random moment, then restarts the
same command and kills it again, until a run finishes by itself; the finished cache is compared with
the uninterrupted reference, every field of every row and the manifest up to its timestamps. Cycles
repeat until N kills were made. About one kill in six lands in start-up (imports, planning); the rest
land uniformly over what remains of the capture, and a third of those wait for the next file write
after that moment (a ``*.tmp`` appears: a shard, or the progress record just after a shard was
renamed) and kill inside it. After each kill the state left on disk is recorded (stray ``*.tmp``
files, shards renamed but not yet recorded, shards recorded), so the summary shows which crash
states the restarts had to handle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KDPIPE = [sys.executable, "-c", "from kdpipe.stages.cli import main; main()"]
SETTINGS = ["--top-k", "8", "--seq-len", "32", "--batch-size", "3", "--shard-size-mb", "0.005",
            "--temperature", "1", "--temperature", "2"]
# Manifest entries allowed to differ: times, the checksum over them, and the software versions (the
# checkout's git commit moves when someone commits while this runs).
TIMESTAMPS = {"started_at", "finished_at", "checksum", "software"}


def tiny_teacher(folder: Path) -> Path:
    """A random-init Llama (vocab 300, context 128) with a BPE tokenizer trained on the held-out play."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = "".join(p.read_text() for p in sorted((REPO / "data/shakespeare/heldout").glob("*.txt")))[:60_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=eos, pad_token=eos)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def command(args, out: Path) -> list[str]:
    return KDPIPE + ["cache-teacher", "--teacher", str(args.teacher), "--data", str(args.data), "--out", str(out),
                     "--limit-rows", str(args.rows), "--format", args.format, *SETTINGS]


def run(cmd: list[str], log: Path, out: Path, *, kill_after: float | None, wait_for_bar: bool,
        at_next_write: bool = False, bar: str = "cache-teacher:", writing=None) -> tuple[str, float, float]:
    """Run ``cmd``; SIGKILL it ``kill_after`` s after its start (or after its progress line ``bar``
    appears); with ``at_next_write``, then wait until ``writing(out)`` (default: a ``*.tmp`` file
    appears: a shard or the progress record being written) and kill at once.

    Returns ("killed" | "finished", seconds until the progress bar appeared, seconds after it).
    """
    started = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        bar_at = None
        while proc.poll() is None and (wait_for_bar or kill_after is None) and bar_at is None:
            if bar in log.read_text():
                bar_at = time.monotonic() - started
            time.sleep(0.02)
        if kill_after is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=kill_after)
        while at_next_write and proc.poll() is None and not (writing or _writing)(out):
            time.sleep(0.0005)
        if proc.poll() is None and kill_after is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed", bar_at or 0.0, 0.0
        proc.wait()
        if proc.returncode != 0:
            raise SystemExit(f"{bar.rstrip(':')} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        return "finished", bar_at or 0.0, time.monotonic() - started - (bar_at or 0.0)
    finally:
        if proc.poll() is None:
            proc.kill()


def _writing(out: Path) -> bool:
    for folder in (out / "shards", out / "_progress"):
        with contextlib.suppress(FileNotFoundError):
            if any(name.endswith(".tmp") for name in os.listdir(folder)):
                return True
    return False


def disk_state(out: Path) -> dict:
    """What a kill left: stray temporary files, shards renamed but not recorded, shards recorded."""
    recorded: set = set()
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((out / "_progress" / "r00000.json").read_text())
        recorded = {e["name"] for e in record["shards"].values()}
    on_disk = {f"shards/{p.name}" for p in (out / "shards").glob("r*") if not p.name.endswith(".tmp")}
    return {"tmp": len(list(out.rglob("*.tmp"))), "unrecorded": len(on_disk - recorded), "recorded": len(recorded)}


def differences(actual: Path, expected: Path) -> list[str]:
    from kdpipe import open_cache

    a, b = open_cache(actual, verify_hashes=True), open_cache(expected)
    problems = [] if len(a) == len(b) else [f"{len(a)} rows, expected {len(b)}"]
    for i in range(min(len(a), len(b))):
        row_a, row_b = a.read_raw(i), b.read_raw(i)
        for field, value in row_b.items():
            if field not in row_a or row_a[field].dtype != value.dtype or not np.array_equal(row_a[field], value):
                problems.append(f"row {i} field {field}")
    from kdpipe.pipeline.provenance import first_difference

    strip = lambda m: {k: v for k, v in m.items() if k not in TIMESTAMPS}  # noqa: E731
    diff = first_difference(strip(b.manifest), strip(a.manifest))
    if diff:
        problems.append(f"manifest differs: {diff}")
    if list(actual.rglob("*.tmp")):
        problems.append("stray *.tmp files left")
    return problems


def check_cycle(out: Path, reference: Path, number: int) -> bool:
    problems = differences(out, reference)
    print(f"cycle {number}: finished after resume; "
          + ("identical to the reference" if not problems else "DIFFERENT: " + "; ".join(problems[:5])))
    return not problems


def main() -> None:
    if sys.argv[1:2] == ["train"]:  # the training soak: benchmarks/kill_soak_train.py
        from kill_soak_train import main as train_soak

        return train_soak(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kills", nargs="?", type=int, default=30, help="number of SIGKILLs (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", type=Path, default=None, help="default: a tiny random Llama built here")
    parser.add_argument("--data", type=Path, default=REPO / "data/shakespeare/heldout")
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--format", choices=["zarr", "parquet"], default="zarr")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kdpipe-kill-soak-"))
    began = time.monotonic()
    try:
        if args.teacher is None:
            args.teacher = tiny_teacher(work / "teacher")
        _, startup, capture_seconds = run(command(args, work / "reference"), work / "log", work / "reference",
                                          kill_after=None, wait_for_bar=True)
        total = json.loads((work / "reference" / "manifest.json").read_text())["totals"]["shards"]
        print(f"reference: {total} shards, start-up {startup:.1f}s, capture {capture_seconds:.1f}s")
        kills, cycles, states = [], [], {"tmp": 0, "unrecorded": 0}
        out = work / "killed"
        while len(kills) < args.kills:
            remaining = 1 - disk_state(out)["recorded"] / total if out.exists() else 1.0
            draw = rng.random()
            if draw < 1 / 6:
                phase, delay = "start-up", rng.uniform(0, startup)
            else:  # a third of these wait for the next file write after the delay and kill inside it
                phase = "mid-write" if draw < 1 / 6 + 5 / 18 else "capture"
                delay = rng.uniform(0, 0.8 * capture_seconds * max(remaining, 0.05))
            outcome, _, took = run(command(args, out), work / "log", out, kill_after=delay,
                                   wait_for_bar=phase != "start-up", at_next_write=phase == "mid-write")
            if outcome == "killed":
                state = disk_state(out)
                kills.append((phase, delay, state))
                states["tmp"] += state["tmp"] > 0
                states["unrecorded"] += state["unrecorded"] > 0
                print(f"kill {len(kills):3d}: {phase:9s} +{delay:5.2f}s  recorded {state['recorded']:3d}/{total}  "
                      f"stray tmp {state['tmp']}  renamed-unrecorded {state['unrecorded']}")
                continue
            if remaining > 0.5:  # a long run that outlived its kill: the machine is faster than measured
                capture_seconds = min(capture_seconds, took / remaining)
            cycles.append(check_cycle(out, work / "reference", len(cycles) + 1))
            shutil.rmtree(out)
        if out.exists():  # finish the last cycle
            run(command(args, out), work / "log", out, kill_after=None, wait_for_bar=False)
            cycles.append(check_cycle(out, work / "reference", len(cycles) + 1))
        by_phase = {p: sum(k[0] == p for k in kills) for p in ("start-up", "capture", "mid-write")}
        print(
            f"\nsummary: {len(kills)} kills ({by_phase['start-up']} in start-up, {by_phase['capture']} at random "
            f"during capture, {by_phase['mid-write']} inside a file write) "
            f"over {len(cycles)} cycles; {states['tmp']} kills left stray *.tmp files, {states['unrecorded']} left "
            f"a shard renamed but not recorded; {sum(cycles)}/{len(cycles)} resumed caches identical to the "
            f"uninterrupted one ({time.monotonic() - began:.0f}s)"
        )
        if not all(cycles):
            raise SystemExit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
