"""kdpipe.integrations.transformers.DistillationTrainer with the real Hugging Face Trainer (issue 26 items 2, 3).

A chat cache of the shipped demo teacher (24 conversations, assistant tokens only: the rows count very
different numbers of target positions, so a mean per micro-batch is not the mean of a step) trains the
shipped student configuration on CPU. Checked: each epoch is read in CacheDataset's order for that
epoch (a new one each epoch, with 0 and 2 workers); accumulation 2 at batch 2 has the gradient of batch
4 and of DistillationLoss's mean on those rows (to 1e-6), where the mean of the two micro-batch means is
off; a run resumed mid-epoch from a Trainer checkpoint ends with the weights of the uninterrupted run,
bit for bit, having trained on the same rows; kd and ce are logged; misuse is refused in one line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback, TrainingArguments

import kdpipe
from kdpipe.pipeline.errors import ConfigError
from kdpipe.integrations.transformers import DistillationTrainer, position_counts
from kdpipe.stages.cli import main

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("hf_trainer_worker.py")
STUDENT = REPO / "data" / "students" / "lm-student.json"
ROWS, BATCH, SEED = 24, 4, 5
LOSS = dict(alpha=0.7, temperature=2.0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_trainer")
    chats = folder / "chat.jsonl"
    chats.write_text("\n".join((REPO / "data" / "chat" / "train.jsonl").read_text().splitlines()[:ROWS]) + "\n")
    out = folder / "cache"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", str(REPO / "data" / "teacher"), "--data", str(chats), "--out", str(out),
        "--top-k", "8", "--seq-len", "128", "--temperature", "1", "--temperature", "2", "--num-workers", "0"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def student(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(STUDENT))


def training_args(out: Path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=1e-3, seed=SEED,
                    report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1)
    return TrainingArguments(**{**settings, **overrides})


class RecordingTrainer(DistillationTrainer):
    """Records the rows (``sample_index``) of every training micro-batch it computes a loss on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[list[int]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.steps.append(inputs["sample_index"].tolist())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class ReadRecorder:
    """A collate function that records the rows of every batch the loader reads, then collates it."""

    def __init__(self, collate):
        self.collate, self.rows = collate, []

    def __call__(self, batch):
        out = self.collate(batch)
        self.rows.append(out["sample_index"].tolist())
        return out


class GradientsBeforeStep(TrainerCallback):
    """The accumulated gradients the optimizer's first step sees."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def cache_epoch(cache_dir: Path, epoch: int) -> list[list[int]]:
    """The rows of each batch of ``epoch`` as CacheDataset hands them out on its own."""
    data = kdpipe.CacheDataset(cache_dir, batch_size=BATCH, seed=SEED, rank=0, world_size=1)
    data.set_epoch(epoch)
    return [b["sample_index"].tolist() for b in DataLoader(data, batch_size=None)]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_is_read_in_its_own_order(cache_dir, tmp_path, workers):
    model = student()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    args = training_args(tmp_path, num_train_epochs=2, dataloader_num_workers=workers)
    trainer = RecordingTrainer(model=model, args=args, cache=cache_dir, loss=kdpipe.DistillationLoss(**LOSS))
    trainer.train()
    per_epoch = ROWS // BATCH
    epochs = [cache_epoch(cache_dir, 0), cache_epoch(cache_dir, 1)]
    assert epochs[0] != epochs[1]
    assert trainer.steps == epochs[0] + epochs[1]  # epoch 1 in its own order, not epoch 0's again
    assert len(trainer.steps) == trainer.state.global_step == 2 * per_epoch

    # kd and ce logged next to loss; the first line's are the first batch's means under the initial weights
    lines = [line for line in trainer.state.log_history if "loss" in line]
    assert len(lines) == 2 * per_epoch and all({"kd", "ce"} <= set(line) for line in lines)
    cache = kdpipe.open_cache(cache_dir)
    first = kdpipe.CacheDataset(cache, batch_size=BATCH, seed=SEED, rank=0, world_size=1)
    batch = kdpipe.TargetCollator(cache, temperature=2.0)(next(iter(first)))
    model.load_state_dict(initial)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    expected = kdpipe.distillation_loss(batch["teacher"], logits, **LOSS)
    assert lines[0]["kd"] == pytest.approx(expected["kd"].item(), rel=1e-5)
    assert lines[0]["ce"] == pytest.approx(expected["ce"].item(), rel=1e-5)
    assert lines[0]["loss"] == pytest.approx(expected["loss"].item(), rel=1e-5)


def first_step_gradients(cache_dir: Path, out: Path, *, batch: int, accumulation: int) -> dict:
    grads = GradientsBeforeStep()
    args = training_args(out, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         max_steps=1, optim="sgd", max_grad_norm=0.0)
    DistillationTrainer(model=student(), args=args, cache=cache_dir, loss=kdpipe.DistillationLoss(**LOSS),
                        callbacks=[grads]).train()
    return grads.grads


def max_difference(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_accumulation_2_has_the_gradient_of_a_batch_twice_as_large(cache_dir, tmp_path):
    accumulated = first_step_gradients(cache_dir, tmp_path / "a", batch=BATCH // 2, accumulation=2)
    whole = first_step_gradients(cache_dir, tmp_path / "b", batch=BATCH, accumulation=1)
    assert max_difference(accumulated, whole) < 1e-6

    # ... and the gradient of DistillationLoss's mean over those rows, computed directly
    cache = kdpipe.open_cache(cache_dir)
    collate = kdpipe.TargetCollator(cache, temperature=2.0)
    halves = [collate(b) for b in kdpipe.CacheDataset(cache, batch_size=BATCH // 2, seed=SEED, rank=0, world_size=1)]
    rows = collate(next(iter(kdpipe.CacheDataset(cache, batch_size=BATCH, seed=SEED, rank=0, world_size=1))))
    assert sorted(rows["sample_index"].tolist()) == sorted(halves[0]["sample_index"].tolist()
                                                           + halves[1]["sample_index"].tolist())

    def gradients(batches, scale: float) -> dict:
        model = student()
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits
            (kdpipe.distillation_loss(b["teacher"], logits, **LOSS)["loss"] * scale).backward()
        return {name: p.grad for name, p in model.named_parameters()}

    assert max_difference(accumulated, gradients([rows], 1.0)) < 1e-6
    # the two micro-batches count different numbers of positions, so the mean of their means (what a
    # per-batch mean divided by the accumulation steps gives) is another gradient
    assert position_counts(halves[0]["teacher"]).tolist() != position_counts(halves[1]["teacher"]).tolist()
    assert max_difference(accumulated, gradients(halves[:2], 0.5)) > 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_at_accumulation_2_have_the_gradient_of_one_process_batch(cache_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo), batch 1, accumulation 2: the step's 4 rows are one process's batch
    of 4; each process trains on kdpipe's rank share, and the averaged gradient and the logged terms are
    that batch's."""
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(WORKER), str(cache_dir), str(out), "--batch-size", "1",
               "--accumulation", "2", "--seed", str(SEED)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    for record in records:
        own = kdpipe.CacheDataset(cache_dir, batch_size=1, seed=SEED, rank=record["rank"], world_size=2)
        assert record["steps"] == [b["sample_index"].tolist() for b in DataLoader(own, batch_size=None)][:2]
    whole = first_step_gradients(cache_dir, tmp_path / "one", batch=BATCH, accumulation=1)
    assert sorted(i for r in records for step in r["steps"] for i in step) == sorted(cache_epoch(cache_dir, 0)[0])
    assert max_difference(load_file(out / "grads.safetensors"), whole) < 1e-6
    cache = kdpipe.open_cache(cache_dir)
    batch = kdpipe.TargetCollator(cache, temperature=2.0)(
        next(iter(kdpipe.CacheDataset(cache, batch_size=BATCH, seed=SEED, rank=0, world_size=1))))
    with torch.no_grad():
        logits = student()(input_ids=batch["input_ids"]).logits
    expected = kdpipe.distillation_loss(batch["teacher"], logits, **LOSS)
    for term in ("kd", "ce"):  # the log line's terms are the means over both processes' positions
        assert records[0]["log"][term] == pytest.approx(expected[term].item(), rel=1e-5)


def test_a_run_resumed_mid_epoch_ends_with_the_uninterrupted_runs_weights(cache_dir, tmp_path):
    # 6 batches per epoch: the checkpoint at step 8 is batch 2 of epoch 1
    args = training_args(tmp_path, max_steps=10, save_strategy="steps", save_steps=8, warmup_steps=2)
    straight = RecordingTrainer(model=student(), args=args, cache=cache_dir, loss=kdpipe.DistillationLoss(**LOSS))
    straight.train()
    resumed = RecordingTrainer(model=student(seed=1), args=args, cache=cache_dir,
                               loss=kdpipe.DistillationLoss(**LOSS))
    resumed.collate = reads = ReadRecorder(resumed.collate)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert resumed.steps == straight.steps[8:]  # the rest of epoch 1, from its batch 2
    epoch_1 = cache_epoch(cache_dir, 1)
    assert resumed.steps == epoch_1[2:4]
    assert reads.rows[:2] == epoch_1[2:4]  # the batches trained on before the checkpoint are not read again
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, straight.model.state_dict()[name]), name


