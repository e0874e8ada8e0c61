"""One process of tests/integrations/test_lightning.py's DDP test, started by torchrun.

Usage: ``lightning_worker.py CACHE OUT_DIR --batch-size B --seed S``. A Lightning ``Trainer`` (CPU,
2 devices, DDP over gloo, ``use_distributed_sampler`` left at its default True) trains a tiny student
with ``KDDataModule`` and ``KDLightningModule`` for two epochs; each process writes ``OUT_DIR/rank{r}.json``:
its rank, world size and, per epoch, the ``sample_index`` rows of every batch it trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdpipe.integrations.lightning import KDDataModule, KDLightningModule


class RowsSeen(pl.Callback):
    def __init__(self):
        self.epochs: dict[str, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.epochs.setdefault(str(trainer.current_epoch), []).append(batch["sample_index"].tolist())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    seen = RowsSeen()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[seen], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(KDLightningModule(student, alpha=0.7, temperature=2.0),
                datamodule=KDDataModule(args.cache, batch_size=args.batch_size, temperature=2.0, seed=args.seed))
    record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "epochs": seen.epochs}
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
