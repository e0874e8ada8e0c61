"""The streaming dataset: exactly-once splitting, determinism, alignment checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from kdpipe.pipeline.dataset import CacheDataset, split_rows
from kdpipe.pipeline.errors import IntegrityError
from kdpipe.stages.cli import main


@pytest.fixture(scope="module")
def small_cache(tiny_lm_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "cache"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", str(tiny_lm_dir), "--data", str(text_dir), "--out", str(out),
        "--top-k", "8", "--seq-len", "16", "--limit-rows", "150", "--shard-size-mb", "0.02",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def sample_indices(dataset, workers: int) -> list[int]:
    loader = DataLoader(dataset, batch_size=4, num_workers=workers)
    return [int(i) for batch in loader for i in batch["sample_index"]]


def test_every_row_exactly_once_across_2_workers_and_2_ranks(small_cache):
    train, _ = split_rows(150, 0.1)
    seen = []
    for rank in range(2):
        ds = CacheDataset(small_cache, rows=train, seed=3, shuffle_buffer=16, rank=rank, world_size=2)
        ds.set_epoch(1)
        seen += sample_indices(ds, workers=2)
    assert sorted(seen) == sorted(train.tolist())


def test_iteration_is_deterministic_and_epochs_reshuffle(small_cache):
    ds = CacheDataset(small_cache, seed=7, shuffle_buffer=32)
    first, again = sample_indices(ds, 0), sample_indices(ds, 0)
    assert first == again and first != sorted(first)
    ds.set_epoch(1)
    assert sample_indices(ds, 0) != first


def test_rows_equal_random_access_reads(small_cache):
    from kdpipe import open_cache

    cache = open_cache(small_cache)
    for row in CacheDataset(small_cache, shuffle=False):
        i = int(row["sample_index"])
        expected = cache.read(i, temperature=2.0)
        assert torch.equal(row["input_ids"], torch.from_numpy(expected["input_ids"]))
        j = cache.schema.temperature_index(2.0)
        logprobs = row["topk_logits"] / 2.0 - row["logsumexp"][:, j : j + 1]
        np.testing.assert_allclose(logprobs.numpy(), expected["topk_logprobs"], rtol=0, atol=1e-6)


def test_misaligned_inputs_are_refused(module_teacher, tmp_path):
    out = tmp_path / "cache"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", module_teacher["spec"], "--weights", str(module_teacher["weights"]),
        "--data", str(module_teacher["data"]), "--out", str(out), "--top-k", "3",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with np.load(module_teacher["data"]) as npz:
        x = npz["x"].astype(np.float32) / 255.0
    assert len(list(CacheDataset(out, inputs=x, shuffle=False))) == len(x)
    shuffled = x[::-1].copy()
    with pytest.raises(IntegrityError, match="alignment key"):
        list(CacheDataset(out, inputs=shuffled, shuffle=False))
