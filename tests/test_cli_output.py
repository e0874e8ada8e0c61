"""What the commands print while they work (``kdpipe.stages.display``): one progress display per phase,
plain bounded lines when stderr is not a terminal, ``-q`` and ``--log-level``, and the small print
conventions (plurals, no ``-0.0000``, fixed-precision tail mass, counts that say what they count).
"""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from kdpipe.stages import display
from kdpipe.stages.cli import main

ROWS, SEQ_LEN = 16, 32


def kdpipe(*args):
    """``kdpipe ARGS`` in this process; stderr is not a terminal here (as in a log file or CI job)."""
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="kdpipe", catch_exceptions=False)


@pytest.fixture(scope="module")
def lm_cache(tiny_lm_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("output_cache") / "cache"
    result = kdpipe("cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", out, "--top-k", 8,
                    "--temperature", 1.0, "--seq-len", SEQ_LEN, "--limit-rows", ROWS, "--batch-size", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out, result


def train(cache, student, out, *extra, steps=60):
    return kdpipe(*extra, "train-student", "--cache", cache, "--student", student, "--out", out, "--steps", steps,
                  "--batch-size", 2, "--eval-every", 0, "--checkpoint-every", 0, "--device", "cpu")


# ----------------------------------------------------------------------------- progress without a terminal
def test_a_60_step_run_writes_at_most_11_plain_progress_lines(lm_cache, tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(display, "MIN_LINE_INTERVAL_S", 0.0)  # the worst case: a line at every tenth
    result = train(lm_cache[0], tiny_lm_dir, tmp_path / "run")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr and len(lines) <= 11, result.stderr
    assert lines[0].startswith("train-student: 0/60 steps (0%)")
    assert lines[-1].startswith("train-student: 60/60 steps (100%) | loss ")
    assert re.search(r"\| loss [\d.]+, kl [\d.]+, tok/s [\d,]+ \| [\d.]+ steps/s, \d\d:\d\d elapsed, ETA", lines[-1])
    assert result.stdout.startswith("wrote ")  # the result on stdout, progress on stderr


def test_plain_lines_tenths_heartbeat_and_unknown_length(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(display, "_now", lambda: clock[0])

    def lines_of(**kwargs) -> list[str]:  # 1000 updates, 7 s apart (almost 2 hours)
        with CliRunner().isolation() as (_, err, _):
            with display.Progress("phase", terminal=False, **kwargs) as bar:
                for _ in range(1000):
                    clock[0] += 7.0
                    bar.update(1, loss=1.0)
            return err.getvalue().decode().splitlines()

    heartbeats = 1000 // 9  # a line each 9 updates (63 s) without a tenth in between
    known = lines_of(total=1000)
    assert 1 + heartbeats <= len(known) <= 1 + heartbeats + 10 + 1  # start, heartbeats, tenths, end
    assert known[-1].startswith("phase: 1,000/1,000 steps (100%) | loss 1 |")
    unknown = lines_of()  # no total: the heartbeat alone
    assert 1 + heartbeats <= len(unknown) <= 2 + heartbeats and unknown[-1].startswith("phase: 1,000 steps")


def test_capture_progress_and_one_shard(lm_cache):
    result = lm_cache[1]
    assert "\r" not in result.stderr and "cache-teacher: " in result.stderr
    assert "Loading weights" not in result.output  # transformers' bars are silenced
    assert re.search(r"^wrote .*: 16 rows, [\d,]+ tokens, 1 shard, ", result.stdout, re.M), result.stdout


# ----------------------------------------------------------------------------- -q and --log-level
def test_quiet_prints_only_the_result(lm_cache, tiny_lm_dir, tmp_path):
    result = train(lm_cache[0], tiny_lm_dir, tmp_path / "run", "-q", steps=5)
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and result.stdout.startswith("wrote ")


def test_quiet_still_prints_errors(tmp_path):
    result = kdpipe("-q", "inspect", tmp_path / "missing")
    assert result.exit_code == 2 and result.stderr.startswith("error: ")


def test_third_party_progress_bars_only_at_debug(lm_cache):
    from transformers.utils import logging as hf_logging

    kdpipe("--log-level", "debug", "verify", lm_cache[0])
    assert hf_logging.is_progress_bar_enabled()
    kdpipe("verify", lm_cache[0])
    assert not hf_logging.is_progress_bar_enabled()


def test_log_level_warning_shows_no_progress(lm_cache, tiny_lm_dir):
    result = kdpipe("--log-level", "warning", "evaluate", "--model", tiny_lm_dir, "--cache", lm_cache[0], "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and "kl_topk_bins:" in result.stdout


# ----------------------------------------------------------------------------- what the numbers are
def test_evaluate_labels_its_counts_and_seq_len(lm_cache, tiny_lm_dir):
    result = kdpipe("evaluate", "--model", tiny_lm_dir, "--cache", lm_cache[0], "--device", "cpu")
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines()}
    assert "(next-token predictions scored against the true next token)" in lines["tokens"]
    assert "(predictions scored against the teacher)" in lines["positions"]
    assert lines["seq_len"].split() == ["seq_len:", str(SEQ_LEN), "(the", "cache)"]
    assert re.match(r"evaluate: \d+/16 rows \(100%\)", result.stderr.splitlines()[-1])


def test_inspect_tail_mass_has_fixed_precision_and_tokens_are_explained(lm_cache):
    result = kdpipe("inspect", lm_cache[0])
    assert result.exit_code == 0, result.output
    assert re.search(r"^  T=1\s+\d\.\d{4}$", result.stdout, re.M), result.stdout
    assert re.search(r"^tokens:\s+\d+  \(captured: positions holding the teacher's distribution\)$", result.stdout, re.M)


def test_numbers_show_no_negative_zero():
    from kdpipe.stages.demo import _cell
    from kdpipe.stages.evaluate import _format

    assert _cell(-0.00001).strip() == "0.0000" and _cell(-0.2).strip() == "-0.2000"
    assert _format(-0.0) == "0" and display.plural(1, "shard") == "1 shard" and display.plural(2, "shard") == "2 shards"
    assert display._value(-0.0) == "0" and display._value(-0.00001) == "-1e-05"
