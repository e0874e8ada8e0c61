"""train-student --sharding fsdp (FSDP2 under torchrun, gloo on CPU), its sharded checkpoints, and
--gradient-checkpointing.

Five torchrun launches in all: four for the module's runs (an FSDP run with the fused loss, one with
the unfused loss, gradient checkpointing and evaluation, one killed after its step-4 checkpoint, then
resumed) and one whose rank 0 cannot write its checkpoint shards."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kdpipe.pipeline.errors import ConfigError, IntegrityError
from kdpipe.pipeline.train.checkpoint_files import DamagedCheckpoint, verify_checkpoint
from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.pipeline.train.sharded_checkpoint import _MetadataUnpickler
from kdpipe.pipeline.train.sharding import decoder_layers, enable_gradient_checkpointing, wrap
from kdpipe.stages.cli import main

STUDENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "tie_word_embeddings": True,  # the lm-head is the embedding (Llama 3.2 1B/3B)
}
HELPER = str(Path(__file__).parents[1] / "ddp_train.py")
STEPS = 6


@pytest.fixture(scope="module")
def cache(full_rows_cache):
    return full_rows_cache


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = tmp_path_factory.mktemp("student") / "student.json"
    path.write_text(json.dumps(STUDENT))
    return path


def settings(cache, student, out: Path, **changes) -> dict:
    values = dict(cache=str(cache), student=str(student), out=str(out), steps=STEPS, batch_size=4, lr=3e-3,
                  seed=1, eval_fraction=0.0, eval_every=0, checkpoint_every=2, log_every=1, device="cpu",
                  sharding="fsdp") | changes
    config = TrainConfig(**values)
    config.validate()
    return dataclasses.asdict(config)


def torchrun_helper(config: dict, *args: str) -> subprocess.CompletedProcess:
    path = Path(config["out"]).with_suffix(".json")
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", HELPER,
               str(path), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(cache, student, tmp_path_factory):
    """The FSDP runs (2 ranks x batch 4), each 6 steps: fused; unfused with gradient checkpointing and
    evaluation; killed after its step-4 checkpoint and resumed; and one process with batch 8 (no torchrun)."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    torchrun_helper(settings(cache, student, root / "fused"))
    torchrun_helper(settings(cache, student, root / "unfused", fused_loss=False, gradient_checkpointing=True,
                             eval_cache=str(cache), eval_rows=8, eval_every=3))  # evaluates: the same training rows
    cut = settings(cache, student, root / "cut")
    torchrun_helper(cut, "--stop-after", "4")  # a crash right after the checkpoint of step 4
    shutil.copytree(root / "cut", root / "cut_at_4")
    torchrun_helper(cut, "--resume")
    one = CliRunner().invoke(main, ["train-student", "--cache", str(cache), "--student", str(student),
                                    "--out", str(root / "one"), "--batch-size", "8", "--steps", str(STEPS),
                                    "--lr", "3e-3", "--seed", "1", "--eval-fraction", "0", "--device", "cpu"],
                             catch_exceptions=False)
    assert one.exit_code == 0, one.output
    return root


