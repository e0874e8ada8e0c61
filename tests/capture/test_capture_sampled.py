"""Sampled and mixed captures (--sample): what is stored, that draws are seeded per shard (resume and
ranks give the same bytes), and that such caches train; format-1 caches still read and train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe import open_cache
from kdpipe.pipeline.cache.encoding import GRID_STEP
from test_capture import TEMPERATURES, capture, run_cli

V1_CACHE = Path(__file__).parents[1] / "fixtures" / "cache_v1"
STUDENT = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 16,
           "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def docs(text_dir, tmp_path_factory) -> Path:
    text = "".join(p.read_text() for p in sorted(text_dir.glob("*.txt")))
    data = tmp_path_factory.mktemp("sampled_docs") / "docs.jsonl"  # 16 documents: several data blocks
    data.write_text("".join(json.dumps({"text": text[i : i + 750]}) + "\n" for i in range(0, 12_000, 750)))
    return data


SMALL = ("--seq-len", 32, "--block-mb", 0.002, "--num-workers", 0)


@pytest.fixture(scope="module")
def mixed(tiny_lm_dir, docs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed") / "cache"
    return capture(tiny_lm_dir, docs, out, *SMALL, "--top-k", 4, "--sample", 12, "--sample-temperature", 2,
                   "--values", "float32")


def dense_logprobs(model, row, temperature):
    with torch.no_grad():
        logits = model(torch.from_numpy(row["input_ids"])[None]).logits[0].double()
    return torch.log_softmax(logits / temperature, dim=-1).numpy()  # [P, V]


@pytest.mark.parametrize("top_k", [4, 0])
def test_draws_are_outside_the_top_k_with_exact_logprobs(tiny_lm_dir, docs, mixed, tmp_path, top_k):
    from transformers import AutoModelForCausalLM

    cache = open_cache(mixed if top_k else capture(tiny_lm_dir, docs, tmp_path / "sampled", *SMALL, "--sample", 12,
                                                   "--values", "float32", "--limit-rows", 6))
    sampling = cache.manifest["capture"]["sampling"]
    assert sampling["draws"] == 12 and sampling["seed"] == 0
    if top_k:  # --sample-temperature 2: all the draws at T = 2, the manifest as earlier kdpipes wrote it
        assert sampling["scheme"] == "one-temperature" and sampling["temperature"] == 2.0
        assert cache.schema.sample_temperature == 2.0 and "sample_scheme" not in cache.manifest["schema"]
    else:  # the default: split over the captured temperatures, and the manifest says so
        assert sampling["scheme"] == "temperature-mixture" and sampling["temperature"] is None
        assert sampling["draws_by_temperature"] == {f"{t:g}": 12 // len(TEMPERATURES) for t in TEMPERATURES}
        assert cache.manifest["schema"]["sample_scheme"] == "temperature-mixture"
        assert "sample_temperature" not in cache.manifest["schema"]
    assert cache.schema.top_k == top_k and cache.manifest["format_version"] == 2
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    for i in (0, len(cache) - 1):
        raw = cache.read_raw(i)
        valid = raw["mask"]
        counts = raw["sample_counts"][valid]
        np.testing.assert_array_equal(counts.sum(axis=1), 12)  # every draw is counted once
        real = counts > 0
        ids = raw["sample_ids"][valid]
        assert all(len(set(row[r])) == r.sum() for row, r in zip(ids, real))  # unique drawn ids
        topk = raw["topk_ids"][valid]
        assert not any(np.isin(row[r], top).any() for row, r, top in zip(ids, real, topk))  # drawn outside S
        for t in TEMPERATURES:
            row = cache.read(i, temperature=t)
            dense = np.take_along_axis(dense_logprobs(model, row, t)[valid], ids, axis=1)
            np.testing.assert_allclose(row["sample_logprobs"][valid][real], dense[real], atol=2e-5)
            assert np.all(np.isneginf(row["sample_logprobs"][valid][~real]))


@pytest.mark.slow
def test_draws_depend_only_on_seed_and_shard_so_redone_and_split_captures_match(tiny_lm_dir, docs, mixed, tmp_path):
    reference = open_cache(mixed)
    assert len(reference.shards) >= 4
    # A shard lost after the capture is redone by the same command: the same draws, the same bytes.
    out = tmp_path / "redo"
    capture(tiny_lm_dir, docs, out, *SMALL, "--top-k", 4, "--sample", 12, "--sample-temperature", 2, "--values", "float32")
    lost = reference.shards[2]["name"]
    (out / lost).unlink()
    (out / "manifest.json").unlink()
    capture(tiny_lm_dir, docs, out, *SMALL, "--top-k", 4, "--sample", 12, "--sample-temperature", 2, "--values", "float32")
    # Two ranks, each its share of the blocks.
    split = tmp_path / "split"
    for rank in (1, 0):
        capture(tiny_lm_dir, docs, split, *SMALL, "--top-k", 4, "--sample", 12, "--sample-temperature", 2,
                "--values", "float32", "--rank", rank, "--world-size", 2)
    for other in (out, split):
        assert [s["sha256"] for s in open_cache(other).shards] == [s["sha256"] for s in reference.shards]
    reseeded = open_cache(capture(tiny_lm_dir, docs, tmp_path / "seed1", *SMALL, "--top-k", 4, "--sample", 12,
                                  "--sample-temperature", 2, "--values", "float32", "--seed", 1))
    assert not np.array_equal(reseeded.read_raw(0)["sample_ids"], reference.read_raw(0)["sample_ids"])


def test_sampled_cache_trains_with_the_estimator_and_refuses_kinds_it_cannot_estimate(tiny_lm_dir, docs, tmp_path):
    cache = capture(tiny_lm_dir, docs, tmp_path / "sampled", *SMALL, "--sample", 8, "--limit-rows", 24)
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    common = ["train-student", "--cache", cache, "--student", student, "--steps", 3, "--batch-size", 4,
              "--device", "cpu", "--temperature", 2]
    ok = run_cli(*common, "--out", tmp_path / "run")
    assert ok.exit_code == 0, ok.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "unbiased estimator: 8 importance-weighted draws" in run["loss_implementation"]  # fused or not
    refused = run_cli(*common, "--out", tmp_path / "js", "--loss", "js")
    assert refused.exit_code == 2 and "--loss js is not defined on a sampled cache" in refused.output
    assert "use --loss forward-kl or skew-kl" in refused.output and not (tmp_path / "js").exists()


def test_format_1_cache_still_reads_and_trains(tmp_path):
    """tests/fixtures/cache_v1 was written by the last format-1 kdpipe (demo teacher, k = 8, fp16)."""
    cache = open_cache(V1_CACHE, verify_hashes=True)
    assert cache.manifest["format_version"] == 1 and not cache.schema.packed
    row = cache.read(3, temperature=2.0)
    assert row["topk_ids"].shape == (64, 8) and row["topk_ids"].dtype == np.int64
    total = np.exp(row["topk_logprobs"]).sum(axis=1) + row["tail_mass"]
    np.testing.assert_allclose(total[row["mask"]], 1.0, atol=2e-3)  # fp16 values: a proper distribution
    student = Path(__file__).parents[2] / "data" / "students" / "lm-student.json"
    result = run_cli("train-student", "--cache", V1_CACHE, "--student", student, "--out", tmp_path / "run",
                     "--steps", 2, "--batch-size", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_quantized_values_are_within_the_documented_error(tiny_lm_dir, docs, tmp_path):
    a = open_cache(capture(tiny_lm_dir, docs, tmp_path / "q", *SMALL, "--top-k", 16, "--limit-rows", 8))
    b = open_cache(capture(tiny_lm_dir, docs, tmp_path / "f", *SMALL, "--top-k", 16, "--limit-rows", 8,
                           "--values", "float32"))
    assert a.schema.value_dtype == "quantized" and a.manifest["totals"]["bytes"] < b.manifest["totals"]["bytes"]
    for i in range(len(a)):
        qa, fb = a.read_raw(i), b.read_raw(i)
        np.testing.assert_array_equal(qa["topk_ids"], fb["topk_ids"])
        assert np.abs(qa["topk_logits"] - fb["topk_logits"]).max() <= GRID_STEP / 2 + 1e-5


def test_evaluate_estimates_the_full_kl_from_a_sampled_cache(tiny_lm_dir, docs, tmp_path):
    """``kdpipe evaluate --cache`` on a sampled cache reports the draws' unbiased estimate of the full
    KL (close to the dense KL over a few hundred positions), and no top-1 agreement (no top-k)."""
    from transformers import AutoModelForCausalLM

    cache_dir = capture(tiny_lm_dir, docs, tmp_path / "sampled", *SMALL, "--sample", 64, "--limit-rows", 12,
                        "--values", "float32")
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    trained = run_cli("train-student", "--cache", cache_dir, "--student", student, "--steps", 3, "--batch-size", 4,
                      "--device", "cpu", "--out", tmp_path / "run")
    assert trained.exit_code == 0, trained.output
    result = run_cli("evaluate", "--model", tmp_path / "run" / "model", "--cache", cache_dir, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    reported = json.loads(result.output[result.output.index("{"):])
    assert "top1_agreement" not in reported
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    cache, kls = open_cache(cache_dir), []
    for i in range(len(cache)):
        row = cache.read(i)
        ids, attention = torch.from_numpy(row["input_ids"])[None], torch.from_numpy(row["mask"]).long()[None]
        with torch.no_grad():
            log_p = torch.log_softmax(teacher(ids, attention_mask=attention).logits[0].double(), -1)
            log_q = torch.log_softmax(model(ids, attention_mask=attention).logits[0].double(), -1)
        kls.append(((log_p.exp() * (log_p - log_q)).sum(-1))[torch.from_numpy(row["mask"])])
    dense = float(torch.cat(kls).mean())
    assert reported["positions"] == sum(len(k) for k in kls)
    assert abs(reported["kl_full_estimate"] - dense) < 0.05 * dense, (reported["kl_full_estimate"], dense)


def test_a_sample_scheme_this_kdpipe_does_not_know_is_refused_in_one_line(mixed, tmp_path):
    """A manifest (checksum intact) whose draws were made by a scheme this kdpipe cannot weigh: reading
    it with the wrong weights would bias training silently, so every command refuses it."""
    import shutil

    from kdpipe.pipeline.cache.manifest import manifest_checksum

    copy = tmp_path / "newer"
    shutil.copytree(mixed, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema"]["sample_scheme"] = "per-temperature"
    manifest["checksum"] = manifest_checksum(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("inspect", copy)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown sample scheme 'per-temperature'"), lines
    assert "a newer kdpipe wrote this cache?" in lines[0]
