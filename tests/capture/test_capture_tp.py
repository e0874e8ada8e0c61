"""Tensor-parallel capture (``cache-teacher --tensor-parallel``, issue 23): the exact combination of
vocabulary slices against the view of the whole vocabulary; real ``torchrun`` (gloo, CPU) captures
of a small Llama split over 2 ranks equal to the capture of one process, resumed as one; and every
refusal as one ``error:`` line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe.pipeline.cache.reader import TeacherCache
from kdpipe.pipeline.capture.tensor_parallel import merged_view, vocab_slice
from kdpipe.pipeline.capture.topk import partial_of_hidden, sparse_view_of_hidden, sparse_view_of_logits
from kdpipe.stages.cli import main

REPO = Path(__file__).resolve().parents[2]
KDPIPE = Path(sys.executable).parent / "kdpipe"
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
FIELDS = ("topk_ids", "topk_logits", "logsumexp", "tail_logprob")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")
# 100 conversations in 8 blocks of 4 kB, several shards a block; values stored as float32 so that
# the comparison sees the rounding of the split teacher, not the storage grid
SETTINGS = ["--data", str(REPO / "data" / "chat" / "heldout.jsonl"), "--top-k", "8", "--seq-len", "32",
            "--batch-size", "16", "--targets", "all", "--block-mb", "0.004", "--shard-size-mb", "0.01",
            "--num-workers", "0", "--temperature", "1", "--temperature", "2", "--device", "cpu", "--values", "float32"]


# ----------------------------------------------------------------------------- the combination, in-process
def slice_views(hidden, weight, parts: int, top_k: int, temperatures=TEMPERATURES):
    """The merged view of ``parts`` vocabulary slices of the head, as the ranks of a group make it."""
    partials = []
    for r in range(parts):
        first, rows = vocab_slice(weight.shape[0], parts, r)
        partial = partial_of_hidden(hidden, weight[first : first + rows], top_k=top_k, temperatures=temperatures,
                                    vocab_block=max(top_k, 37))  # several vocabulary blocks per slice
        partial.ids = partial.ids + first
        partials.append(partial)
    return merged_view(partials, top_k=top_k, temperatures=temperatures)


@pytest.mark.parametrize("vocab, parts, top_k", [(1000, 2, 16), (1001, 3, 16), (2048, 4, 64), (12, 3, 4)])
def test_slices_combine_to_the_view_of_the_whole_vocabulary(vocab, parts, top_k):
    """Uneven slices (1001 = 334 + 334 + 333), several blocks per slice, and (12 ids, 3 slices of 4,
    k = 4) a global tail made only of candidates that lost: the same view as the dense logits give."""
    gen = torch.Generator().manual_seed(vocab + parts)
    hidden = torch.randn(50, 24, generator=gen)
    weight = torch.randn(vocab, 24, generator=gen) * 0.7
    view = slice_views(hidden, weight, parts, top_k)
    dense = sparse_view_of_logits(hidden @ weight.T, top_k=top_k, temperatures=TEMPERATURES)
    assert torch.equal(view.topk_ids, dense.topk_ids)  # no ties among random fp32 logits
    for name in FIELDS[1:]:
        torch.testing.assert_close(getattr(view, name), getattr(dense, name), atol=2e-6, rtol=1e-5)
    # the tail against float64 arithmetic on the logits outside the top-k
    z = (hidden.double() @ weight.double().T)
    z -= z.amax(dim=1, keepdim=True)
    rest = z.scatter(1, view.topk_ids, float("-inf"))
    for j, t in enumerate(TEMPERATURES):
        expected = torch.logsumexp(rest / t, dim=1) - torch.logsumexp(z / t, dim=1)
        torch.testing.assert_close(view.tail_logprob[:, j].double(), expected, atol=1e-5, rtol=1e-5)


def test_slices_combine_with_a_tiny_tail_and_ties():
    """A position whose mass sits on its top-k (tail ~ e^-60 at T = 0.5 kept exactly, not as 1 - sum p)
    and one with tied logits across slices (the tied values are kept; ids are one of the tied sets)."""
    hidden = torch.eye(8)[:2]
    weight = torch.zeros(64, 8)
    weight[[3, 40, 50], 0] = torch.tensor([30.0, 29.0, 28.0])  # row 0: three big logits, the rest 0
    weight[[5, 37], 1] = 2.0  # row 1: a tie between slice 0 and slice 1
    view = slice_views(hidden, weight, 2, 3)
    dense = sparse_view_of_hidden(hidden, weight, top_k=3, temperatures=TEMPERATURES)
    assert view.topk_ids[0].tolist() == [3, 40, 50] and set(view.topk_ids[1, :2].tolist()) == {5, 37}
    for name in FIELDS[1:]:
        torch.testing.assert_close(getattr(view, name), getattr(dense, name), atol=1e-6, rtol=1e-5)
    assert float(view.tail_logprob[0, 0]) < -50  # exact in log space


def test_slices_report_the_first_nan_position():
    hidden = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    hidden[4, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="at position 4$"):
        slice_views(hidden, weight, 2, 4)


def test_vocab_slices_are_the_rows_a_shard0_dtensor_holds():
    for vocab, parts in ((2048, 2), (1001, 3), (10, 4), (151936, 8)):
        chunks = torch.arange(vocab).chunk(parts)
        expected = [(int(c[0]), len(c)) for c in chunks] + [(vocab, 0)] * (parts - len(chunks))
        assert [vocab_slice(vocab, parts, r) for r in range(parts)] == expected


def test_ranks_are_cut_into_groups_of_consecutive_ranks():
    from kdpipe.pipeline.distributed import Group, Launch, data_parallel_rank

    groups = [data_parallel_rank(Launch(rank, 8, rank, 8), 4) for rank in range(8)]
    assert groups == [(0, 2)] * 4 + [(1, 2)] * 4
    writers = [r for r in range(8) if Group(Launch(r, 8, r, 8), torch.device("cpu"), 1.0, 4).writes]
    assert writers == [0, 4]  # the first rank of each group writes its shards
    assert data_parallel_rank(Launch(3, 4, 3, 4), 1) == (3, 4)  # without tensor parallelism: the ranks


# ----------------------------------------------------------------------------- the CLI, under torchrun
def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    return clean | {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(KDPIPE), "cache-teacher", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env(), timeout=400)


def run_cli(*args, env=None):
    return CliRunner().invoke(main, ["cache-teacher", *map(str, args)], catch_exceptions=False, env=env)


def save_llama(folder: Path, *, heads: int, kv_heads: int) -> Path:
    """A random Llama (2 layers, vocab 2048, the shipped tokenizer) with sharp logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "data" / "tokenizer" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    """4 attention heads, 2 key/value heads: splits over 2 ranks (the shipped teacher has 3 heads)."""
    return save_llama(tmp_path_factory.mktemp("llama4"), heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def single(llama4, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    result = run_cli("--teacher", llama4, *SETTINGS, "--out", out, env={k: None for k in TORCHRUN_VARS})
    assert result.exit_code == 0, result.output
    return out


def assert_same_rows(cache: Path, reference: Path) -> None:
    """The same rows; the same top-k ids except where two logits tie within rounding; values within
    fp32 rounding of a teacher split over ranks (the row-parallel layers sum in another order)."""
    a, b = TeacherCache(str(cache)), TeacherCache(str(reference))
    assert len(a) == len(b) > 0
    swapped = 0
    for i in range(len(a)):
        got, want = a.read_raw(i), b.read_raw(i)
        for name in ("sample_index", "input_ids", "mask"):
            np.testing.assert_array_equal(got[name], want[name])
        mask = want["mask"].astype(bool)
        for name in ("topk_logits", "logsumexp", "tail_logprob"):
            np.testing.assert_allclose(got[name][mask], want[name][mask], atol=1e-5, rtol=0)
        values, differs = want["topk_logits"][mask], got["topk_ids"][mask] != want["topk_ids"][mask]
        gaps = np.abs(np.diff(values, axis=1)) < 1e-5  # slot j ties with slot j + 1
        near_tie = np.zeros_like(differs)
        near_tie[:, :-1] |= gaps
        near_tie[:, 1:] |= gaps
        near_tie[:, -1] = True  # the k-th may tie with the best of the tail
        assert not (differs & ~near_tie).any(), f"row {i}: ids differ away from a tie"
        swapped += int(differs.sum())
    assert swapped <= 5, swapped


@pytest.mark.slow
def test_tensor_parallel_capture_equals_one_process_and_resumes(llama4, single, tmp_path):
    """torchrun with 4 processes and --tensor-parallel 2: 2 data-parallel groups of 2 ranks, each
    group one teacher split by its plan; the cache equals the single-process one. Then with the
    manifest and two shards gone (a capture stopped before its end) the same command redoes just
    those, the followers skipping what their writer kept."""
    out = tmp_path / "cache"
    result = torchrun("--teacher", llama4, *SETTINGS, "--tensor-parallel", 2, "--out", out, nproc=4)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("wrote ") == 1 and "by 4 processes (2 groups of tensor-parallel 2)" in result.stdout
    assert "error:" not in result.stderr
    assert_same_rows(out, single)
    manifest = json.loads((out / "manifest.json").read_text())
    capture = manifest["capture"]
    assert (capture["tensor_parallel"], capture["data_parallel"], capture["world_size"]) == (2, 2, 2)
    assert capture["sparse_view"].startswith("vocabulary-parallel head-fused: each of the 2 tensor-parallel ranks")
    assert "lm_head colwise_gather_output" in capture["sparse_view"]
    assert {s["rank"] for s in manifest["shards"]} == {0, 1} and all(s["rank"] == s["block"] % 2 for s in manifest["shards"])
    assert manifest["totals"] == {**json.loads((single / "manifest.json").read_text())["totals"],
                                  "bytes": manifest["totals"]["bytes"], "bytes_per_token": manifest["totals"]["bytes_per_token"]}
    # one record and one lock per group: the followers wrote nothing
    assert sorted(p.name for p in (out / "_progress").iterdir()) == ["r00000.json", "r00000.lock", "r00001.json",
                                                                     "r00001.lock"]

    redo = [next(s["name"] for s in manifest["shards"] if s["rank"] == rank and s["part"] == 1) for rank in (0, 1)]
    kept = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in manifest["shards"] if s["name"] not in redo}
    (out / "manifest.json").unlink()
    for name in redo:
        (out / name).unlink()
    again = torchrun("--teacher", llama4, *SETTINGS, "--tensor-parallel", 2, "--out", out, nproc=4)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"redoing 1 damaged or missing ({redo[0]})" in again.stderr  # rank 0 reports its group's
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not rewritten
    assert all((out / name).is_file() for name in redo)
    assert_same_rows(out, single)


@pytest.mark.slow
def test_sampled_tensor_parallel_capture_draws_from_the_gathered_logits(llama4, tmp_path):
    """--sample under --tensor-parallel: the draws need the whole distribution, so every rank takes the
    logits the plan gathers; the cache equals one process's (same seeds, same draws) and says so."""
    sampled = ["--sample", "6", "--top-k", "4"]
    one = tmp_path / "one"
    result = run_cli("--teacher", llama4, *SETTINGS, *sampled, "--limit-rows", 32, "--out", one,
                     env={k: None for k in TORCHRUN_VARS})
    assert result.exit_code == 0, result.output
    out = tmp_path / "tp"
    result = torchrun("--teacher", llama4, *SETTINGS, *sampled, "--limit-rows", 32, "--tensor-parallel", 2,
                      "--out", out, nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    capture = json.loads((out / "manifest.json").read_text())["capture"]
    assert capture["sparse_view"].startswith("from the teacher's logits, gathered on each of the 2 tensor-parallel ranks")
    assert "sampling draws from the logits" in capture["sparse_view"]
    a, b = TeacherCache(str(out)), TeacherCache(str(one))
    for i in range(len(b)):
        got, want = a.read_raw(i), b.read_raw(i)
        mask = want["mask"].astype(bool)
        for name in ("sample_ids", "sample_counts"):
            assert (got[name][mask] != want[name][mask]).mean() < 0.01, name  # a draw may flip at a rounding edge
        np.testing.assert_allclose(got["logsumexp"][mask], want["logsumexp"][mask], atol=1e-5)


# ----------------------------------------------------------------------------- refusals, one line each
def torchrun_env(world: int, rank: int = 0) -> dict:
    """What torchrun sets, for a refusal that comes before any process joins the others."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def assert_refused(result, message: str, out: Path) -> None:
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {message}\n"
    assert not out.exists()


def test_tensor_parallel_without_torchrun_is_refused(llama4, tmp_path):
    result = run_cli("--teacher", llama4, *SETTINGS, "--tensor-parallel", 2, "--out", tmp_path / "c",
                     env={k: None for k in TORCHRUN_VARS})
    assert_refused(result, "--tensor-parallel 2 splits the teacher over torchrun processes; start the capture with "
                           "torchrun --nproc-per-node N (N a multiple of 2)", tmp_path / "c")


def test_world_size_not_a_multiple_is_refused(llama4, tmp_path):
    result = run_cli("--teacher", llama4, *SETTINGS, "--tensor-parallel", 2, "--out", tmp_path / "c",
                     env=torchrun_env(3))
    assert_refused(result, "--tensor-parallel 2 does not divide the 3 processes (WORLD_SIZE); start a multiple of 2 "
                           "processes (torchrun --nproc-per-node)", tmp_path / "c")


def test_tensor_parallel_with_device_map_is_refused(llama4, tmp_path):
    settings = [s for s in SETTINGS if s not in ("--device", "cpu")]
    result = run_cli("--teacher", llama4, *settings, "--tensor-parallel", 2, "--device-map", "auto",
                     "--out", tmp_path / "c", env=torchrun_env(2))
    assert_refused(result, "--tensor-parallel 2 splits every layer of the teacher over torchrun processes and "
                           "--device-map auto places whole layers on the GPUs of one process; use one of them",
                   tmp_path / "c")


def test_heads_not_divisible_are_refused(tmp_path):
    """The shipped teacher has 3 heads; transformers would load it split over 2 ranks and fail in the
    first forward (a view of 3 * 64 / 2 columns as 64-wide heads)."""
    result = run_cli("--teacher", REPO / "data" / "teacher", *SETTINGS, "--tensor-parallel", 2,
                     "--out", tmp_path / "c", env=torchrun_env(2))
    assert_refused(result, f"teacher {REPO / 'data' / 'teacher'} has 3 attention heads, which --tensor-parallel 2 "
                           "does not divide; use a --tensor-parallel that divides 3, or --device-map auto", tmp_path / "c")


def test_a_teacher_without_a_plan_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(teacher)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "data" / "tokenizer" / name, teacher / name)
    result = run_cli("--teacher", teacher, *SETTINGS, "--tensor-parallel", 2, "--out", tmp_path / "c",
                     env=torchrun_env(2))
    assert_refused(result, f"teacher {teacher} (gpt2) has no tensor-parallel plan in transformers; drop "
                           "--tensor-parallel and use --device-map auto to spread it over the GPUs", tmp_path / "c")


def test_a_module_teacher_is_refused(module_teacher, tmp_path):
    result = run_cli("--teacher", module_teacher["spec"], "--weights", module_teacher["weights"],
                     "--data", module_teacher["data"], "--tensor-parallel", 2, "--out", tmp_path / "c",
                     env=torchrun_env(2))
    assert_refused(result, "--tensor-parallel splits a Hugging Face teacher with its model's tensor-parallel plan, "
                           "which a package.module:factory teacher has not; drop --tensor-parallel (--device-map auto "
                           "spreads an HF teacher over the GPUs)", tmp_path / "c")


def test_top_k_over_a_vocabulary_slice_is_refused(llama4, tmp_path):
    settings = [s for s in SETTINGS]
    settings[settings.index("--top-k") + 1] = "1025"
    result = run_cli("--teacher", llama4, *settings, "--tensor-parallel", 2, "--out", tmp_path / "c",
                     env=torchrun_env(2))
    assert_refused(result, "--top-k 1025 exceeds the 1024 ids of the smallest of 2 slices of the 2048-id vocabulary; "
                           "use --top-k 1024 or less, or a smaller --tensor-parallel", tmp_path / "c")


def test_tensor_parallel_below_one_is_refused(llama4, tmp_path):
    result = run_cli("--teacher", llama4, *SETTINGS, "--tensor-parallel", 0, "--out", tmp_path / "c",
                     env={k: None for k in TORCHRUN_VARS})
    assert_refused(result, "--tensor-parallel 0 must be 1 (no tensor parallelism) or more", tmp_path / "c")


@pytest.mark.slow  # (the single-process capture it reuses is the slow tests')
def test_another_tensor_parallel_in_a_capture_s_out_is_refused(llama4, single):
    before = {p: p.stat().st_mtime_ns for p in single.rglob("*")}
    result = run_cli("--teacher", llama4, *SETTINGS, "--tensor-parallel", 2, "--out", single, env=torchrun_env(2))
    assert result.exit_code == 2 and result.output == (
        f"error: {single} already holds a capture with different settings: capture.tensor_parallel (was 1, now 2); "
        "use a new --out, or pass --overwrite to replace it\n")
    assert {p: p.stat().st_mtime_ns for p in single.rglob("*")} == before


def test_a_probe_under_tensor_parallel_is_refused(llama4, tmp_path):
    result = run_cli("--teacher", llama4, *SETTINGS, "--tensor-parallel", 2, "--dry-run", "--probe-rows", 4,
                     "--out", tmp_path / "c", env=torchrun_env(2))
    assert_refused(result, "--probe-rows runs the teacher in one process; drop --tensor-parallel for the probe "
                           "(the cache's size does not depend on it), or drop --probe-rows", tmp_path / "c")


def test_a_dry_run_under_tensor_parallel_loads_no_weights(llama4, tmp_path):
    result = run_cli("--teacher", llama4, *SETTINGS, "--tensor-parallel", 2, "--dry-run", "--out", tmp_path / "c",
                     env=torchrun_env(2))
    assert result.exit_code == 0, result.output
    assert "rows:" in result.output and not (tmp_path / "c").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tensor_parallel_capture_on_two_gpus(llama4, single, tmp_path):
    """The same capture on 2 GPUs (nccl), bf16 off: equal to the CPU capture within fp32 rounding."""
    settings = [s for s in SETTINGS if s not in ("--device", "cpu")]
    out = tmp_path / "cache"
    result = torchrun("--teacher", llama4, *settings, "--dtype", "float32", "--tensor-parallel", 2, "--out", out, nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_rows(out, single)