def test_misuse_is_refused_in_one_line(cache_dir, tmp_path, module_teacher):
    loss = kdpipe.DistillationLoss(**LOSS)
    data = kdpipe.CacheDataset(cache_dir, batch_size=BATCH)
    with pytest.raises(ConfigError, match="train_dataset= has no use"):
        DistillationTrainer(model=student(), args=training_args(tmp_path), cache=cache_dir, loss=loss,
                            train_dataset=data)
    with pytest.raises(ConfigError, match="set dataloader_persistent_workers=False"):
        DistillationTrainer(model=student(), cache=cache_dir, loss=loss, args=training_args(
            tmp_path, dataloader_num_workers=2, dataloader_persistent_workers=True))
    with pytest.raises(ConfigError, match="pass a kdpipe.DistillationLoss"):
        DistillationTrainer(model=student(), args=training_args(tmp_path), cache=cache_dir, loss=torch.nn.MSELoss())
    module_cache = tmp_path / "module-cache"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", module_teacher["spec"], "--weights", str(module_teacher["weights"]),
        "--data", str(module_teacher["data"]), "--out", str(module_cache), "--top-k", "4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with pytest.raises(ConfigError, match="holds no token ids .* trains causal-LM students"):
        DistillationTrainer(model=student(), args=training_args(tmp_path), cache=module_cache, loss=loss)
