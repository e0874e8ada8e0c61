"""cache-teacher's default targets (issue 25): one default, the one benchmarks/k_sweep.py measured as the
smallest capture that reaches online dense KD, shared by the demo; --top-k or --sample alone still mean
exact top-k only and draws only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdpipe import open_cache
from kdpipe.pipeline.capture.plan import DEFAULT_SAMPLE, DEFAULT_TOP_K
from kdpipe.pipeline.demo import TASKS
from test_capture import run_cli

SWEEP = Path(__file__).parents[2] / "benchmarks" / "results" / "k_sweep_cpu.json"


def encoding_line(teacher, data, out, *args) -> str:
    result = run_cli("cache-teacher", "--teacher", teacher, "--data", data, "--out", out, "--seq-len", 16,
                     "--temperature", 1, "--dry-run", *args)
    assert result.exit_code == 0, result.output
    return next(line for line in result.output.splitlines() if line.startswith("encoding:"))


@pytest.mark.parametrize("args, targets", [
    ((), f"encoding:  top-{DEFAULT_TOP_K} + {DEFAULT_SAMPLE} draws split over T=1 ({DEFAULT_SAMPLE}),"),
    (("--top-k", 8), "encoding:  top-8, ids"),
    (("--sample", 8), "encoding:  8 draws split over T=1 (8),"),
    (("--top-k", 4, "--sample", 6), "encoding:  top-4 + 6 draws split over T=1 (6),"),
    (("--sample", 0), f"encoding:  top-{DEFAULT_TOP_K}, ids"),
], ids=["default", "top-k-alone", "sample-alone", "both", "no-draws"])
def test_the_targets_a_capture_takes(tiny_lm_dir, text_dir, tmp_path, args, targets):
    assert encoding_line(tiny_lm_dir, text_dir, tmp_path / "c", *args).startswith(targets)


def test_a_capture_without_targets_options_holds_the_default_top_k_and_draws(tiny_lm_dir, text_dir, tmp_path):
    out = tmp_path / "cache"
    result = run_cli("cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", out, "--seq-len", 16,
                     "--limit-rows", 4, "--temperature", 1, "--temperature", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    schema = open_cache(str(out)).schema
    assert (schema.top_k, schema.sample_draws) == (DEFAULT_TOP_K, DEFAULT_SAMPLE)


def test_the_demo_captures_the_same_default():
    demo = TASKS["causal-lm"]
    assert (demo.top_k, demo.sample) == (DEFAULT_TOP_K, DEFAULT_SAMPLE)



def test_the_default_is_the_smallest_measured_capture_that_reaches_online_kd():
    """The committed sweep: among the captures it trained with the library's loss (not the renormalised-draws
    variant, not rows copied from an earlier sweep), the default's row is the smallest that reaches online KD."""
    variants = json.loads(SWEEP.read_text())["variants"]
    captures = {name: v for name, v in variants.items() if v.get("budget") and not name.startswith("renorm-")}
    reaching = sorted((v["cache"]["bytes_per_token"], name) for name, v in captures.items()
                      if v["aggregate"]["reaches_online"])
    default = f"mixed-{DEFAULT_TOP_K}+{DEFAULT_SAMPLE}" if DEFAULT_TOP_K else f"sampled-{DEFAULT_SAMPLE}"
    assert reaching and reaching[0][1] == default, reaching
