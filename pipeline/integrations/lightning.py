"""Distilling from a kdpipe cache with PyTorch Lightning (``pip install 'kdpipe[lightning]'``).

Two pieces, used together or apart:

- :class:`KDDataModule`: the training batches of a cache. ``train_dataloader()`` is
  ``DataLoader(CacheDataset(...), batch_size=None, collate_fn=TargetCollator(...))`` for this process's
  rank (the Trainer's ``global_rank`` of ``world_size``), and every iteration of it first sets the
  dataset's epoch to the fit loop's: a new order each epoch, the same on every rerun; the loader is
  resumable (its state is in the Trainer's checkpoints), so a run resumed from a checkpoint written
  mid-epoch continues that epoch's order at the next batch. Lightning calls ``set_epoch`` on a loader's
  sampler only, which an ``IterableDataset`` does not have, so without this every epoch would replay
  the first. The dataset is iterable, so Lightning never injects a ``DistributedSampler``
  (``use_distributed_sampler`` does not apply): each rank reads kdpipe's own rank share.
- :class:`KDLightningModule`: a student and :class:`~kdpipe.pipeline.train.objective.DistillationLoss`.
  ``training_step`` returns the loss and logs ``train/loss``, ``train/kd`` and ``train/ce``;
  ``student_logits(batch)`` and ``configure_optimizers`` are the places to override.

Lightning itself is imported here, not by ``import kdpipe``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdpipe.pipeline.cache.reader import TeacherCache, open_cache
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.train.dataset import CacheDataset
from kdpipe.pipeline.train.objective import DistillationLoss, TargetCollator

try:
    import pytorch_lightning as pl
except ImportError as missing:  # tests/integrations/test_lightning.py: test_import_without_lightning_names_the_extra
    raise ImportError("kdpipe's Lightning integration needs PyTorch Lightning: "
                      "pip install 'kdpipe[lightning]' (or pytorch-lightning>=2.4)") from missing


class EpochDataLoader(DataLoader):
    """A DataLoader over a :class:`CacheDataset` (``batch_size=None``) that sets the dataset's epoch to
    ``epoch_of()`` each time an iteration starts, before worker processes copy the dataset.

    It is resumable the way Lightning asks (``state_dict`` / ``load_state_dict``, kept in the Trainer's
    checkpoints): the state is the epoch in progress and ``batches_done()`` of it. The first iteration
    after loading it continues that epoch at the next batch (``set_epoch(epoch, start_batch)``), or starts
    the next epoch when the checkpoint was written after the epoch's last batch: resuming, Lightning
    makes that iterator before its epoch counter has moved on and makes no other for that epoch, so the
    state decides. A run resumed mid-epoch sees the rest of that epoch's order, not its first batches again.
    ``len(loader)`` is a whole epoch's batches (Lightning counts the skipped ones as already fetched).
    """

    def __init__(self, dataset: CacheDataset, *, epoch_of: Callable[[], int],
                 batches_done: Callable[[], int] = lambda: 0, **kwargs):
        if kwargs.get("persistent_workers"):
            raise ConfigError("persistent_workers=True keeps the first epoch's dataset in the workers, so every "
                              "epoch would repeat its order: leave persistent_workers off")
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch_of, self.batches_done = epoch_of, batches_done
        self.epoch = None  # the epoch of the iteration in progress
        self._resume_at: tuple[int, int] | None = None  # (epoch, batch) from load_state_dict

    def __iter__(self):
        self.epoch, start_batch = int(self.epoch_of()), 0
        if self._resume_at is not None:  # the first iteration after a resume: where the checkpoint left off
            self.epoch, start_batch = self._resume_at
            if start_batch >= self.dataset.batches_per_epoch:  # written after the epoch's last batch
                self.epoch, start_batch = self.epoch + 1, 0
            self._resume_at = None
        self.dataset.set_epoch(self.epoch, start_batch)
        return super().__iter__()

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict) -> None:
        if state.get("epoch") is not None:
            self._resume_at = (int(state["epoch"]), int(state["batches_done"]))


class KDDataModule(pl.LightningDataModule):
    """The training batches of a kdpipe cache for a Lightning ``Trainer``.

    ``cache``: a path, URL or open :class:`TeacherCache`; ``batch_size``: rows per batch of each process;
    ``temperature`` and ``kind``: the targets' (build the module's loss with the same); ``rows``: the
    cache rows to train on (default all); ``seed``, ``shuffle``, ``shuffle_window``, ``inputs`` (a module
    teacher's ``.npz`` inputs): as :class:`CacheDataset`; ``num_workers``: DataLoader worker processes.
    """

    def __init__(self, cache: str | os.PathLike | TeacherCache, *, batch_size: int, temperature: float = 1.0,
                 kind: str = "forward-kl", rows: np.ndarray | None = None, seed: int = 0, shuffle: bool = True,
                 shuffle_window: int = 1024, inputs: np.ndarray | None = None, num_workers: int = 0):
        super().__init__()
        self.cache = cache if isinstance(cache, TeacherCache) else open_cache(cache)
        self.collator = TargetCollator(self.cache, temperature=temperature, kind=kind)  # refuses a bad T / kind
        self.batch_size, self.rows, self.inputs, self.num_workers = batch_size, rows, inputs, num_workers
        self.seed, self.shuffle, self.shuffle_window = seed, shuffle, shuffle_window

    def train_dataset(self) -> CacheDataset:
        """This process's share of the cache: the Trainer's rank of its world size (0 of 1 without one)."""
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return CacheDataset(self.cache, batch_size=self.batch_size, rows=self.rows, shuffle=self.shuffle,
                            seed=self.seed, shuffle_window=self.shuffle_window, inputs=self.inputs, rank=rank,
                            world_size=world_size)

    def train_dataloader(self) -> EpochDataLoader:
        return EpochDataLoader(self.train_dataset(), epoch_of=self._current_epoch, batches_done=self._batches_done,
                               collate_fn=self.collator, num_workers=self.num_workers)

    def _current_epoch(self) -> int:
        """The epoch the fit loop is about to run: what Lightning gives samplers' ``set_epoch`` (after a
        resume too, where ``trainer.current_epoch`` still says the checkpoint's epoch when the data is set up)."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0

    def _batches_done(self) -> int:
        """Batches of the epoch in progress that the fit loop has started (a checkpoint is written after a
        batch's step, or at the epoch's end)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer else 0


class KDLightningModule(pl.LightningModule):
    """A student trained on a kdpipe cache: ``loss = alpha * kd + (1 - alpha) * ce``
    (:class:`DistillationLoss` with ``alpha``, ``temperature``, ``kind``, ``skew_lambda``: the same
    ``temperature`` and ``kind`` as the :class:`KDDataModule`), AdamW at ``learning_rate``.

    ``training_step`` logs ``train/loss``, ``train/kd`` and ``train/ce`` (each step and as epoch means;
    per process: ``sync_dist`` is off), and returns the loss; under DDP each process's loss is the mean
    over its rows and DDP averages the gradients, as for any Lightning module. Override
    :meth:`student_logits` for a student that is not called as a Hugging Face model or a plain module,
    and ``configure_optimizers`` for another optimizer or a schedule.
    """

    def __init__(self, student: torch.nn.Module, *, alpha: float = 0.5, temperature: float = 1.0,
                 kind: str = "forward-kl", skew_lambda: float = 0.1, learning_rate: float = 1e-3):
        super().__init__()
        self.student = student
        self.loss_fn = DistillationLoss(alpha=alpha, temperature=temperature, kind=kind, skew_lambda=skew_lambda)
        self.learning_rate = learning_rate

    def student_logits(self, batch: dict) -> torch.Tensor:
        """The student's raw logits for a collated batch: ``[B, P, V]`` for a causal LM (a Hugging Face
        model's ``.logits``), ``[B, V]`` for a classifier of ``inputs``."""
        if "input_ids" in batch:
            kwargs = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
            out = self.student(input_ids=batch["input_ids"], **kwargs)
        else:
            out = self.student(batch["inputs"])
        return out.logits if hasattr(out, "logits") else out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.loss_fn(batch["teacher"], self.student_logits(batch))
        rows = len(batch["sample_index"])
        self.log_dict({f"train/{name}": out[name].detach() for name in ("loss", "kd", "ce")},
                      on_step=True, on_epoch=True, batch_size=rows)
        return out["loss"]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.learning_rate)
