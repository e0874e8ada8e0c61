"""LoRA students (pipeline/models/lora.py): only the adapters train, model/ is base + (alpha/r) B A and
adapter/ peft's adapter; fused loss, resume and the refusals, through the real Trainer and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.pipeline.train.trainer import Trainer
from kdpipe.stages.cli import main
from tests.train.crash import train

STUDENT = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def lm_cache(tiny_lm_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "cache"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", str(tiny_lm_dir), "--data", str(text_dir), "--out", str(out),
        "--top-k", "16", "--seq-len", "16", "--limit-rows", "64", "--temperature", "2", "--device", "cpu",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A 'pretrained' student: a random Llama saved with save_pretrained (weights in model.safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("pretrained_student")
    LlamaForCausalLM(LlamaConfig(**STUDENT)).save_pretrained(folder, safe_serialization=True)
    return folder


def make_config(cache, student, out, **overrides) -> TrainConfig:
    values = dict(cache=str(cache), student=str(student), out=str(out), steps=4, batch_size=4, eval_every=0,
                  checkpoint_every=2, log_every=1, lr=1e-2, seed=1, device="cpu", temperature=2.0,
                  lora_r=4, lora_targets=["q_proj,v_proj", "down_proj"])
    values.update(overrides)
    config = TrainConfig(**values)
    config.validate()
    return config


def run_cli(*args) -> "CliRunner.invoke":
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_error_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and len([l for l in lines if l.startswith("error:")]) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def adapter_pairs(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{base weight name in model/: (A, B)} from peft's adapter_model.safetensors."""
    pairs: dict[str, dict] = {}
    for name, tensor in adapter.items():  # base_model.model.<module>.lora_A.weight
        module, kind = name.removeprefix("base_model.model.").rsplit(".lora_", 1)
        pairs.setdefault(f"{module}.weight", {})[kind.split(".")[0]] = tensor
    return {name: (ab["A"], ab["B"]) for name, ab in pairs.items()}


# ----------------------------------------------------------------------------- what a LoRA run trains and writes
def test_only_adapters_train_and_model_is_the_base_plus_the_scaled_update(lm_cache, pretrained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    trainer = Trainer(make_config(lm_cache, pretrained, out))
    trainer.setup()
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    adapter_names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapter_names and all(".lora_A." in n or ".lora_B." in n for n in adapter_names)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in trainer.model.named_parameters() if n in adapter_names}
    batch = next(trainer.batches())  # one backward: gradients reach the adapters alone
    trainer.loss(batch, temperature=2.0, alpha=0.5)["loss"].backward()
    assert {n for n, p in trainer.model.named_parameters() if p.grad is not None} == adapter_names
    trainer.model.zero_grad(set_to_none=True)
    trainer.batches_in_epoch = 0
    trainer.fit()
    for name, param in trainer.model.named_parameters():  # every base tensor as it was
        if name in base:
            assert torch.equal(param, base[name]), name
    trainer.finish({})
    trainer.close()

    run = json.loads((out / "run.json").read_text())
    lora = run["lora"]
    layers = STUDENT["num_hidden_layers"]  # r (in + out) each: q_proj, v_proj 32 -> 32; down_proj 64 -> 32
    assert lora["trainable_parameters"] == layers * 4 * ((32 + 32) * 2 + (64 + 32))
    assert len(lora["adapted_modules"]) == 3 * layers
    assert (lora["r"], lora["alpha"], lora["scaling"], lora["head_adapted"]) == (4, 8.0, 2.0, False)
    assert run["resolved_settings"]["lora_targets"] == ["q_proj", "v_proj", "down_proj"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert {"adapter/adapter_model.safetensors", "model/model.safetensors"} <= set(run["outputs"])

    merged = load_file(out / "model" / "model.safetensors")  # plain names: loads without peft
    original = load_file(pretrained / "model.safetensors")
    pairs = adapter_pairs(load_file(out / "adapter" / "adapter_model.safetensors"))
    assert set(pairs) == {f"{m}.weight" for m in lora["adapted_modules"]} and merged.keys() == original.keys()
    for name, weight in merged.items():
        if name in pairs:
            a, b = pairs[name]
            assert b.abs().max() > 0  # B starts at zero: training moved it
            torch.testing.assert_close(weight, original[name] + 2.0 * (b @ a), rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(weight, original[name]), name
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    peft_merge = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained), out / "adapter")
    for name, tensor in peft_merge.merge_and_unload().state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_fused_loss_trains_the_adapters_like_the_unfused_one(lm_cache, pretrained, tmp_path):
    fused = train(make_config(lm_cache, pretrained, tmp_path / "fused", checkpoint_every=0))
    plain = train(make_config(lm_cache, pretrained, tmp_path / "plain", checkpoint_every=0, fused_loss=False))
    assert fused.head is not None and plain.head is None
    a, b = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("fused", "plain"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5, msg=name)


