"""Kill soak for training: SIGKILL ``kdpipe train-student`` at N random moments, resume, compare byte for byte.

    python benchmarks/kill_soak.py train                       # 20 kills, then the damaged-folder checks
    python benchmarks/kill_soak.py train --kills 40 --seed 1 --json benchmarks/results/kill_soak_train_cpu.json

A tiny random teacher (the capture soak's) is cached once; a tiny student trains from it with a
checkpoint every 2 steps and a constant learning rate (so a run extended with ``--resume --steps``
equals the longer run). A cycle starts the run into an empty --out and kills it at a random moment,
then restarts it (``--resume`` once a checkpoint exists) and kills it again, until a run finishes by
itself; the finished run is compared with an uninterrupted one: the model's and the checkpoint's files
byte for byte, and every metrics.jsonl record (but its ``tokens_per_s``). About one kill in six lands
in start-up; the rest land uniformly over what remains of the run, and a third of those wait for the
next checkpoint write (``checkpoint.tmp/`` appears) and kill inside it. After each kill the state on disk
is recorded: a half-written ``checkpoint.tmp/``, only ``checkpoint.previous/`` (killed between the two
renames), a torn last line in metrics.jsonl.

Then damaged run folders: a finished 20-step run is damaged one way at a time and extended to the
reference's length with ``--resume``; each damage must be refused in one ``error:`` line (exit 2, no
traceback, nothing in the folder changed), except a torn last metrics line, which must resume to the
uninterrupted run's bytes; a resume of the finished run itself must change nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import kill_soak
from kill_soak import KDPIPE, REPO, tiny_teacher

STEPS, HALF = 40, 20
TRAIN = ["--batch-size", "8", "--lr", "3e-3", "--min-lr-ratio", "1", "--warmup", "0", "--seed", "1",
         "--checkpoint-every", "2", "--log-every", "1", "--eval-every", "10", "--eval-rows", "8", "--device", "cpu"]
STUDENT = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
           "max_position_embeddings": 128}
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json", "checkpoint.json")


def prepare(work: Path, rows: int) -> tuple[Path, Path]:
    """A cache of the tiny teacher over the held-out play, and the student's config."""
    teacher = tiny_teacher(work / "teacher")
    cache = work / "cache"
    subprocess.run(KDPIPE + ["cache-teacher", "--teacher", str(teacher), "--data", str(REPO / "data/shakespeare/heldout"),
                             "--out", str(cache), "--top-k", "8", "--seq-len", "64", "--limit-rows", str(rows),
                             "--temperature", "1", "--device", "cpu"], check=True, capture_output=True)
    student = work / "student.json"
    student.write_text(json.dumps(STUDENT))
    return cache, student


def command(cache: Path, student: Path, out: Path, steps: int = STEPS) -> list[str]:
    """A fresh run, or ``--resume`` once the run has a checkpoint (kdpipe refuses a fresh start then)."""
    if (out / "checkpoint").is_dir() or (out / "checkpoint.previous").is_dir():
        return KDPIPE + ["train-student", "--out", str(out), "--resume", "--steps", str(steps)]
    return KDPIPE + ["train-student", "--cache", str(cache), "--student", str(student), "--out", str(out),
                     "--steps", str(steps), *TRAIN]


def run(cmd: list[str], log: Path, out: Path, *, kill_after: float | None, wait_for_bar: bool,
        at_next_write: bool = False) -> tuple[str, float, float]:
    """kill_soak.run for train-student: "at the next write" is the next checkpoint write."""
    return kill_soak.run(cmd, log, out, kill_after=kill_after, wait_for_bar=wait_for_bar, at_next_write=at_next_write,
                         bar="train-student:", writing=lambda folder: (folder / "checkpoint.tmp").exists())


