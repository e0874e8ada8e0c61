"""The public library API (kdpipe.*) and the worked examples of docs/library.md, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kdpipe
from kdpipe.stages.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "library.md"


def examples() -> dict[str, str]:
    """The ```python blocks of docs/library.md that follow an ``<!-- example: NAME -->`` marker."""
    found = re.findall(r"<!-- example: ([\w-]+) -->\s*```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return dict(found)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder laid out as the examples expect: a small demo-teacher cache at runs/demo/cache-train
    (48 rows of the training plays, top-16, T = 1 and 2) and the shipped data/ (student config)."""
    folder = tmp_path_factory.mktemp("library")
    (folder / "data").symlink_to(ROOT / "data")
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", str(ROOT / "data" / "teacher"), "--data", str(ROOT / "data" / "shakespeare" / "train"),
        "--out", str(folder / "runs" / "demo" / "cache-train"), "--top-k", "16", "--seq-len", "128",
        "--limit-rows", "48", "--device", "cpu", "--temperature", "1", "--temperature", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return folder


def run_example(name: str, workdir: Path) -> str:
    code = examples()[name]
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"example {name} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_doc_has_the_five_examples():
    assert set(examples()) == {"plain-loop", "hf-trainer", "workers", "accelerate", "lightning"}


def test_plain_loop_example_learns_from_the_cache(workdir):
    out = run_example("plain-loop", workdir)
    kd = [float(x) for x in re.findall(r"kd ([\d.]+)", out)]
    assert len(kd) == 2 and kd[-1] < kd[0], out


def test_hf_trainer_example_brings_the_student_closer_to_the_teacher(workdir):
    out = run_example("hf-trainer", workdir)
    before, after = map(float, re.search(r"KL to the teacher: ([\d.]+) before, ([\d.]+) after", out).groups())
    assert after < 0.9 * before, out


def test_two_workers_example_sees_every_row_once(workdir):
    out = run_example("workers", workdir)
    rows, distinct, total = map(int, re.search(r"(\d+) rows, (\d+) distinct, of (\d+)", out).groups())
    assert rows == distinct == total == 48, out


def test_accelerate_example_trains_from_the_prepared_loader(workdir):
    out = run_example("accelerate", workdir)
    epochs = re.findall(r"epoch \d: (\d+) steps, kd ([\d.]+) ce ([\d.]+)", out)
    assert [int(steps) for steps, _, _ in epochs] == [6, 6], out  # 48 rows, 8 a step, one process
    kd = [float(value) for _, value, _ in epochs]
    assert kd[-1] < kd[0] and all(float(ce) > 0 for _, _, ce in epochs), out


def test_lightning_example_trains_from_the_data_module(workdir):
    out = run_example("lightning", workdir)
    kd = [float(value) for value in re.findall(r"epoch \d: kd ([\d.]+) ce [\d.]+", out)]
    assert len(kd) == 2 and kd[-1] < kd[0], out


def test_public_names_are_exactly_the_documented_ones():
    documented = set(re.findall(r"^\| `kdpipe\.(\w+)", DOC.read_text(), flags=re.M))
    assert set(kdpipe.__all__) == documented | {"__version__"}
    for name in kdpipe.__all__:
        assert getattr(kdpipe, name) is not None
    assert kdpipe.__version__ == __import__("importlib.metadata").metadata.version("kdpipe")


def test_fused_head_and_logits_give_the_same_loss_through_the_public_api(workdir):
    from transformers import AutoConfig, AutoModelForCausalLM

    cache = kdpipe.open_cache(workdir / "runs" / "demo" / "cache-train")
    batch = kdpipe.TargetCollator(cache, temperature=2.0, kind="js")(
        next(iter(kdpipe.CacheDataset(cache, batch_size=4, shuffle=False))))
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "data" / "students" / "lm-student.json"))
    loss_fn = kdpipe.DistillationLoss(alpha=0.7, temperature=2.0, kind="js")
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    unfused = loss_fn(batch["teacher"], out.logits)
    weight, bias = kdpipe.output_head(student)
    fused = loss_fn(batch["teacher"], hidden=out.hidden_states[-1], head_weight=weight, head_bias=bias)
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(fused[key], unfused[key], rtol=1e-5, atol=1e-6)
    (g_unfused,) = torch.autograd.grad(unfused["loss"], weight, retain_graph=True)
    (g_fused,) = torch.autograd.grad(fused["loss"], weight)
    torch.testing.assert_close(g_fused, g_unfused, rtol=1e-4, atol=1e-6)


def test_collator_refuses_an_uncaptured_temperature_and_a_mismatched_loss(workdir):
    cache = kdpipe.open_cache(workdir / "runs" / "demo" / "cache-train")
    with pytest.raises(Exception, match="temperature 3 was not captured"):
        kdpipe.TargetCollator(cache, temperature=3.0)
    batch = kdpipe.TargetCollator(cache, temperature=2.0)(next(iter(kdpipe.CacheDataset(cache, batch_size=2))))
    with pytest.raises(ValueError, match="the targets are at T=2 but temperature=1"):
        kdpipe.distillation_loss(batch["teacher"], torch.zeros(2 * 128, 2048), alpha=0.5, temperature=1.0)


def _gpt2_student(vocab: int):
    """A tiny random GPT-2-shaped student (its body is ``student.transformer``) with ``vocab`` output rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)).eval()