def test_an_adapted_lm_head_trains_through_the_unfused_loss_and_run_json_says_why(lm_cache, pretrained, tmp_path):
    out = tmp_path / "head"
    trainer = train(make_config(lm_cache, pretrained, out, lora_targets=["lm_head", "q_proj"], steps=2))
    run = json.loads((out / "run.json").read_text())
    assert trainer.head is None and run["lora"]["head_adapted"]
    assert run["loss_implementation"].startswith("unfused: full student logits (the lm-head is a LoRA target")
    pairs = adapter_pairs(load_file(out / "adapter" / "adapter_model.safetensors"))
    merged, original = load_file(out / "model" / "model.safetensors"), load_file(pretrained / "model.safetensors")
    a, b = pairs["lm_head.weight"]
    torch.testing.assert_close(merged["lm_head.weight"], original["lm_head.weight"] + 2.0 * (b @ a), rtol=0, atol=1e-6)
    assert not torch.equal(merged["lm_head.weight"], original["lm_head.weight"])


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(lm_cache, pretrained, tmp_path):
    grads = []
    for checkpointing in (False, True):
        trainer = Trainer(make_config(lm_cache, pretrained, tmp_path / str(checkpointing),
                                      gradient_checkpointing=checkpointing))
        trainer.setup()
        trainer.loss(next(trainer.batches()), temperature=2.0, alpha=0.5)["loss"].backward()
        grads.append({n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None})
        trainer.close()
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_lora_run_with_bf16_autocast_merges_its_fp32_adapter(lm_cache, pretrained, tmp_path):
    trainer = train(make_config(lm_cache, pretrained, tmp_path / "cuda", device="cuda", checkpoint_every=0))
    assert trainer.head is not None and trainer.device.type == "cuda"  # the fused loss under autocast
    merged = load_file(tmp_path / "cuda" / "model" / "model.safetensors")
    original = load_file(pretrained / "model.safetensors")
    pairs = adapter_pairs(load_file(tmp_path / "cuda" / "adapter" / "adapter_model.safetensors"))
    assert all(a.dtype == torch.float32 and b.abs().max() > 0 for a, b in pairs.values())
    for name, weight in merged.items():
        expected = original[name] + 2.0 * (pairs[name][1] @ pairs[name][0]) if name in pairs else original[name]
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- resume
def test_a_resumed_lora_run_ends_bit_identical_to_the_uninterrupted_one(lm_cache, pretrained, tmp_path):
    train(make_config(lm_cache, pretrained, tmp_path / "full", steps=6))
    train(make_config(lm_cache, pretrained, tmp_path / "cut", steps=6), stop_after=3)  # checkpoint of step 2
    checkpoint = load_file(tmp_path / "cut" / "checkpoint" / "model.safetensors")
    assert checkpoint and all(".lora_A." in n or ".lora_B." in n for n in checkpoint)  # the adapter alone
    train(make_config(lm_cache, pretrained, tmp_path / "cut", steps=6), resume=True)
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


def test_resume_refuses_a_changed_base_and_other_lora_settings(lm_cache, pretrained, tmp_path):
    import shutil

    student = Path(shutil.copytree(pretrained, tmp_path / "student"))
    out = tmp_path / "run"
    flags = ["train-student", "--cache", lm_cache, "--student", student, "--out", out, "--steps", 4,
             "--batch-size", 4, "--checkpoint-every", 2, "--device", "cpu", "--temperature", 2, "--lora-r", 4]
    assert run_cli(*flags).exit_code == 0
    assert json.loads((out / "run.json").read_text())["resolved_settings"]["lora_targets"] == ["all-linear"]
    assert_one_error_line(run_cli("train-student", "--out", out, "--resume", "--steps", 6, "--lora-r", 8),
                          "settings.lora_r (was 4, now 8)")
    weights = load_file(student / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] + 1e-3
    from safetensors.torch import save_file

    save_file(weights, str(student / "model.safetensors"), metadata={"format": "pt"})
    assert_one_error_line(run_cli("train-student", "--out", out, "--resume", "--steps", 6),
                          f"error: --resume refused: the weights in --student {student} differ from those the LoRA "
                          f"adapter of {out} was trained on")


