"""Conventions every kdpipe command keeps: errors are one ``error:`` line whoever raises them, every
fix a message suggests is a flag that exists, ``--device`` defaults to ``auto``, ``evaluate`` says
which seq-len it used (the training cache's for a student) and refuses ``--data`` it would not read,
the demo of each task has its own default folder, reused on a second run, and Ctrl-C (SIGINT) ends a
command with one line naming the command that continues it (train-student's needs ``--resume``).
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdpipe.pipeline import demo as demolib
from kdpipe.stages.cli import main
from kdpipe.stages.options import NOTHING_WRITTEN

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 32
# Flags of other programs that kdpipe's messages and help mention.
OTHER_PROGRAMS_FLAGS = {"--nproc-per-node": "torchrun", "--standalone": "torchrun", "--show-toplevel": "git", "--logdir": "tensorboard"}


def kdpipe(*args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="kdpipe", catch_exceptions=False)


def commands(group=main) -> dict:
    """Every kdpipe command by name, the group itself as ``kdpipe``."""
    found = {"kdpipe": group}
    for name, command in group.commands.items():
        found[name] = command
    return found


def flags_of(command) -> set[str]:
    return {opt for p in command.params for opt in p.opts + p.secondary_opts if opt.startswith("--")} | {"--help"}


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args, starts", [
    (["cache-teacher", "--teacher", "t"], "error: missing option '--data'; see 'kdpipe cache-teacher --help'"),
    (["evaluate", "--model", "m", "--batch-size", "many"], "error: invalid value for '--batch-size'"),
    (["demo", "--task", "translation"], "error: invalid value for '--task'"),
    (["demo", "--outt", "x"], "error: no such option '--outt'"),
    (["distil"], "error: no such command 'distil'"),
    (["--log-level", "loud", "demo"], "error: invalid value for '--log-level'"),
    (["inspect", "no/such/cache"], "error: "),  # a library error
    (["evaluate", "--model", "m"], "error: nothing to evaluate on"),  # a library error
])
def test_every_error_is_one_error_line(args, starts):
    result = kdpipe(*args)
    assert result.exit_code == 2, result.output  # click's usage errors keep their exit code 2
    assert result.stderr.startswith(starts), result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Usage:" not in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- suggested flags exist
def flags_in_messages() -> dict[str, list[str]]:
    """Every ``--flag`` in a string literal of pipeline/ and stages/ (messages, help texts), with where."""
    found: dict[str, list[str]] = {}
    for path in sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    found.setdefault(flag, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_flag_a_message_names_exists():
    found = flags_in_messages()
    assert {"--overwrite", "--seq-len", "--out", "--resume"} <= set(found)  # the search sees the messages
    existing = set().union(*map(flags_of, commands().values()))
    missing = {flag: where for flag, where in found.items() if flag not in existing | set(OTHER_PROGRAMS_FLAGS)}
    assert not missing, f"messages name flags no kdpipe command has: {missing}"


def test_every_device_flag_defaults_to_auto():
    defaults = {name: p.default for name, c in commands().items() for p in c.params if p.name == "device"}
    assert set(defaults) >= {"cache-teacher", "train-student", "evaluate", "demo", "inspect"}
    assert set(defaults.values()) == {"auto"}, defaults


# ----------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def lm_cache(tiny_lm_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conventions_cache") / "cache"
    result = kdpipe("-q", "cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", out, "--top-k", 8,
                    "--temperature", 1.0, "--seq-len", SEQ_LEN, "--limit-rows", 12, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def evaluate_json(*args):
    result = kdpipe("-q", "evaluate", "--device", "cpu", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_evaluate_takes_a_students_seq_len_from_its_training_cache(tiny_lm_dir, text_dir, lm_cache, tmp_path):
    run = tmp_path / "run"  # a train-student run dir: model/ and run.json naming the training cache
    shutil.copytree(tiny_lm_dir, run / "model")
    (run / "run.json").write_text(json.dumps({"status": "finished", "cache_path": str(lm_cache)}))
    for model in (run, run / "model"):
        inferred = evaluate_json("--model", model, "--data", text_dir, "--max-rows", 4)
        assert (inferred["seq_len"], inferred["seq_len_from"]) == (SEQ_LEN, f"the training cache {lm_cache}")
    given = evaluate_json("--model", run, "--data", text_dir, "--max-rows", 4, "--seq-len", SEQ_LEN)
    assert given["seq_len_from"] == "--seq-len" and given["ce"] == inferred["ce"]


def test_evaluate_takes_the_seq_len_a_run_recorded_even_when_its_cache_moved(tiny_lm_dir, text_dir, tmp_path):
    run = tmp_path / "run"  # run.json records the rows' length itself; its cache is gone (or remote)
    shutil.copytree(tiny_lm_dir, run / "model")
    (run / "run.json").write_text(json.dumps({"status": "finished", "cache_path": str(tmp_path / "gone"), "seq_len": 48}))
    inferred = evaluate_json("--model", run / "model", "--data", text_dir, "--max-rows", 2)
    assert inferred["seq_len"] == 48 and inferred["seq_len_from"] == f"the training run {run} (its cache's rows)"


def test_evaluate_without_a_training_run_says_its_default_seq_len(tiny_lm_dir, text_dir):
    result = evaluate_json("--model", tiny_lm_dir, "--data", text_dir, "--max-rows", 2)
    assert result["seq_len"] == 128 and result["seq_len_from"].startswith("the model's context")  # 256 capped at 128


def test_evaluate_refuses_data_a_text_cache_does_not_read(tiny_lm_dir, text_dir, lm_cache):
    result = kdpipe("evaluate", "--model", tiny_lm_dir, "--cache", lm_cache, "--data", text_dir)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: --data is not used with --cache") and "drop --data" in result.stderr


# ----------------------------------------------------------------------------- the demo's folders
@pytest.fixture(scope="module")
def demos(tiny_lm_dir, text_dir, module_teacher, tmp_path_factory):
    """Both demos on tiny models and data, run one after the other from an empty folder (as ``make demo``
    then ``kdpipe demo --task classification``); yields that folder and both outputs."""
    folder = tmp_path_factory.mktemp("demos")
    text = folder / "text.txt"
    text.write_text((text_dir / "doc0.txt").read_text()[:4000])  # ~30 rows
    train = dict(steps=3, warmup=0, eval_every=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(demolib.TASKS, "causal-lm", demolib.DemoTask(
            teacher=str(tiny_lm_dir), weights=None, train_data=str(text), heldout_data=str(text),
            student=str(tiny_lm_dir), top_k=8, temperatures=(1.0, 2.0), seq_len=SEQ_LEN,
            train=dict(batch_size=4, lr=1e-3, eval_rows=8, **train), kd=dict(alpha=0.9, temperature=1.0)))
        patch.setitem(demolib.TASKS, "classification", demolib.DemoTask(
            teacher=module_teacher["spec"], weights=str(module_teacher["weights"]), train_data=str(module_teacher["data"]),
            heldout_data=str(module_teacher["data"]), student=module_teacher["spec"], top_k=10, temperatures=(1.0, 4.0),
            seq_len=1, train=dict(batch_size=8, lr=1e-2, clip=0.0, eval_rows=40, **train),
            kd=dict(alpha=0.7, temperature=4.0)))
        patch.chdir(folder)
        lm = kdpipe("demo", "--device", "cpu")
        digits = kdpipe("demo", "--task", "classification", "--device", "cpu")
        yield folder, lm, digits


def test_each_demo_has_its_own_default_folder(demos):
    folder, lm, digits = demos
    assert lm.exit_code == 0, lm.output
    assert digits.exit_code == 0, digits.output
    assert "table: runs/demo/results.json" in lm.stdout and "table: runs/demo-classification/results.json" in digits.stdout
    assert json.loads((folder / "runs/demo/results.json").read_text())["task"] == "causal-lm"
    assert json.loads((folder / "runs/demo-classification/results.json").read_text())["task"] == "classification"


def test_the_demo_prints_its_phases_as_it_goes(demos):
    phases = [line.split(":")[0] for line in demos[1].stderr.splitlines()]
    for phase in ("cache teacher (train)", "cache teacher (heldout)", "train kd student", "train hard-label student",
                  "evaluate teacher", "evaluate kd student", "evaluate hard-label student"):
        assert phase in phases, demos[1].stderr
    assert "\r" not in demos[1].stderr and "Loading weights" not in demos[1].stderr


def test_a_second_run_reuses_the_caches(demos):
    again = kdpipe("demo", "--task", "classification", "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert "reusing the teacher cache runs/demo-classification/cache-train" in again.stderr
    assert "cache teacher (train):" not in again.stderr


def test_the_demo_into_the_other_tasks_folder_names_flags_it_has(demos):
    refused = kdpipe("demo", "--task", "classification", "--out", "runs/demo", "--device", "cpu")
    assert refused.exit_code == 2 and len(refused.stderr.splitlines()) == 1
    assert refused.stderr.startswith("error: --out runs/demo holds the causal-lm demo")
    named = set(re.findall(r"--[a-z-]+", refused.stderr))
    assert named == {"--out", "--overwrite"} and named <= flags_of(main.commands["demo"])
    shutil.copytree(demos[0] / "runs/demo", demos[0] / "runs/copy")
    replaced = kdpipe("-q", "demo", "--task", "classification", "--out", "runs/copy", "--device", "cpu", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((demos[0] / "runs/copy/results.json").read_text())["task"] == "classification"


# ----------------------------------------------------------------------------- Ctrl-C
# What each command says after "interrupted: ": what it leaves, and the command that continues it.
INTERRUPTED = {
    "cache-teacher": "finished shards are kept; re-run the same command to resume",
    "train-student": "the run in --out is kept up to its last checkpoint; re-run the same command with --resume "
                     "to continue from there",
    "demo": "finished teacher-cache shards in --out are kept; re-run the same command to resume the capture "
            "(the students are trained again)",
    "reproduce": "the re-run's output (--out, default PATH-reproduced) is incomplete; remove it and re-run the "
                 "same command",
    "evaluate": NOTHING_WRITTEN, "plot": NOTHING_WRITTEN, "inspect": NOTHING_WRITTEN, "verify": NOTHING_WRITTEN,
}


def test_every_command_says_how_to_continue_after_ctrl_c():
    declared = {name: command.callback.on_interrupt for name, command in main.commands.items()}
    assert declared == INTERRUPTED, "a command without @user_errors(on_interrupt=...) or with another message"


def interrupt(args, *, once: str, cwd: Path) -> tuple[int, str]:
    """Run ``kdpipe ARGS`` in a new process, send it SIGINT (Ctrl-C) as soon as its stderr shows a line
    starting with ``once`` (the work is under way), and return its exit code and whole stderr."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Ctrl-C's default action in the child even where this suite runs with SIGINT ignored (a shell's
    # background job ignores it, and an ignored signal stays ignored across exec: Python would then
    # never raise KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, "-m", "kdpipe", *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(300, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(once):
                proc.send_signal(signal.SIGINT)
                break
        seen.append(proc.stderr.read())
        return proc.wait(), "".join(seen)
    finally:
        watchdog.cancel()
        proc.kill() if proc.poll() is None else None


