"""A Hugging Face ``Trainer`` that trains a causal-LM student from a kdpipe cache.

:class:`DistillationTrainer` is ``transformers.Trainer`` with four joins made right:

- **the loader**: :meth:`~DistillationTrainer.get_train_dataloader` builds ``CacheDataset(..., all_ranks=True)``
  with a :class:`~kdpipe.pipeline.train.objective.TargetCollator` and prepares it with the Trainer's
  ``accelerate`` accelerator, so process ``r`` gets kdpipe rank ``r``'s rows, and the Trainer's
  ``set_epoch(epoch)`` on the prepared loader reaches the dataset: a new order every epoch, the one
  ``CacheDataset.set_epoch(epoch)`` gives;
- **gradient accumulation**: :meth:`~DistillationTrainer.get_batch_samples` counts the KD and CE positions
  of the micro-batches of one optimizer step (summed over processes), and
  :meth:`~DistillationTrainer.compute_loss` divides each term's sum by its count, so accumulation ``n`` at
  batch ``B`` has the gradient of one batch of ``n * B`` rows (the mean over the positions of the whole
  step, KD and CE each over their own positions);
- **logging**: every training log line carries ``kd`` and ``ce``, each the mean over the positions since the
  last log line;
- **resuming**: resumed from a Trainer checkpoint mid-epoch, the epoch continues at the next batch
  (``CacheDataset.set_epoch(epoch, start_batch)``: the batches already trained on are not read again).

The batch size is ``per_device_train_batch_size`` rows per process, the order's seed ``data_seed`` (else
``seed``). The Trainer takes no ``train_dataset`` or ``data_collator``: the rows come from ``cache``.
"""

from __future__ import annotations

import os

import torch
import transformers
from torch.utils.data import DataLoader

from kdpipe.pipeline.cache.reader import TeacherCache, open_cache
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.train.dataset import CacheDataset
from kdpipe.pipeline.train.objective import DistillationLoss, TargetCollator, distillation_loss
from kdpipe.pipeline.train.targets import IGNORE


