"""``--threads N`` (issue 28): the commands that compute run torch on N CPU threads and record the count
in effect in the cache manifest and run.json (``software.torch_threads``); ``kdpipe reproduce`` re-runs
with the recorded count; a count below 1 is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from kdpipe.pipeline import reproduce as rep
from kdpipe.stages.cli import main

SEQ_LEN = 32
COMPUTING = ("cache-teacher", "train-student", "evaluate", "demo", "inspect")


def kdpipe(*args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="kdpipe", catch_exceptions=False)


@pytest.fixture(autouse=True)
def torch_default_threads():
    """torch's own count before the test (a command changes it for the whole process); restored after."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def other_than(count: int) -> int:
    """A thread count different from ``count``, so that a recorded value shows the flag took effect."""
    return 1 if count != 1 else 2


def capture(tiny_lm_dir, text_dir, out, *extra):
    result = kdpipe("-q", "cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", out, "--top-k", 8,
                    "--temperature", 1.0, "--seq-len", SEQ_LEN, "--limit-rows", 8, "--device", "cpu", *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())


def test_cache_teacher_and_train_student_record_the_threads_they_ran_on(tiny_lm_dir, text_dir, tmp_path,
                                                                       torch_default_threads):
    threads = other_than(torch_default_threads)
    manifest = capture(tiny_lm_dir, text_dir, tmp_path / "cache", "--threads", threads)
    assert manifest["software"]["torch_threads"] == threads

    torch.set_num_threads(torch_default_threads)  # as a new process would start
    run_threads = threads + 2  # not the capture's, not torch's default: the run's own flag decides
    result = kdpipe("-q", "train-student", "--cache", tmp_path / "cache", "--student", tiny_lm_dir, "--out",
                    tmp_path / "run", "--steps", 2, "--batch-size", 2, "--eval-every", 0, "--checkpoint-every", 0,
                    "--device", "cpu", "--threads", run_threads)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["software"]["torch_threads"] == run_threads
    assert run["command"]["args"][-2:] == ["--threads", str(run_threads)]  # re-run by reproduce as given


def test_without_the_flag_torchs_default_is_recorded(tiny_lm_dir, text_dir, tmp_path, torch_default_threads):
    manifest = capture(tiny_lm_dir, text_dir, tmp_path / "cache")
    assert manifest["software"]["torch_threads"] == torch_default_threads


def test_reproduce_reruns_with_the_recorded_thread_count(tiny_lm_dir, text_dir, tmp_path, torch_default_threads):
    capture(tiny_lm_dir, text_dir, tmp_path / "default")  # left to torch's default, which differs between machines
    [command] = rep.rerun_commands(rep.load_recorded(str(tmp_path / "default")), str(tmp_path / "again"))
    assert command.args[-2:] == ["--threads", str(torch_default_threads)], command.args

    threads = other_than(torch_default_threads)
    capture(tiny_lm_dir, text_dir, tmp_path / "given", "--threads", threads)  # given: kept as given, not doubled
    [command] = rep.rerun_commands(rep.load_recorded(str(tmp_path / "given")), str(tmp_path / "again"))
    assert command.args.count("--threads") == 1 and command.args[command.args.index("--threads") + 1] == str(threads)


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize("command", COMPUTING)
def test_a_thread_count_below_one_is_one_error_line(command, value, torch_default_threads):
    result = kdpipe(command, "--threads", value)  # refused while parsing, before anything else is checked
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: --threads {value} must be a whole number of 1 or more (torch's CPU threads); "
                             f"leave it out for torch's default; see 'kdpipe {command} --help'\n")
    assert torch.get_num_threads() == torch_default_threads


def test_every_computing_command_has_the_flag():
    for name in COMPUTING:
        assert any("--threads" in p.opts for p in main.commands[name].params), name
