"""Fixtures of the integration tests: a small cache of the tiny teacher, captured at T = 1 and 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kdpipe.stages.cli import main


@pytest.fixture(scope="module")
def capture_small_cache(tiny_lm_dir, text_dir, tmp_path_factory):
    """``capture_small_cache(name, rows)``: a top-8, seq-len-16 cache of ``rows`` rows at T = 1 and 2."""

    def capture(name: str, rows: int) -> Path:
        out = tmp_path_factory.mktemp(name) / "cache"
        result = CliRunner().invoke(main, [
            "cache-teacher", "--teacher", str(tiny_lm_dir), "--data", str(text_dir), "--out", str(out), "--top-k", "8",
            "--seq-len", "16", "--limit-rows", str(rows), "--temperature", "1", "--temperature", "2"],
            catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return out

    return capture
