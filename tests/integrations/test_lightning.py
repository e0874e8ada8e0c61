"""kdpipe.integrations.lightning with the real PyTorch Lightning on CPU (issue 26, Lightning part).

A tiny Llama student distils from a 24-row cache of the tiny teacher (batches of 4 rows). Checked: each
epoch's rows are exactly ``CacheDataset``'s order for that epoch (0 and 2 DataLoader workers, and after
resuming from a checkpoint), so epoch 2 differs from epoch 1; the loss a step trains on and the logged
``train/kd`` and ``train/ce`` equal kdpipe's ``DistillationLoss`` on the same batch and weights; with two
processes (torchrun, gloo, Lightning's DDP with its default ``use_distributed_sampler=True``) each rank
gets kdpipe's own rank share.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import kdpipe
from kdpipe.pipeline.errors import ConfigError

pl = pytest.importorskip("pytorch_lightning")
from kdpipe.integrations.lightning import KDDataModule, KDLightningModule  # noqa: E402

WORKER = Path(__file__).with_name("lightning_worker.py")
ROWS, BATCH, SEED, TEMPERATURE = 24, 4, 5, 2.0


@pytest.fixture(scope="module")
def cache_dir(capture_small_cache) -> Path:
    return capture_small_cache("lightning", ROWS)


def tiny_student() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def kdpipe_epoch_rows(cache_dir: Path, epoch: int, *, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The rows of each batch of ``epoch`` as kdpipe's own CacheDataset orders them."""
    data = kdpipe.CacheDataset(cache_dir, batch_size=BATCH, seed=SEED, rank=rank, world_size=world_size)
    data.set_epoch(epoch)
    return [batch["sample_index"].tolist() for batch in DataLoader(data, batch_size=None)]