def position_counts(teacher: dict) -> torch.Tensor:
    """``[kd positions, ce positions]`` (int64) of a collated batch's ``teacher`` targets: the positions the
    KD term averages over and those with a hard label, as ``DistillationLoss`` counts them."""
    kd = teacher["kd_mask"].sum()
    ce = (teacher["ce_mask"] & (teacher["labels"] != IGNORE)).sum()
    return torch.stack([kd, ce]).long()


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose loss is ``loss`` (a :class:`DistillationLoss`: its ``alpha``,
    ``temperature``, ``kind`` and ``skew_lambda``; the reduction is the Trainer's) on the rows of ``cache``
    (a path or URL, or an open :class:`TeacherCache`; ``rows``: the global row numbers to train on, None = all).

    ``shuffle_window`` as in :class:`CacheDataset`. Every other argument is the ``Trainer``'s. ``kd`` and
    ``ce`` are logged next to ``loss``.
    """

    # compute_loss normalises by the counts of the whole optimizer step: the Trainer must not divide again
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *, cache: str | os.PathLike | TeacherCache, loss: DistillationLoss,
                 rows=None, shuffle_window: int = 1024, **kwargs):
        for name in ("train_dataset", "data_collator"):
            if kwargs.get(name) is not None:
                raise ConfigError(f"DistillationTrainer reads its batches from cache=, so {name}= has no use: "
                                  "leave it unset (rows= picks the rows to train on)")
        if not all(hasattr(transformers.Trainer, name) for name in ("loss_is_scaled_for_ga", "get_resumed_dataloader")):
            raise ConfigError(f"DistillationTrainer needs a newer transformers than {transformers.__version__} "
                              "(Trainer.loss_is_scaled_for_ga and get_resumed_dataloader): upgrade transformers")
        if not isinstance(loss, DistillationLoss):
            raise ConfigError(f"loss= is a {type(loss).__name__}: pass a kdpipe.DistillationLoss (alpha, temperature, "
                              "kind)")
        super().__init__(model=model, args=args, **kwargs)
        self.cache = cache if isinstance(cache, TeacherCache) else open_cache(cache)
        if self.cache.schema.input_len is None:
            raise ConfigError("this cache holds no token ids (module teacher): DistillationTrainer trains causal-LM "
                              "students; use train-student or a plain loop (docs/library.md)")
        if self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0:
            raise ConfigError("dataloader_persistent_workers=True keeps the workers' copy of the dataset, so every "
                              "epoch would repeat the first one's order: set dataloader_persistent_workers=False")
        if self.args.n_gpu > 1:
            raise ConfigError(f"this process sees {self.args.n_gpu} GPUs (DataParallel): run one process per GPU "
                              "(torchrun or accelerate launch)")
        self.kd_loss, self.rows, self.shuffle_window = loss, rows, shuffle_window
        self.collate = TargetCollator(self.cache, temperature=loss.temperature, kind=loss.kind)
        self.train_data: _ResumableCacheDataset | None = None
        self._logged_sums: torch.Tensor | None = None  # kd sum, ce sum, kd count, ce count since the last log line

    def get_train_dataloader(self):
        """The cache's loader, every process's share in one stream, prepared by the Trainer's accelerator."""
        args = self.args
        seed = args.seed if args.data_seed is None else args.data_seed
        self.train_data = _ResumableCacheDataset(
            self.cache, batch_size=args.per_device_train_batch_size, rows=self.rows, seed=seed,
            shuffle_window=self.shuffle_window, all_ranks=True, world_size=self.accelerator.num_processes)
        workers = {}
        if args.dataloader_num_workers > 0:
            workers = dict(num_workers=args.dataloader_num_workers, prefetch_factor=args.dataloader_prefetch_factor,
                           multiprocessing_context=args.dataloader_multiprocessing_context)
        # batch_size=1: each item is one whole batch (accelerate needs a number there to split the stream)
        loader = DataLoader(self.train_data, batch_size=1, collate_fn=self.collate,
                            pin_memory=args.dataloader_pin_memory, **workers)
        return self.accelerator.prepare(loader)

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """The epoch from its batch ``num_batches`` on, without reading the batches before it."""
        return _FromBatch(dataloader, self.train_data, num_batches)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The micro-batches of one optimizer step and ``{"kd", "ce"}``: their position counts, summed over
        the processes (``average_tokens_across_devices``, the Trainer's default) or this process's."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.zeros(2, dtype=torch.int64, device=device)
        for batch in batch_samples:
            counts += position_counts(batch["teacher"]).to(device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return batch_samples, {"kd": counts[0], "ce": counts[1]}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``alpha * kd_sum / kd_count + (1 - alpha) * ce_sum / ce_count``, the counts those of the whole
        optimizer step (``num_items_in_batch`` from :meth:`get_batch_samples`) or, without it, of this batch
        (the batch's mean)."""
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        kd_loss = self.kd_loss
        sums = distillation_loss(inputs["teacher"], outputs.logits, alpha=kd_loss.alpha,
                                 temperature=kd_loss.temperature, kind=kd_loss.kind,
                                 skew_lambda=kd_loss.skew_lambda, reduction="sum")
        if model.training:  # kept on the loss's device: no host sync per step
            step_sums = torch.stack([sums[key].detach().double() for key in ("kd", "ce", "kd_count", "ce_count")])
            self._logged_sums = step_sums if self._logged_sums is None else self._logged_sums + step_sums
        if isinstance(num_items_in_batch, dict):
            n_kd, n_ce = num_items_in_batch["kd"], num_items_in_batch["ce"]
        else:
            n_kd, n_ce = sums["kd_count"], sums["ce_count"]
        loss = torch.zeros((), dtype=torch.float32, device=outputs.logits.device)
        if kd_loss.alpha > 0.0:  # a term of weight 0 stays out (0 * inf would be NaN)
            loss = loss + kd_loss.alpha * sums["kd"] / n_kd.clamp_min(1)
        if kd_loss.alpha < 1.0:
            loss = loss + (1.0 - kd_loss.alpha) * sums["ce"] / n_ce.clamp_min(1)
        if isinstance(num_items_in_batch, dict) and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # the processes' gradients are averaged, not summed
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log line, with ``kd`` and ``ce`` (means over the positions since the last line) next to
        a training ``loss``."""
        if "loss" in logs and self._logged_sums is not None:
            sums = self._logged_sums
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            kd, ce, n_kd, n_ce = sums.tolist()
            logs = {**logs, "kd": kd / n_kd if n_kd else float("nan"), "ce": ce / n_ce if n_ce else float("nan")}
            self._logged_sums = None
        super().log(logs, start_time)


class _ResumableCacheDataset(CacheDataset):
    """A CacheDataset that keeps a resumed epoch's start batch: ``accelerate``'s loader calls
    ``set_epoch(epoch)`` itself each time it is iterated, which would start the epoch from batch 0 again."""

    resume_at: tuple[int, int] | None = None  # (epoch, its first batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if self.resume_at is not None and self.resume_at[0] == epoch and start_batch == 0:
            start_batch = self.resume_at[1]
        super().set_epoch(epoch, start_batch)


class _FromBatch:
    """A prepared loader whose next epoch starts at global batch ``start`` (the Trainer's ``set_epoch(epoch)``
    after a resume). Used for the epoch a run resumes in only: the next epoch iterates the loader itself."""

    def __init__(self, loader, dataset: _ResumableCacheDataset, start: int):
        self.loader, self.dataset, self.start = loader, dataset, start

    def set_epoch(self, epoch: int) -> None:
        self.dataset.resume_at = (epoch, self.start)
        self.loader.set_epoch(epoch)  # accelerate's own bookkeeping, and the dataset's epoch

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
