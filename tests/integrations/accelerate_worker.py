"""One process of tests/integrations/test_accelerate.py: a kdpipe loader through ``accelerator.prepare``.

Usage: ``accelerate_worker.py CACHE OUT_DIR --dispatch yes|no --loader-batch none|1 --batch-size B``,
started by ``accelerate launch`` (several processes) or plainly (one). Each process writes
``OUT_DIR/rank{r}.json``: its rank and world size, per epoch the ``sample_index`` rows of every batch
it got, whether each batch's targets equal kdpipe's own collated batch for that rank and step
(``CacheDataset(rank=r, world_size=W)``), and the loss on each batch (zero logits: the loss reads the
carried targets).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader

import kdpipe

EPOCHS = 2
TEMPERATURE = 2.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dispatch", choices=["yes", "no"], required=True)
    parser.add_argument("--loader-batch", choices=["none", "1"], required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    args = parser.parse_args()

    config = DataLoaderConfiguration(dispatch_batches=args.dispatch == "yes")
    accelerator = Accelerator(cpu=True, dataloader_config=config)
    rank, world = accelerator.process_index, accelerator.num_processes
    cache = kdpipe.open_cache(args.cache)
    collate = kdpipe.TargetCollator(cache, temperature=TEMPERATURE)
    data = kdpipe.CacheDataset(cache, batch_size=args.batch_size, seed=3, shuffle_window=16, all_ranks=True)
    loader = accelerator.prepare(DataLoader(data, batch_size=None if args.loader_batch == "none" else 1,
                                            collate_fn=collate))
    # kdpipe's own share of this rank, collated alike: what the prepared loader must hand this process
    own = kdpipe.CacheDataset(cache, batch_size=args.batch_size, seed=3, shuffle_window=16, rank=rank, world_size=world)
    loss_fn = kdpipe.DistillationLoss(alpha=0.5, temperature=TEMPERATURE, reduction="sum")
    vocab = int(cache.manifest["capture"]["teacher_vocab_size"])
    record = {"rank": rank, "world_size": world, "len": len(loader), "epochs": []}
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        own.set_epoch(epoch)
        expected = [collate(batch) for batch in DataLoader(own, batch_size=None)]
        steps, same, losses = [], [], []
        for batch in loader:
            steps.append(batch["sample_index"].tolist())
            want = expected[len(steps) - 1] if len(steps) <= len(expected) else None
            same.append(want is not None and _equal(batch, want))
            logits = torch.zeros(*batch["teacher"]["kd_mask"].shape, vocab)  # [B, P, V]
            out = loss_fn(batch["teacher"], logits)
            losses.append([float(out["loss"]), int(out["kd_count"]), int(out["ce_count"])])
        record["epochs"].append({"steps": steps, "same_as_own_rank": same, "expected_steps": len(expected),
                                 "losses": losses})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():  # gloo's threads stopped before exit (else a rare abort at exit)
        torch.distributed.destroy_process_group()


def _equal(got, want) -> bool:
    """Same keys and exactly equal tensors, nested dicts included."""
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(_equal(got[k], want[k]) for k in want)
    return torch.equal(got.cpu(), want)


if __name__ == "__main__":
    main()