class Recorder(pl.Callback):
    """Per step: the epoch, the batch's rows, kdpipe's DistillationLoss on the batch with the weights the
    step starts from, and the loss the step returned."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with torch.no_grad():
            if "input_ids" in batch:
                logits = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:  # a classifier of a module teacher's inputs
                logits = module.student(batch["inputs"])
            want = kdpipe.DistillationLoss(alpha=0.7, temperature=TEMPERATURE)(batch["teacher"], logits)
        self.steps.append({"epoch": trainer.current_epoch, "rows": batch["sample_index"].tolist(),
                           "want": {k: float(want[k]) for k in ("loss", "kd", "ce")}})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps[-1]["got"] = float(outputs["loss"])

    def rows_of(self, epoch: int) -> list[list[int]]:
        return [step["rows"] for step in self.steps if step["epoch"] == epoch]


def fit(cache_dir: Path, root: Path, *, epochs: int, num_workers: int = 0, resume: str | None = None,
        student: torch.nn.Module | None = None, callbacks=()) -> tuple[Recorder, KDLightningModule]:
    recorder = Recorder()
    module = KDLightningModule(student or tiny_student(), alpha=0.7, temperature=TEMPERATURE, learning_rate=1e-2)
    data = KDDataModule(cache_dir, batch_size=BATCH, temperature=TEMPERATURE, seed=SEED, num_workers=num_workers)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, default_root_dir=root,
                         callbacks=[recorder, *callbacks], logger=pl.loggers.CSVLogger(root, name="logs", version=0),
                         log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return recorder, module


def test_trains_on_kdpipe_loss_and_logs_kd_and_ce(cache_dir, tmp_path):
    student = tiny_student()
    before = [p.detach().clone() for p in student.parameters()]
    recorder, _ = fit(cache_dir, tmp_path, epochs=2, student=student)
    assert len(recorder.steps) == 2 * ROWS // BATCH
    for step in recorder.steps:  # the loss trained on is kdpipe's on the same batch and weights
        assert step["got"] == pytest.approx(step["want"]["loss"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # it trained
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("train/kd_step")]
    assert len(logged) == len(recorder.steps)
    for row, step in zip(logged, recorder.steps):  # KD and CE logged apart, each kdpipe's value
        assert float(row["train/kd_step"]) == pytest.approx(step["want"]["kd"], rel=1e-5)
        assert float(row["train/ce_step"]) == pytest.approx(step["want"]["ce"], rel=1e-5)
        assert float(row["train/loss_step"]) == pytest.approx(step["want"]["loss"], rel=1e-5)
        assert step["want"]["kd"] != pytest.approx(step["want"]["ce"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_epoch_is_kdpipe_order_of_that_epoch(cache_dir, tmp_path, num_workers):
    recorder, _ = fit(cache_dir, tmp_path, epochs=3, num_workers=num_workers)
    for epoch in range(3):
        assert recorder.rows_of(epoch) == kdpipe_epoch_rows(cache_dir, epoch)
    assert recorder.rows_of(1) != recorder.rows_of(0) and recorder.rows_of(2) != recorder.rows_of(1)
    assert sorted(sum(recorder.rows_of(1), [])) == list(range(ROWS))  # an epoch sees every row once


def test_resumed_run_continues_with_the_next_epoch_order(cache_dir, tmp_path):
    fit(cache_dir, tmp_path / "first", epochs=1)
    checkpoint = next((tmp_path / "first").rglob("*.ckpt"))
    recorder, _ = fit(cache_dir, tmp_path / "resumed", epochs=3, resume=str(checkpoint))
    assert [step["epoch"] for step in recorder.steps] == [1] * (ROWS // BATCH) + [2] * (ROWS // BATCH)
    assert recorder.rows_of(1) == kdpipe_epoch_rows(cache_dir, 1)
    assert recorder.rows_of(2) == kdpipe_epoch_rows(cache_dir, 2)


def test_resumed_mid_epoch_continues_the_epoch_to_the_same_weights(cache_dir, tmp_path):
    def every_2_steps(folder):
        return pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)

    whole, whole_module = fit(cache_dir, tmp_path / "whole", epochs=2, callbacks=[every_2_steps(tmp_path / "ck")])
    per_epoch = ROWS // BATCH
    for step in (4, per_epoch, per_epoch + 2):  # 4 batches into epoch 0; its last batch; 2 into epoch 1
        checkpoint = tmp_path / "ck" / f"epoch={(step - 1) // per_epoch}-step={step}.ckpt"
        resumed, module = fit(cache_dir, tmp_path / f"resumed{step}", epochs=2, resume=str(checkpoint),
                              callbacks=[every_2_steps(tmp_path / f"ck{step}")])
        assert [s["rows"] for s in resumed.steps] == [s["rows"] for s in whole.steps][step:]
        for a, b in zip(whole_module.student.parameters(), module.student.parameters()):
            assert torch.equal(a, b)


def test_classifier_on_a_module_teacher_cache(module_teacher, module_cache):
    out = module_cache
    with np.load(module_teacher["data"]) as npz:
        inputs = npz["x"].astype(np.float32) / 255.0
    recorder = Recorder()
    torch.manual_seed(1)
    module = KDLightningModule(module_teacher["build"](), alpha=0.7, temperature=TEMPERATURE)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[recorder], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=KDDataModule(out, batch_size=8, temperature=TEMPERATURE, seed=SEED, inputs=inputs))
    assert len(recorder.steps) == 2 * 40 // 8
    for step in recorder.steps:
        assert step["got"] == pytest.approx(step["want"]["loss"], rel=1e-5)
    data = kdpipe.CacheDataset(out, batch_size=8, seed=SEED, inputs=inputs)
    for epoch in range(2):
        data.set_epoch(epoch)
        assert recorder.rows_of(epoch) == [b["sample_index"].tolist() for b in DataLoader(data, batch_size=None)]


def test_persistent_workers_refused(cache_dir):
    data = kdpipe.CacheDataset(cache_dir, batch_size=BATCH)
    from kdpipe.integrations.lightning import EpochDataLoader

    with pytest.raises(ConfigError, match="persistent_workers=True keeps the first epoch's dataset"):
        EpochDataLoader(data, epoch_of=lambda: 0, num_workers=1, persistent_workers=True)


def test_import_without_lightning_names_the_extra():
    code = ("import sys; sys.modules['pytorch_lightning'] = None\n"
            "import kdpipe\n"  # the library itself imports without Lightning
            "try:\n    import kdpipe.integrations.lightning\n"
            "except ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'kdpipe[lightning]'" in done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_get_kdpipe_rank_shares(cache_dir, tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), str(WORKER), str(cache_dir), str(tmp_path),
            "--batch-size", str(BATCH), "--seed", str(SEED)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert (record["rank"], record["world_size"]) == (rank, 2)
        for epoch in range(2):
            assert record["epochs"][str(epoch)] == kdpipe_epoch_rows(cache_dir, epoch, rank=rank, world_size=2)
    for epoch in range(2):
        shares = [sum(record["epochs"][str(epoch)], []) for record in records]
        assert not set(shares[0]) & set(shares[1])  # disjoint (24 rows, global batch 8: no fill)
        assert sorted(shares[0] + shares[1]) == list(range(ROWS))
    assert records[0]["epochs"]["0"] != records[0]["epochs"]["1"]
