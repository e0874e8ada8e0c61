"""The README's chat example, run as written, with the numbers docs/capture.md reports.

    python benchmarks/chat_example.py --work /tmp/chat-example --out benchmarks/results/chat_example_cpu.json

Runs the commands of the README's "Capturing chat data" block (the training and held-out caches of
``data/chat/``, top-64, seq-len 256; the KD student, 300 steps, alpha 0.9), plus the same student on
hard labels (alpha 0) and the teacher, each scored by ``kdpipe evaluate --cache runs/chat-heldout --json``.
It records each cache's ``kdpipe inspect --json`` summary, the size per target (assistant) token,
and the wall time of each command. Every command is the ``kdpipe`` of the running interpreter's venv.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KDPIPE = str(Path(sys.executable).parent / "kdpipe")
CAPTURE = ("cache-teacher --teacher {repo}/data/teacher --data {repo}/data/chat/{split}.jsonl --out {out} "
           "--top-k 64 --seq-len 256")
TRAIN = ("train-student --cache {work}/chat-cache --eval-cache {work}/chat-heldout "
         "--student {repo}/data/students/lm-student.json --out {out} --steps 300 --batch-size 16 --lr 3e-3 "
         "--alpha {alpha} --temperature 1")


def kdpipe(args: str) -> tuple[str, float]:
    start = time.monotonic()
    done = subprocess.run([KDPIPE, *shlex.split(args)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"kdpipe {args} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout, round(time.monotonic() - start, 1)


def cache_summary(path: Path) -> dict:
    summary = json.loads(kdpipe(f"inspect {path} --json")[0])
    manifest = json.loads((path / "manifest.json").read_text())
    return {"inspect": summary, "manifest_totals": manifest.get("totals", {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings, caches = {}, {}
    for name, split in (("chat-cache", "train"), ("chat-heldout", "heldout")):
        _, timings[f"capture {name}"] = kdpipe(CAPTURE.format(repo=REPO, split=split, out=work / name))
        caches[name] = cache_summary(work / name)
    students = {"kd student (alpha 0.9)": ("chat-student", 0.9), "hard-label student (alpha 0)": ("chat-hard", 0.0)}
    teacher = kdpipe(f"evaluate --model {REPO}/data/teacher --cache {work}/chat-heldout --json")[0]
    scores = {"teacher": json.loads(teacher)}
    for label, (run, alpha) in students.items():
        _, timings[f"train {run}"] = kdpipe(TRAIN.format(work=work, repo=REPO, out=work / run, alpha=alpha))
        scores[label] = json.loads(kdpipe(f"evaluate --model {work / run}/model --cache {work}/chat-heldout --json")[0])
    report = {
        "benchmark": "chat_example",
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "timings_s": timings,
        "caches": caches,
        "heldout": scores,
    }
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
