"""Stage one end to end: cached values equal a dense recomputation by the teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe import open_cache
from kdpipe.pipeline.cache.encoding import GRID_STEP
from kdpipe.pipeline.errors import CacheFormatError
from kdpipe.stages.cli import main

TEMPERATURES = (1.0, 2.0, 4.0)


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def capture(teacher, data, out, *extra):
    args = ["cache-teacher", "--teacher", teacher, "--data", data, "--out", out]
    for t in TEMPERATURES:
        args += ["--temperature", t]
    result = run_cli(*args, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module", params=[("zarr", "quantized"), ("parquet", "float16")], ids=["zarr", "parquet-fp16"])
def lm_cache(request, tiny_lm_dir, text_dir, tmp_path_factory):
    fmt, values = request.param
    out = tmp_path_factory.mktemp(f"lm_cache_{fmt}") / "cache"
    return capture(tiny_lm_dir, text_dir, out, "--top-k", 16, "--seq-len", 48, "--batch-size", 4,
                   "--format", fmt, "--values", values, "--shard-size-mb", 0.05, "--limit-rows", 40)


def assert_matches_dense(row, logits, temperature, values):
    """Cached top-k ids/log-probs/tail equal the dense softmax of the teacher's logits, within the
    documented error of the cache's ``values`` encoding."""
    dense_logprobs = torch.log_softmax(logits.double() / temperature, dim=-1).numpy()  # [P, V]
    valid = row["mask"]
    ids = row["topk_ids"][valid]
    expected_ids = torch.topk(logits[valid], ids.shape[1], dim=-1).indices.numpy()
    np.testing.assert_array_equal(ids, expected_ids)
    expected = np.take_along_axis(dense_logprobs[valid], ids, axis=1)
    if values == "quantized":  # half a grid step of (z - max z) over T, plus logsumexp's fp16 rounding (< 2**-8)
        tolerance = GRID_STEP / 2 / temperature + 2**-8 + 1e-5
    else:  # fp16 storage of (z - max z): half a unit in the last place of |z - max z|, divided by T.
        shifted = np.abs(expected - expected[:, :1]) * temperature
        tolerance = (shifted * 2.0**-11 + 1e-5) / temperature + 1e-5
    assert np.all(np.abs(row["topk_logprobs"][valid] - expected) <= tolerance)
    expected_tail = 1.0 - np.exp(expected).sum(axis=1)
    np.testing.assert_allclose(row["tail_mass"][valid], expected_tail, atol=1e-3)


def test_lm_cache_matches_dense_teacher(lm_cache, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    cache = open_cache(lm_cache)
    assert len(cache) == 40 and len(cache.shards) > 1
    for i in (0, 17, 39):
        with torch.no_grad():
            logits = model(torch.from_numpy(cache.read(i)["input_ids"])[None]).logits[0]
        for t in TEMPERATURES:
            assert_matches_dense(cache.read_stored(i, temperature=t), logits, t, cache.schema.value_dtype)


def test_lm_cache_layout_and_manifest(lm_cache):
    cache = open_cache(lm_cache)
    m = cache.manifest
    assert m["format_version"] == 2 and m["task"] == "causal-lm"
    assert m["capture"]["id_bits"] == m["schema"]["id_bits"] == 9  # vocabulary of 300 needs 9 bits
    assert m["totals"]["rows"] == 40 and m["totals"]["tokens"] == sum(s["tokens"] for s in m["shards"])
    assert [s["name"] for s in m["shards"]] == sorted(s["name"] for s in m["shards"])
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["shards"])
    assert m["tokenizer"]["vocab_size"] == 300 and len(m["tokenizer"]["sha256"]) == 64
    assert m["teacher"]["weights_sha256"] and m["data"]["files"]
    row = cache.read(3)
    # Position t is the prediction of the token after input_ids[: t + 1]: rows are consecutive
    # packed text, so the next row starts where this one ends.
    assert row["input_ids"].shape == (48,) and row["topk_ids"].shape == (48, 16)


def test_uncaptured_temperature_is_refused(lm_cache):
    with pytest.raises(CacheFormatError, match=r"captured: 1, 2, 4"):
        open_cache(lm_cache).read(0, temperature=3.0)


def test_module_teacher_cache_matches_dense(module_teacher, tmp_path):
    out = capture(module_teacher["spec"], module_teacher["data"], tmp_path / "cache",
                  "--weights", module_teacher["weights"], "--top-k", 4, "--format", "parquet")
    from safetensors.torch import load_file

    model = module_teacher["build"]()
    model.load_state_dict(load_file(str(module_teacher["weights"])))
    with np.load(module_teacher["data"]) as npz:
        x, y = npz["x"], npz["y"]
    cache = open_cache(out)
    assert len(cache) == len(x) and cache.manifest["task"] == "classification"
    for i in (0, 11, len(x) - 1):
        with torch.no_grad():
            logits = model(torch.from_numpy(x[i : i + 1].astype(np.float32) / 255.0))
        for t in TEMPERATURES:
            row = cache.read_stored(i, temperature=t)  # the stored values: the encoding's documented error
            assert row["label"] == y[i] and row["topk_ids"].shape == (1, 4)
            assert_matches_dense(row, logits, t, cache.schema.value_dtype)


