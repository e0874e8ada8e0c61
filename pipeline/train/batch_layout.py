"""The layout of a collated batch's teacher targets: per-row tensors that any loader can split and join.

:class:`~kdpipe.pipeline.train.objective.TargetCollator` hands out the targets of ``B`` cache rows of
``P`` positions as a dict of tensors whose first two dims are ``[B, P]`` (``topk_ids [B, P, k]``,
``kd_mask [B, P]``, ...), and nothing else: the temperature they were made at is a tensor too
(``temperature [B, P]`` float32), so that ``accelerate`` (and the Hugging Face ``Trainer`` on top of it)
can cut a batch into per-process rows, concatenate batches and broadcast them. The losses take the
flat view, :class:`~kdpipe.pipeline.train.targets.TeacherTargets` of ``N = B * P`` positions;
:func:`per_row` and :func:`flat_targets` go from one to the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.train.targets import TeacherTargets

_FIELDS = tuple(f.name for f in dataclasses.fields(TeacherTargets))


def per_row(targets: TeacherTargets, rows: int) -> dict[str, torch.Tensor]:
    """``targets`` (``[N = rows * P, ...]``) as a dict of ``[rows, P, ...]`` tensors, the temperature as a
    ``[rows, P]`` float32 tensor."""
    out = {}
    for name in _FIELDS:
        value = getattr(targets, name)
        if value is None:
            continue
        if name == "temperature":
            value = torch.full(targets.kd_mask.shape, float(value), dtype=torch.float32, device=targets.kd_mask.device)
        out[name] = value.reshape(rows, targets.kd_mask.shape[0] // rows, *value.shape[1:])  # [N, 0] too (k = 0)
    return out


def flat_targets(teacher) -> TeacherTargets:
    """The flat :class:`TeacherTargets` of a collated ``teacher`` dict (per-row ``[B, P, ...]`` tensors, or
    already flat ``[N, ...]``); a :class:`TeacherTargets` is returned as it is."""
    if isinstance(teacher, TeacherTargets):
        return teacher
    if not isinstance(teacher, Mapping) or "kd_mask" not in teacher:
        raise ConfigError(f"the teacher targets are a {type(teacher).__name__} without kd_mask: pass batch['teacher'] "
                          "of a TargetCollator batch (or a TeacherTargets)")
    lead = teacher["kd_mask"].dim()  # 2: [B, P] per row; 1: [N] flat
    flat = {}
    for name in _FIELDS:
        value = teacher.get(name)
        if name == "temperature":
            value = _one_temperature(value)
        elif isinstance(value, torch.Tensor):
            value = value.reshape(teacher["kd_mask"].numel(), *value.shape[lead:])  # [N, 0] too (k = 0)
        flat[name] = value
    return TeacherTargets(**flat)


def _one_temperature(value) -> float | None:
    """The temperature a batch was collated at: a number, or a tensor holding that number everywhere."""
    if value is None or not isinstance(value, torch.Tensor):
        return None if value is None else float(value)
    if value.numel() == 0:
        return None
    first = value.reshape(-1)[0]
    if not bool((value == first).all()):
        raise ConfigError("the batch joins targets made at different temperatures: collate every batch a loss "
                          "sees with one TargetCollator(temperature=...)")
    return float(first)


def one_batch(batch, *, who: str) -> Mapping:
    """The whole batch a collate function received: ``batch`` itself, or the only item of a list of one
    (a DataLoader with ``batch_size=1``, as ``accelerate`` builds it without ``dispatch_batches``).
    Refuses a list of several whole batches and anything that holds no cache rows."""
    fix = (f"build the loader as DataLoader(dataset, batch_size=None, collate_fn={who}(cache, temperature=...)) "
           "(a Hugging Face Trainer: return that loader from get_train_dataloader)")
    if isinstance(batch, (list, tuple)):
        if len(batch) != 1:
            raise ConfigError(f"{who} got a list of {len(batch)} batches: CacheDataset yields whole batches, "
                              f"so its DataLoader must not batch them again; {fix}")
        batch = batch[0]
    if not isinstance(batch, Mapping) or "topk_ids" not in batch:
        keys = ", ".join(sorted(batch)) if isinstance(batch, Mapping) else type(batch).__name__
        raise ConfigError(f"{who} got no cache rows ({keys}): it collates CacheDataset batches unchanged "
                          f"(a Hugging Face Trainer: remove_unused_columns=False); {fix}")
    keys = batch.get("sample_index")
    if isinstance(keys, torch.Tensor) and keys.dim() != 1:  # whole batches stacked by default_collate
        raise ConfigError(f"{who} got {tuple(keys.shape[:-1])} stacked batches of {keys.shape[-1]} rows: "
                          f"CacheDataset yields whole batches, so its DataLoader must not batch them again; {fix}")
    return batch