@pytest.mark.slow
def test_two_fsdp_ranks_with_batch_b_train_like_one_process_with_batch_2b(runs):
    one, fsdp = weights(runs / "one"), weights(runs / "fused")
    assert one.keys() == fsdp.keys()
    for name in one:
        torch.testing.assert_close(fsdp[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    run = json.loads((runs / "fused" / "run.json").read_text())
    assert run["distributed"] == {"world_size": 2, "per_rank_batch_size": 4, "global_batch_size": 8,
                                  "rows_per_step": 8, "backend": "gloo", "sharding": "fsdp"}
    assert run["loss_implementation"].startswith("fused:")
    assert json.loads((runs / "one" / "run.json").read_text())["distributed"]["sharding"] == "none (one process)"


@pytest.mark.slow
def test_fsdp_with_the_fused_loss_equals_fsdp_unfused_with_gradient_checkpointing(runs):
    fused, unfused = weights(runs / "fused"), weights(runs / "unfused")
    assert json.loads((runs / "unfused" / "run.json").read_text())["loss_implementation"].startswith("unfused:")
    start = _initial_student_weights(runs)
    for name in fused:  # the tolerance of the one-process fused-vs-unfused test (test_train.py)
        torch.testing.assert_close(unfused[name], fused[name], rtol=1e-4, atol=2e-5, msg=name)
        assert not torch.equal(fused[name], start[name]), name  # every weight moved, the lm-head's included
    records = [json.loads(line) for line in (runs / "unfused" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if r["split"] == "eval"]  # every rank evaluated, rank 0 logged once
    assert [r["step"] for r in evaluations] == [3, 6] and all(r["rows"] == 8 and r["ce"] > 0 for r in evaluations)
    first = [json.loads((runs / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("fused", "unfused")]
    for key in ("loss", "kd", "ce", "grad_norm"):  # step 1: the same weights, the same loss and gradient
        assert first[0][key] == pytest.approx(first[1][key], rel=1e-5), key


@pytest.mark.slow
def test_fsdp_killed_after_a_checkpoint_and_resumed_ends_bit_identical(runs):
    full, resumed = weights(runs / "fused"), weights(runs / "cut")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    records = [json.loads(line) for line in (runs / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == [json.loads(line)["loss"] for line in
                                            (runs / "fused" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sharded_checkpoint_lists_every_rank_shard_and_a_damaged_one_is_refused(runs):
    folder = runs / "cut_at_4" / "checkpoint"
    manifest = json.loads((folder / "checkpoint.json").read_text())
    assert manifest["format"] == "kdpipe-sharded-checkpoint/1" and manifest["world_size"] == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng/rank0.pt", "rng/rank1.pt",
            "trainer_state.json"} == set(manifest["files"])
    assert not (folder / "model.safetensors").exists() and not (folder / "optimizer.pt").exists()  # nothing gathered
    assert verify_checkpoint(folder)["step"] == 4
    shard = folder / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="dcp/__1_0.distcp does not match"):
        verify_checkpoint(folder)


@pytest.mark.slow
def test_dcp_metadata_is_read_without_unpickling_anything_else(runs):
    metadata = (runs / "cut" / "checkpoint" / "dcp" / ".metadata").read_bytes()
    assert _MetadataUnpickler(io.BytesIO(metadata)).load().state_dict_metadata  # DCP's own classes load
    with pytest.raises(IntegrityError, match="names posix.system"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(os.system))).load()


@pytest.mark.slow
def test_fsdp_model_loads_with_from_pretrained(runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs / "fused" / "model")
    assert json.loads((runs / "fused" / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    saved = weights(runs / "fused")
    assert saved.keys() == model.state_dict().keys() - {"lm_head.weight"}  # a tied tensor is stored once
    for name, tensor in saved.items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.slow
def test_resuming_an_fsdp_run_with_another_number_of_ranks_is_refused(runs):
    result = CliRunner().invoke(main, ["train-student", "--out", str(runs / "cut_at_4"), "--resume"])
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert "world_size (was 2, now 1); resume it with 2 processes under torchrun" in result.output


@pytest.mark.slow
def test_when_rank_0_cannot_write_its_shards_only_its_error_line_is_printed(cache, student, tmp_path):
    """Rank 0 alone may write no file over 60 kB (as on a full disk): its shard of the step-2 checkpoint
    fails inside DCP, which tells every rank. Rank 0 prints the one error: line; rank 1 says it stopped,
    with no traceback; nothing half-written is left."""
    limit = str(Path(__file__).with_name("file_size_limit.py"))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", limit, "60000", "0",
               "train-student", "--cache", str(cache), "--student", str(student), "--out", str(out), "--steps", "4",
               "--batch-size", "4", "--eval-fraction", "0", "--device", "cpu", "--sharding", "fsdp",
               "--checkpoint-every", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: cannot write the checkpoint of step 2 to --out {out}: [Errno 27] File too large; "
                      "fix that and run the same command again (the run had no checkpoint yet)"], result.stderr[-3000:]
    assert "rank 1 of 2 stopped while writing its checkpoint shards: rank 0 failed" in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("[rank")] == []  # no worker traceback
    assert "pipeline/train" not in result.stderr and "CheckpointException" not in result.stderr  # torchrun's report only
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint").exists()


def _initial_student_weights(runs: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)  # load_student's seed
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(runs / "fused" / "model"))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# ---------------------------------------------------------------- one process


def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_gradients(one_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    def gradients(checkpointing: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in STUDENT.items() if k != "architectures"}))
        if checkpointing:
            enable_gradient_checkpointing(model, kind="hf")
        model.train()
        calls, mlp = [], model.model.layers[0].mlp
        mlp.forward = lambda *args, run=mlp.forward: calls.append(1) or run(*args)  # counts the layer's runs
        ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = gradients(False)
    recomputed, recomputed_calls = gradients(True)
    assert (plain_calls, recomputed_calls) == (1, 2)  # the layer ran again in backward
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=0, msg=name)


def test_gradient_checkpointing_trains_to_the_same_weights_through_the_cli(cache, student, tmp_path, one_thread):
    def run(name: str, *extra: str) -> dict[str, torch.Tensor]:
        result = CliRunner().invoke(main, [
            "train-student", "--cache", str(cache), "--student", str(student), "--out", str(tmp_path / name),
            "--batch-size", "4", "--steps", "2", "--eval-fraction", "0", "--device", "cpu", *extra],
            catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return weights(tmp_path / name)

    plain, recomputed = run("plain"), run("recomputed", "--gradient-checkpointing")
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=0, msg=name)
    settings = json.loads((tmp_path / "recomputed" / "run.json").read_text())["resolved_settings"]
    assert settings["gradient_checkpointing"] is True


def _refusal(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_cpu_offload_without_fsdp_is_refused(cache, student, tmp_path):
    line = _refusal(["train-student", "--cache", str(cache), "--student", str(student), "--out", str(tmp_path / "r"),
                     "--steps", "1", "--cpu-offload"])
    assert line == "error: --cpu-offload moves FSDP's shards to CPU memory; add --sharding fsdp (under torchrun)"


def test_cpu_offload_in_one_process_is_refused(cache, student, tmp_path):
    line = _refusal(["train-student", "--cache", str(cache), "--student", str(student), "--out", str(tmp_path / "r"),
                     "--steps", "1", "--sharding", "fsdp", "--cpu-offload", "--device", "cpu"])
    assert "one process shards nothing; start it with torchrun --nproc-per-node N" in line


def test_cpu_offload_on_the_cpu_is_refused():
    """Under torchrun on CPU (checked here without a launch: the refusal comes before any collective)."""
    with pytest.raises(ConfigError) as refused:
        wrap(torch.nn.Linear(2, 2), model=torch.nn.Linear(2, 2), sharding="fsdp", world_size=2,
             device=torch.device("cpu"), cpu_offload=True)
    assert str(refused.value) == ("--cpu-offload moves FSDP's shards off the GPUs, and with --device cpu they are "
                                  "in CPU memory already; drop --cpu-offload")


def test_gradient_checkpointing_of_a_module_student_is_refused(module_teacher, module_cache, tmp_path):
    line = _refusal(["train-student", "--cache", str(module_cache), "--student", module_teacher["spec"],
                     "--data", str(module_teacher["data"]), "--out", str(tmp_path / "r"), "--steps", "1",
                     "--temperature", "2", "--gradient-checkpointing", "--device", "cpu"])
    assert line.startswith("error: --gradient-checkpointing needs a Hugging Face student")


def test_an_unknown_sharding_is_refused(cache, student, tmp_path):
    result = CliRunner().invoke(main, ["train-student", "--cache", str(cache), "--student", str(student),
                                       "--out", str(tmp_path / "r"), "--steps", "1", "--sharding", "zero3"])
    assert result.exit_code == 2 and "'zero3' is not one of 'ddp', 'fsdp'" in result.output


def test_fsdp_needs_a_decoder_layer_list():
    """Under torchrun --sharding fsdp shards layer by layer: a student without ``model.model.layers``
    (a module:factory one) is refused in one line (checked here without a torchrun launch)."""
    with pytest.raises(ConfigError) as refused:
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert str(refused.value) == ("--sharding fsdp shards a Hugging Face student layer by layer, and Sequential has "
                                  "no decoder layer list (model.model.layers); train it with --sharding ddp")


# ---------------------------------------------------------------- CUDA (benchmarks/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_on_cuda_fused_loss_equals_unfused_with_bf16_gathers(tmp_path):
    """One process in a one-rank NCCL group, the student sharded as under torchrun (bf16 gathered
    weights, fp32 reduction): the fused loss inside StudentForward gives the unfused loss and gradients."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdpipe.pipeline.train.fused_kd import fused_linear_distillation_loss
    from kdpipe.pipeline.train.losses import distillation_loss
    from kdpipe.pipeline.train.sharding import StudentForward, shard

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 300, (2, 16), generator=generator).to(device)
        topk_ids = torch.randint(0, 300, (32, 8), generator=generator).to(device)
        topk_logprobs = torch.log_softmax(torch.randn(32, 9, generator=generator), -1).to(device)
        targets = dict(labels=ids.reshape(-1), topk_ids=topk_ids, teacher_topk_logprobs=topk_logprobs[:, :8],
                       teacher_tail_logprob=topk_logprobs[:, 8], alpha=0.5, temperature=2.0)

        def run(fused: bool) -> tuple[float, dict]:
            torch.manual_seed(0)
            config = LlamaConfig(**{k: v for k, v in STUDENT.items() if k != "architectures"})
            model = LlamaForCausalLM(config).to(device)
            forward = shard(StudentForward(model), model=model, device=device, cpu_offload=False)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if fused:
                    parts = forward(ids, None, lambda hidden, weight, bias: fused_linear_distillation_loss(
                        hidden.reshape(-1, hidden.shape[-1]), weight, head_bias=bias, **targets))
                else:
                    logits = forward(ids, None)
                    parts = distillation_loss(logits.reshape(-1, logits.shape[-1]).float(), **targets)
            parts["loss"].backward()
            return float(parts["loss"]), {n: p.grad.to_local().float().cpu() for n, p in model.named_parameters()}

        (fused_loss, fused_grads), (plain_loss, plain_grads) = run(True), run(False)
        assert fused_loss == pytest.approx(plain_loss, rel=2e-2)
        for name in plain_grads:  # bf16 matmuls: compare at bf16's precision
            torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=5e-2, atol=5e-3, msg=name)
    finally:
        dist.destroy_process_group()
