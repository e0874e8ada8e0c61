"""TeacherCache.read returns the targets training uses (quantized values renormalised against the exact
tail, as TargetCollator / train-student make them); read_stored and read_raw give the stored values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import kdpipe
from kdpipe.stages.cli import main

ROWS, BATCH = 8, 4
CAPTURES = {  # name: extra cache-teacher options
    "quantized": ["--values", "quantized"],
    "float16": ["--values", "float16"],
    "quantized-mixed": ["--values", "quantized", "--sample", "6"],
}


@pytest.fixture(scope="module", params=sorted(CAPTURES))
def cache(request, tiny_lm_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / "cache"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", str(tiny_lm_dir), "--data", str(text_dir), "--out", str(out),
        "--top-k", "12", "--seq-len", "32", "--limit-rows", str(ROWS), "--temperature", "1", "--temperature", "2",
        *CAPTURES[request.param]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with kdpipe.open_cache(out) as opened:
        yield opened


def collated_rows(cache, temperature: float) -> dict[int, dict[str, np.ndarray]]:
    """What TargetCollator gives training for each row, by sample_index: ``{name: [P, ...] array}``."""
    collate = kdpipe.TargetCollator(cache, temperature=temperature)
    out = {}
    for rows in kdpipe.CacheDataset(cache, batch_size=BATCH, shuffle=False):
        batch = collate(rows)
        teacher, keys = batch["teacher"], batch["sample_index"].tolist()
        for name, value in teacher.items():
            if name == "temperature":
                continue
            per_row = value.reshape(len(keys), -1, *value.shape[teacher["kd_mask"].dim():])  # [B, P, ...]
            for b, key in enumerate(keys):
                out.setdefault(key, {})[name] = per_row[b].numpy()
    return out


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_read_returns_the_targets_training_uses(cache, temperature):
    trained = collated_rows(cache, temperature)
    assert len(trained) == ROWS
    for i in range(ROWS):
        row = cache.read(i, temperature=temperature)
        targets = trained[int(row["sample_index"])]
        np.testing.assert_array_equal(row["topk_ids"], targets["topk_ids"])
        np.testing.assert_allclose(row["topk_logprobs"], targets["topk_logprobs"], rtol=0, atol=2e-6)
        np.testing.assert_allclose(np.log(row["tail_mass"]), targets["tail_logprob"], rtol=0, atol=1e-6)
        if "sample_ids" in row:
            np.testing.assert_array_equal(row["sample_ids"], targets["sample_ids"])
            np.testing.assert_allclose(row["sample_logprobs"], targets["sample_logprobs"], rtol=0, atol=2e-6)
            np.testing.assert_allclose(row["sample_weights"], targets["sample_weights"], rtol=1e-6, atol=1e-7)


def test_a_quantized_caches_top_k_and_tail_sum_to_one_only_after_read(cache):
    """read: the k + 1 bins sum to 1; read_stored: the values as stored (off by their rounding when
    quantized, and then not what read gives); read_raw: the logical fields at no temperature."""
    quantized = cache.schema.value_dtype == "quantized"
    j = cache.schema.temperature_index(2.0)
    worst_read = worst_stored = 0.0
    for i in range(ROWS):
        row, stored, raw = cache.read(i, temperature=2.0), cache.read_stored(i, temperature=2.0), cache.read_raw(i)
        mask = row["mask"]
        total = np.exp(row["topk_logprobs"].astype(np.float64)).sum(-1) + row["tail_mass"]
        total_stored = np.exp(stored["topk_logprobs"].astype(np.float64)).sum(-1) + stored["tail_mass"]
        worst_read = max(worst_read, float(np.abs(total - 1)[mask].max()))
        worst_stored = max(worst_stored, float(np.abs(total_stored - 1)[mask].max()))
        as_stored = raw["topk_logits"] / np.float32(2.0) - raw["logsumexp"][:, j:j + 1]
        np.testing.assert_array_equal(stored["topk_logprobs"], as_stored)
        if not quantized:  # float values are used as stored
            np.testing.assert_array_equal(row["topk_logprobs"], stored["topk_logprobs"])
    if quantized:
        assert worst_read < 1e-5 < worst_stored, (worst_read, worst_stored)
    else:
        assert worst_stored < 2e-3


def test_read_refuses_a_temperature_that_was_not_captured(cache):
    for read in (cache.read, cache.read_stored):
        with pytest.raises(Exception, match="temperature 3 was not captured"):
            read(0, temperature=3.0)