def test_vocabulary_policy_through_the_public_api(workdir):
    """Issue 26 item 4 on the demo teacher (2,048 logits): a 2,112-row student gets the loss of its first
    2,048 columns, fused (through body_and_head) and unfused; a 2,000-row student is refused in one line."""
    cache = kdpipe.open_cache(workdir / "runs" / "demo" / "cache-train")
    assert cache.manifest["capture"]["teacher_vocab_size"] == 2048
    batch = kdpipe.TargetCollator(cache, temperature=2.0)(next(iter(kdpipe.CacheDataset(cache, batch_size=2,
                                                                                          shuffle=False))))
    loss_fn = kdpipe.DistillationLoss(alpha=0.5, temperature=2.0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    padded = _gpt2_student(2112)
    body, weight, bias = kdpipe.body_and_head(padded)
    hidden = body(**inputs).last_hidden_state
    logits = torch.nn.functional.linear(hidden, weight, bias)  # [B, P, 2112]
    cut = loss_fn(batch["teacher"], logits[..., :2048])  # the student restricted to the teacher's vocabulary
    for out in (loss_fn(batch["teacher"], logits), loss_fn(batch["teacher"], hidden=hidden, head_weight=weight,
                                                            head_bias=bias)):
        for key in ("loss", "kd", "ce"):
            torch.testing.assert_close(out[key], cut[key], rtol=1e-5, atol=1e-6)
    small = _gpt2_student(2000)
    from kdpipe.pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        loss_fn(batch["teacher"], small(**inputs).logits)
    assert re.fullmatch(r"the student's vocabulary \(2000\) does not cover the 2048 ids of the teacher's vocabulary; "
                        r"give the student a vocab_size \(or num_labels\) of at least that", str(refused.value))


def test_read_returns_what_the_collator_trains_on(workdir):
    """Issue 26 item 7: ``cache.read(i, temperature=T)`` gives the collator's (renormalised) targets."""
    cache = kdpipe.open_cache(workdir / "runs" / "demo" / "cache-train")
    assert cache.schema.value_dtype == "quantized"
    rows = next(iter(kdpipe.CacheDataset(cache, batch_size=3, shuffle=False)))
    teacher = kdpipe.TargetCollator(cache, temperature=2.0)(rows)["teacher"]
    positions = cache.schema.positions
    logprobs = teacher["topk_logprobs"].reshape(3, positions, -1)
    for b, key in enumerate(rows["sample_index"].tolist()):
        i = next(i for i in range(len(cache)) if int(cache.read_raw(i)["sample_index"]) == key)
        read = cache.read(i, temperature=2.0)
        torch.testing.assert_close(torch.from_numpy(read["topk_logprobs"]), logprobs[b], rtol=0, atol=2e-6)
        stored = torch.from_numpy(cache.read_stored(i, temperature=2.0)["topk_logprobs"])
        assert (stored - logprobs[b]).abs().max() > 1e-4  # the stored values are not what training uses
