"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from kdpipe.stages.cli import main


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (badly so on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def full_rows_cache(tiny_lm_dir, text_dir, tmp_path_factory):
    """61 full rows of 16 tokens (every row has as many targets), in several shards: the cache of the
    distributed tests (DDP, FSDP), where a rank's batch must hold as many targets as any other's."""
    out = tmp_path_factory.mktemp("full-rows") / "cache"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", str(tiny_lm_dir), "--data", str(text_dir), "--out", str(out),
        "--top-k", "16", "--seq-len", "16", "--limit-rows", "61", "--shard-size-mb", "0.02", "--device", "cpu",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out
