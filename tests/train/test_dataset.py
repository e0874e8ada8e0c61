"""The streaming dataset: exactly-once splitting, determinism, alignment checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from kdpipe.pipeline.train.dataset import CacheDataset, split_rows
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


def sample_indices(dataset, workers: int) -> list[list[int]]:
    """The batches of ``dataset`` as lists of sample indices (as a DataLoader with ``workers`` gives them)."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [[int(i) for i in batch["sample_index"]] for batch in loader]


def test_every_row_once_per_epoch_across_workers_and_ranks(small_cache):
    train, _ = split_rows(150, 0.1)
    by_rank = []
    for rank in range(2):
        ds = CacheDataset(small_cache, batch_size=4, rows=train, seed=3, shuffle_window=16, rank=rank, world_size=2)
        ds.set_epoch(1)
        by_rank.append(sample_indices(ds, workers=2))
    assert len(by_rank[0]) == len(by_rank[1]) == -(-len(train) // 8)  # the same number of steps on each rank
    assert all(len(batch) == len(other) for batch, other in zip(*by_rank))
    seen = [i for batches in by_rank for batch in batches for i in batch]
    assert set(seen) == set(train.tolist())
    assert len(seen) - len(train) == len(train) % 2  # a short last batch is filled up to a multiple of 2 ranks


def test_two_ranks_see_the_rows_of_one_rank_with_twice_the_batch(small_cache):
    one = CacheDataset(small_cache, batch_size=10, seed=5, shuffle_window=32, rank=0, world_size=1)
    two = [CacheDataset(small_cache, batch_size=5, seed=5, shuffle_window=32, rank=r, world_size=2) for r in range(2)]
    for ds in (one, *two):
        ds.set_epoch(2)
    whole = sample_indices(one, workers=0)
    halves = [sample_indices(ds, workers=1) for ds in two]
    assert [sorted(batch) for batch in whole] == [sorted(a + b) for a, b in zip(*halves)]


def test_iteration_is_deterministic_and_epochs_reshuffle(small_cache):
    ds = CacheDataset(small_cache, batch_size=4, seed=7, shuffle_window=32)
    first, again = sample_indices(ds, 0), sample_indices(ds, 0)
    flat = [i for batch in first for i in batch]
    assert first == again and flat != sorted(flat) and sorted(flat) == list(range(150))
    assert sample_indices(ds, 2) == first  # workers change nothing
    ds.set_epoch(1)
    assert sample_indices(ds, 0) != first


def test_a_resumed_epoch_starts_at_its_batch_without_reading_earlier_ones(small_cache):
    ds = CacheDataset(small_cache, batch_size=4, seed=7, shuffle_window=32)
    ds.set_epoch(3)
    whole = sample_indices(ds, 0)
    ds.set_epoch(3, start_batch=5)
    assert sample_indices(ds, 0) == whole[5:]


def test_rows_equal_random_access_reads(small_cache):
    from kdpipe import open_cache

    cache = open_cache(small_cache)
    for batch in CacheDataset(small_cache, batch_size=7, shuffle=False):
        for b, i in enumerate(batch["sample_index"].tolist()):
            expected = cache.read_stored(i, temperature=2.0)  # the stored values, as the batch holds them
            assert torch.equal(batch["input_ids"][b], torch.from_numpy(expected["input_ids"]))
            j = cache.schema.temperature_index(2.0)
            logprobs = batch["topk_logits"][b] / 2.0 - batch["logsumexp"][b, :, j : j + 1]
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
    assert sum(len(b["inputs"]) for b in CacheDataset(out, batch_size=8, inputs=x, shuffle=False)) == len(x)
    shuffled = x[::-1].copy()
    with pytest.raises(IntegrityError, match="alignment key"):
        list(CacheDataset(out, batch_size=8, inputs=shuffled, shuffle=False))