def assert_interrupted(code: int, stderr: str, command: str) -> None:
    assert code == 130, stderr
    assert stderr.splitlines()[-1] == f"interrupted: {INTERRUPTED[command]}", stderr
    assert "Traceback" not in stderr, stderr


def test_ctrl_c_in_train_student_says_resume(lm_cache, tiny_lm_dir, tmp_path):
    code, stderr = interrupt(["train-student", "--cache", lm_cache, "--student", tiny_lm_dir, "--out", tmp_path / "run",
                              "--steps", 100_000, "--batch-size", 2, "--eval-every", 0, "--checkpoint-every", 1,
                              "--device", "cpu"], once="train-student", cwd=tmp_path)
    assert_interrupted(code, stderr, "train-student")
    assert any((tmp_path / "run" / "checkpoint").iterdir())  # what --resume continues from
    again = kdpipe("-q", "train-student", "--cache", lm_cache, "--student", tiny_lm_dir, "--out", tmp_path / "run",
                   "--steps", 100_000)  # the same command without --resume refuses, naming it
    assert again.exit_code == 2 and "pass --resume to continue it" in again.stderr, again.output


def test_ctrl_c_in_cache_teacher_says_the_same_command_resumes(tiny_lm_dir, text_dir, tmp_path):
    args = ["cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", tmp_path / "cache", "--top-k", 8,
            "--temperature", 1.0, "--seq-len", SEQ_LEN, "--batch-size", 1, "--device", "cpu"]  # hundreds of batches
    code, stderr = interrupt(args, once="cache-teacher", cwd=tmp_path)
    assert_interrupted(code, stderr, "cache-teacher")


@pytest.mark.slow  # the shipped teacher and data: 10-40 s, most of it before the capture starts
def test_ctrl_c_in_the_demo_says_the_same_command_resumes(tmp_path):
    code, stderr = interrupt(["demo", "--out", tmp_path / "demo", "--device", "cpu"], once="cache teacher",
                             cwd=tmp_path)
    assert_interrupted(code, stderr, "demo")