def test_verify_detects_one_flipped_byte(tiny_lm_dir, text_dir, tmp_path):
    out = capture(tiny_lm_dir, text_dir, tmp_path / "cache", "--top-k", 8, "--seq-len", 32,
                  "--limit-rows", 12, "--shard-size-mb", 0.01)
    ok = run_cli("verify", out)
    assert ok.exit_code == 0, ok.output
    shard = json.loads((out / "manifest.json").read_text())["shards"][1]["name"]
    path = out / shard
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    bad = run_cli("verify", out)
    assert bad.exit_code == 1
    assert shard in bad.output and "Checksum failure" in bad.output


@pytest.mark.parametrize("storage,extra", [("zarr", []), ("parquet", ["--values", "float16"]),
                                           ("zarr", ["--sample", 8, "--top-k", 4])])
def test_dry_run_estimates_size_within_20_percent_with_a_probe(tiny_lm_dir, text_dir, tmp_path, storage, extra):
    args = ["--top-k", 16, "--seq-len", 48, "--format", storage, "--limit-rows", 60, *extra]
    estimates = {}
    for probe in (0, 8):
        dry = run_cli("cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out",
                      tmp_path / "dry", "--dry-run", "--probe-rows", probe, *args)
        assert dry.exit_code == 0, dry.output
        assert ("measured on 8 probe rows" in dry.output) == bool(probe), dry.output
        estimates[probe] = int(dry.output.split("estimated:")[1].split("MiB (")[1].split(" bytes")[0].replace(",", ""))
    assert not (tmp_path / "dry").exists()
    out = capture(tiny_lm_dir, text_dir, tmp_path / "real", *args)
    actual = json.loads((out / "manifest.json").read_text())["totals"]["bytes"]
    assert abs(estimates[8] - actual) / actual < 0.20, (estimates, actual)
    assert 0.5 < estimates[0] / actual < 2.0, (estimates, actual)  # without weights: nominal compression


@pytest.mark.slow
def test_dry_run_of_data_larger_than_a_block_extrapolates_from_the_first_and_says_so(tiny_lm_dir, text_dir, tmp_path):
    text = "".join(p.read_text() for p in sorted(text_dir.glob("*.txt")))
    data = tmp_path / "docs.jsonl"  # 40 documents of 750 characters; the first block holds 3 of them
    data.write_text("".join(json.dumps({"text": text[i : i + 750]}) + "\n" for i in range(0, 30_000, 750)))
    args = ["--top-k", 8, "--seq-len", 32, "--block-mb", 0.002]
    dry = run_cli("cache-teacher", "--teacher", tiny_lm_dir, "--data", data, "--out", tmp_path / "dry", "--dry-run", *args)
    assert dry.exit_code == 0, dry.output
    assert "extrapolated from the first" in dry.output and not (tmp_path / "dry").exists()
    rows = int(dry.output.split("rows:")[1].split()[0])
    actual = open_cache(capture(tiny_lm_dir, data, tmp_path / "real", *args)).manifest["totals"]["rows"]
    assert abs(rows - actual) / actual < 0.20, (rows, actual)


def test_rerun_of_finished_capture_is_a_no_op(tiny_lm_dir, text_dir, tmp_path):
    args = ["--top-k", 8, "--seq-len", 32, "--limit-rows", 8]
    out = capture(tiny_lm_dir, text_dir, tmp_path / "cache", *args)
    before = (out / "manifest.json").read_bytes()
    again = capture(tiny_lm_dir, text_dir, out, *args)
    assert (again / "manifest.json").read_bytes() == before
    changed = run_cli("cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", out,
                      "--top-k", 4, "--seq-len", 32, "--limit-rows", 8)
    assert changed.exit_code == 2 and "capture.top_k (was 8, now 4)" in changed.output


@pytest.mark.slow
def test_ranks_split_the_data_blocks_and_make_the_same_rows_as_one_process(tiny_lm_dir, text_dir, tmp_path):
    text = "".join(p.read_text() for p in sorted(text_dir.glob("*.txt")))
    data = tmp_path / "docs.jsonl"  # 40 documents of 750 characters: 14 blocks of ~2,000 characters
    data.write_text("".join(json.dumps({"text": text[i : i + 750]}) + "\n" for i in range(0, 30_000, 750)))
    small = ("--top-k", 8, "--seq-len", 32, "--block-mb", 0.002, "--num-workers", 0)
    single = open_cache(capture(tiny_lm_dir, data, tmp_path / "one", *small))
    out = tmp_path / "ranks"
    first = run_cli("cache-teacher", "--teacher", tiny_lm_dir, "--data", data, "--out", out, *small,
                    "--temperature", 1, "--temperature", 2, "--temperature", 4, "--rank", 1, "--world-size", 3)
    assert first.exit_code == 0 and "manifest is written when every rank is done" in first.output
    for rank in (0, 2):
        capture(tiny_lm_dir, data, out, *small, "--rank", rank, "--world-size", 3)
    split = open_cache(out)
    assert {(s["block"] % 3, s["rank"]) for s in split.shards} == {(r, r) for r in range(3)}
    assert len(split) == len(single) and len({s["block"] for s in split.shards}) >= 10
    for i in range(len(single)):
        a, b = split.read_raw(i), single.read_raw(i)
        for field in b:
            np.testing.assert_array_equal(a[field], b[field], err_msg=f"row {i} {field}")