@pytest.mark.slow
def test_a_failed_final_write_leaves_no_half_model_and_the_resume_writes_it(lm_cache, pretrained, tmp_path):
    """Files over 60 kB fail to write (as on a full disk): the adapter-only checkpoints and adapter/ fit, the
    merged model (~160 kB) does not. model/ lands whole or not at all; --resume then writes it."""
    out = tmp_path / "run"
    flags = ["train-student", "--cache", lm_cache, "--student", pretrained, "--out", out, "--steps", 2,
             "--batch-size", 4, "--device", "cpu", "--temperature", 2, "--lora-r", 4, "--eval-every", 0]
    limited = subprocess.run([sys.executable, str(Path(__file__).parent / "file_size_limit.py"), "60000", "all",
                              *map(str, flags)], capture_output=True, text=True, timeout=300)
    assert limited.returncode != 0 and "File too large" in limited.stderr, limited.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("model", "adapter"))) == ["adapter"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    resumed = run_cli("train-student", "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    merged, original = load_file(out / "model" / "model.safetensors"), load_file(pretrained / "model.safetensors")
    pairs = adapter_pairs(load_file(out / "adapter" / "adapter_model.safetensors"))
    for name, (a, b) in pairs.items():
        torch.testing.assert_close(merged[name], original[name] + 2.0 * (b @ a), rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_ddp_and_fsdp_ranks_train_the_adapters_like_one_process_with_the_global_batch(lm_cache, pretrained, tmp_path):
    def flags(out: Path, batch_size: int, *more) -> list[str]:
        return [str(a) for a in ("train-student", "--cache", lm_cache, "--student", pretrained, "--out", out,
                                 "--steps", 3, "--batch-size", batch_size, "--lr", 1e-2, "--seed", 1, "--device", "cpu",
                                 "--eval-fraction", 0, "--temperature", 2, "--lora-r", 4, "--checkpoint-every", 0,
                                 *more)]

    one = run_cli(*flags(tmp_path / "one", 8))
    assert one.exit_code == 0, one.output
    for sharding in ("ddp", "fsdp"):
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              "-m", "kdpipe", *flags(tmp_path / sharding, 4, "--sharding", sharding)],
                             capture_output=True, text=True, timeout=300)
        assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
        assert "on 2 ranks" in two.stdout and two.stdout.count("wrote ") == 1  # rank 0 alone writes
        run = json.loads((tmp_path / sharding / "run.json").read_text())
        assert run["distributed"]["sharding"] == sharding and run["distributed"]["world_size"] == 2
        assert run["lora"] == json.loads((tmp_path / "one" / "run.json").read_text())["lora"]
        for folder, name in (("adapter", "adapter_model.safetensors"), ("model", "model.safetensors")):
            a, b = (load_file(tmp_path / run_dir / folder / name) for run_dir in ("one", sharding))
            assert a.keys() == b.keys()
            for key in a:  # the ranks' averaged adapter gradients = the global batch's
                torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{sharding} {key}")


def test_a_run_from_before_lora_existed_still_resumes(lm_cache, tmp_path):
    """Its run.json records no lora_* settings; a run without --lora-r leaves them out of its identity."""
    from kdpipe.pipeline.train.checkpoint import read_run, write_run_json

    config = tmp_path / "student.json"
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **STUDENT}))
    out = tmp_path / "old"
    train(make_config(lm_cache, config, out, lora_r=None, lora_targets=[], steps=2))
    run = read_run(out)
    for table in ("settings", "resolved_settings"):
        run[table] = {k: v for k, v in run[table].items() if not k.startswith("lora_")}
    write_run_json(out, run)
    assert train(make_config(lm_cache, config, out, lora_r=None, lora_targets=[], steps=4), resume=True).step == 4


# ----------------------------------------------------------------------------- refusals
def test_lora_refusals_are_one_line(lm_cache, pretrained, module_cache, module_teacher, tmp_path):
    config = tmp_path / "student.json"
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **STUDENT}))
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = tmp_path / "tied"  # a student whose lm-head is its input embeddings (tie_word_embeddings)
    LlamaForCausalLM(LlamaConfig(**STUDENT, tie_word_embeddings=True)).save_pretrained(tied)
    base = ["train-student", "--cache", lm_cache, "--steps", 1, "--device", "cpu", "--temperature", 2]
    cases = {
        "random init": ([*base, "--student", config, "--lora-r", 4], "--lora-r needs a pretrained student, but "
                        f"--student {config} holds no weights"),
        "no such module": ([*base, "--student", pretrained, "--lora-r", 4, "--lora-targets", "q_proj,qv_proj"],
                           "--lora-targets qv_proj matches no module of the student; its layers LoRA can adapt: "
                           "embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head "
                           "(or all-linear: every linear layer but the lm-head)"),
        "not a layer": ([*base, "--student", pretrained, "--lora-r", 4, "--lora-targets", "input_layernorm"],
                        "--lora-targets input_layernorm: Target module LlamaRMSNorm((32,), eps=1e-06) is not "
                        "supported; its layers LoRA can adapt: embed_tokens, q_proj"),
        "tied head": ([*base, "--student", tied, "--lora-r", 4, "--lora-targets", "q_proj,lm_head"],
                      "--lora-targets q_proj,lm_head: this student's lm_head and model.embed_tokens share one weight "
                      "(tie_word_embeddings), so an adapter of one cannot merge; leave lm_head and embed_tokens out"),
        "alpha alone": ([*base, "--student", pretrained, "--lora-alpha", 8], "--lora-alpha and --lora-targets need "
                        "--lora-r"),
        "rank 0": ([*base, "--student", pretrained, "--lora-r", 0], "--lora-r 0 must be >= 1"),
        "module student": (["train-student", "--cache", module_cache, "--data", module_teacher["data"], "--steps", 1,
                            "--temperature", 2, "--student", module_teacher["spec"], "--lora-r", 4],
                           f"{module_teacher['spec']} is a module student: drop --lora-r"),
    }
    for case, (args, fragment) in cases.items():
        out = tmp_path / case.replace(" ", "_")
        line = assert_one_error_line(run_cli(*args, "--out", out), fragment)
        assert line.startswith("error: "), (case, line)
        assert not out.exists(), case  # nothing written