def disk_state(out: Path) -> dict:
    """What a kill left: the step of the checkpoint kept, a half-written checkpoint, only the previous
    checkpoint (between the renames), a torn last metrics line."""
    step = None
    for folder in (out / "checkpoint", out / "checkpoint.previous"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            step = json.loads((folder / "checkpoint.json").read_text())["step"]
            break
    metrics = out / "metrics.jsonl"
    torn = metrics.is_file() and metrics.stat().st_size > 0 and not metrics.read_bytes().endswith(b"\n")
    return {"checkpoint_step": step, "tmp": (out / "checkpoint.tmp").exists(),
            "previous_only": (out / "checkpoint.previous").is_dir() and not (out / "checkpoint").is_dir(),
            "torn_metrics": torn}


def records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def differences(actual: Path, expected: Path) -> list[str]:
    """What differs between two finished runs: files byte for byte, metrics records, stray files."""
    files = ["model/model.safetensors", "model/config.json", *(f"checkpoint/{name}" for name in CHECKPOINT_FILES)]
    problems = [name for name in files if (actual / name).read_bytes() != (expected / name).read_bytes()]
    if records(actual) != records(expected):
        problems.append("metrics.jsonl records")
    if (actual / "checkpoint.tmp").exists() or list(actual.rglob("*.tmp")):
        problems.append("stray temporary files")
    return problems


def soak(args, cache: Path, student: Path, reference: Path, work: Path, rng: random.Random,
         startup: float, seconds: float) -> dict:
    """The kill cycles; their counts and whether every resumed run equals the reference."""
    kills, cycles, states = [], [], {"tmp": 0, "previous_only": 0, "torn_metrics": 0}
    out = work / "killed"
    while len(kills) < args.kills:
        done = (disk_state(out)["checkpoint_step"] or 0) / STEPS if out.exists() else 0.0
        draw = rng.random()
        if draw < 1 / 6:
            phase, delay = "start-up", rng.uniform(0, startup)
        else:
            phase = "mid-write" if draw < 1 / 6 + 5 / 18 else "steps"
            delay = rng.uniform(0, seconds * max(1 - done, 0.05))
        outcome, _, _ = run(command(cache, student, out), work / "log", out, kill_after=delay,
                            wait_for_bar=phase != "start-up", at_next_write=phase == "mid-write")
        if outcome == "killed":
            state = disk_state(out)
            kills.append(phase)
            for key in states:
                states[key] += bool(state[key])
            print(f"kill {len(kills):3d}: {phase:9s} +{delay:5.2f}s  checkpoint step {state['checkpoint_step']}  "
                  f"tmp {state['tmp']:d}  previous-only {state['previous_only']:d}  torn-metrics {state['torn_metrics']:d}")
            continue
        cycles.append(differences(out, reference))
        print(f"cycle {len(cycles)}: " + ("identical to the reference" if not cycles[-1] else "DIFFERENT: " + ", ".join(cycles[-1])))
        shutil.rmtree(out)
    if out.exists():
        run(command(cache, student, out), work / "log", out, kill_after=None, wait_for_bar=False)
        cycles.append(differences(out, reference))
    return {"kills": len(kills), "by_phase": {p: kills.count(p) for p in ("start-up", "steps", "mid-write")},
            "kills_leaving": states, "cycles": len(cycles), "identical": sum(not c for c in cycles),
            "differences": [c for c in cycles if c]}


def _set_step_back(folder: Path) -> None:
    state = folder / "trainer_state.json"
    state.write_text(state.read_text().replace(f'"step": {HALF}', f'"step": {HALF - 2}'))


DAMAGE = {
    "trainer_state.json step set back": lambda out: _set_step_back(out / "checkpoint"),
    "model.safetensors zeroed": lambda out: (out / "checkpoint/model.safetensors").write_bytes(
        bytes((out / "checkpoint/model.safetensors").stat().st_size)),
    "optimizer.pt truncated": lambda out: (out / "checkpoint/optimizer.pt").write_bytes(
        (out / "checkpoint/optimizer.pt").read_bytes()[:1000]),
    "rng.pt deleted": lambda out: (out / "checkpoint/rng.pt").unlink(),
    "checkpoint.json deleted": lambda out: (out / "checkpoint/checkpoint.json").unlink(),
    "metrics.jsonl line 3 damaged": lambda out: (out / "metrics.jsonl").write_text(
        "".join(line if i != 2 else line[:20] + "\n" for i, line in enumerate(
            (out / "metrics.jsonl").read_text().splitlines(keepends=True)))),
    "metrics.jsonl last line torn": lambda out: (out / "metrics.jsonl").open("a").write('{"step": 21, "split": "tr'),
}


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def damaged_folders(cache: Path, student: Path, reference: Path, work: Path) -> dict:
    """Each damage of a finished half-length run, then ``--resume --steps STEPS`` (in this process:
    the start-up of a new one would dominate): the outcome."""
    from click.testing import CliRunner

    from kdpipe.stages.cli import main as kdpipe

    def invoke(cmd: list[str]):
        return CliRunner().invoke(kdpipe, cmd[len(KDPIPE):])  # an exception escaping is a traceback

    half = work / "half"
    invoke(command(cache, student, half, HALF))
    results = {}
    finished = snapshot(half)
    again = invoke(command(cache, student, half, HALF))
    results["finished run resumed to its own length"] = {
        "exit": again.exit_code, "stdout": again.stdout.strip(), "folder_unchanged": snapshot(half) == finished}
    for name, spoil in DAMAGE.items():
        out = Path(shutil.copytree(half, work / "damaged"))
        spoil(out)
        before = snapshot(out)
        result = invoke(command(cache, student, out))
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        traceback = result.exception is not None and not isinstance(result.exception, SystemExit)
        outcome = {"exit": result.exit_code, "error_lines": errors, "traceback": traceback}
        if result.exit_code == 0:
            outcome["differences_from_uninterrupted"] = differences(out, reference)
        else:
            outcome["folder_unchanged"] = snapshot(out) == before
        results[name] = outcome
        print(f"{name}: exit {result.exit_code}; " + (errors[0] if errors else f"{outcome}"))
        shutil.rmtree(out)
    return results


def expected(name: str, outcome: dict) -> bool:
    if name.startswith("finished"):
        return outcome["exit"] == 0 and outcome["folder_unchanged"] and "nothing to do" in outcome["stdout"]
    if name.endswith("torn"):
        return outcome["exit"] == 0 and outcome["differences_from_uninterrupted"] == [] and not outcome["traceback"]
    return outcome["exit"] == 2 and len(outcome["error_lines"]) == 1 and not outcome["traceback"] and outcome["folder_unchanged"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="number of SIGKILLs (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=160, help="cache rows (default 160)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kdpipe-kill-soak-train-"))
    began = time.monotonic()
    try:
        cache, student = prepare(work, args.rows)
        reference = work / "reference"
        started = time.time()
        _, startup, _ = run(command(cache, student, reference), work / "log", reference, kill_after=None, wait_for_bar=True)
        # kills land while it trains: until its last checkpoint (the model, run.json and curves follow)
        seconds = (reference / "checkpoint" / "checkpoint.json").stat().st_mtime - started - startup
        print(f"reference: {STEPS} steps, start-up {startup:.1f}s, training {seconds:.1f}s")
        summary = soak(args, cache, student, reference, work, rng, startup, seconds)
        damage = damaged_folders(cache, student, reference, work)
        passed = {name: expected(name, outcome) for name, outcome in damage.items()}
        summary |= {"damaged_folders": damage, "damaged_folders_as_expected": f"{sum(passed.values())}/{len(passed)}",
                    "seconds": round(time.monotonic() - began), "reference_startup_s": round(startup, 1),
                    "reference_training_s": round(seconds, 1), "steps": STEPS, "checkpoint_every": 2,
                    "seed": args.seed, "kills_asked": args.kills}
        print(f"\nsummary: {summary['kills']} kills ({summary['by_phase']}) over {summary['cycles']} cycles; kills left "
              f"{summary['kills_leaving']}; {summary['identical']}/{summary['cycles']} resumed runs identical to the "
              f"uninterrupted one; damaged folders as expected {summary['damaged_folders_as_expected']} "
              f"({summary['seconds']}s)")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        if summary["identical"] != summary["cycles"] or not all(passed.values()):
            raise SystemExit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
