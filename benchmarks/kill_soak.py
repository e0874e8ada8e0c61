"""Kill soak: SIGKILL ``kdpipe cache-teacher`` at N random moments, resume, compare with an uninterrupted run.

    python benchmarks/kill_soak.py                      # 30 kills, tiny random teacher, Shakespeare text
    python benchmarks/kill_soak.py --kills 20 --seed 1
    python benchmarks/kill_soak.py --teacher DIR --data PATH --rows 400

A cycle starts the capture into an empty --out and kills it at a random moment, then restarts the
same command and kills it again, until a run finishes by itself; the finished cache is compared with
the uninterrupted reference, every field of every row and the manifest up to its timestamps. Cycles
repeat until N kills were made. About one kill in six lands in start-up (imports, planning); the rest
land uniformly over what remains of the capture. After each kill the state left on disk is recorded
(stray ``*.tmp`` files, shards renamed but not yet recorded, shards recorded), so the summary shows
which crash states the restarts had to handle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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


def run(cmd: list[str], log: Path, *, kill_after: float | None, wait_for_bar: bool) -> tuple[str, float]:
    """Run ``cmd``; SIGKILL it ``kill_after`` s after start (or after its progress bar appears).

    Returns ("killed" | "finished", seconds from start until its progress bar appeared).
    """
    started = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        bar_at = None
        while proc.poll() is None and (wait_for_bar or kill_after is None) and bar_at is None:
            if "cache-teacher:" in log.read_text():
                bar_at = time.monotonic() - started
            time.sleep(0.02)
        if kill_after is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=kill_after)
        if proc.poll() is None and kill_after is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed", bar_at or 0.0
        proc.wait()
        if proc.returncode != 0:
            raise SystemExit(f"capture failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        return "finished", bar_at or 0.0
    finally:
        if proc.poll() is None:
            proc.kill()


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
    from kdpipe.pipeline.progress import first_difference

    strip = lambda m: {k: v for k, v in m.items() if k not in TIMESTAMPS}  # noqa: E731
    diff = first_difference(strip(b.manifest), strip(a.manifest))
    if diff:
        problems.append(f"manifest differs: {diff}")
    if list(actual.rglob("*.tmp")):
        problems.append("stray *.tmp files left")
    return problems


def main() -> None:
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
        started = time.monotonic()
        _, startup = run(command(args, work / "reference"), work / "log", kill_after=None, wait_for_bar=True)
        capture_seconds = time.monotonic() - started - startup
        total = json.loads((work / "reference" / "manifest.json").read_text())["totals"]["shards"]
        print(f"reference: {total} shards, start-up {startup:.1f}s, capture {capture_seconds:.1f}s")
        kills, cycles, bad_cycles, states = [], 0, 0, {"tmp": 0, "unrecorded": 0}
        out = work / "killed"
        while len(kills) < args.kills:
            remaining = 1 - disk_state(out)["recorded"] / total if out.exists() else 1.0
            if rng.random() < 1 / 6:
                phase, delay = "start-up", rng.uniform(0, startup)
            else:
                phase, delay = "capture", rng.uniform(0, capture_seconds * max(remaining, 0.05))
            outcome, _ = run(command(args, out), work / "log", kill_after=delay, wait_for_bar=phase == "capture")
            if outcome == "killed":
                state = disk_state(out)
                kills.append((phase, delay, state))
                states["tmp"] += state["tmp"] > 0
                states["unrecorded"] += state["unrecorded"] > 0
                print(f"kill {len(kills):3d}: {phase:8s} +{delay:5.2f}s  recorded {state['recorded']:3d}/{total}  "
                      f"stray tmp {state['tmp']}  renamed-unrecorded {state['unrecorded']}")
                continue
            problems = differences(out, work / "reference")
            cycles += 1
            bad_cycles += bool(problems)
            print(f"cycle {cycles}: finished after resume; " + ("identical to the reference" if not problems
                  else "DIFFERENT: " + "; ".join(problems[:5])))
            shutil.rmtree(out)
        if out.exists():  # finish the last cycle
            run(command(args, out), work / "log", kill_after=None, wait_for_bar=False)
            problems = differences(out, work / "reference")
            cycles += 1
            bad_cycles += bool(problems)
            print(f"cycle {cycles}: finished after resume; " + ("identical to the reference" if not problems
                  else "DIFFERENT: " + "; ".join(problems[:5])))
        by_phase = {p: sum(k[0] == p for k in kills) for p in ("start-up", "capture")}
        print(
            f"\nsummary: {len(kills)} kills ({by_phase['start-up']} in start-up, {by_phase['capture']} during capture) "
            f"over {cycles} cycles; {states['tmp']} kills left stray *.tmp files, {states['unrecorded']} left a "
            f"shard renamed but not recorded; {cycles - bad_cycles}/{cycles} resumed caches identical to the "
            f"uninterrupted one ({time.monotonic() - began:.0f}s)"
        )
        if bad_cycles:
            raise SystemExit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
