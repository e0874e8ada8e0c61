"""An FSDP student's shards in and out of ``torch.distributed.checkpoint`` (DCP), and the waits between ranks.

:func:`save_shards` writes, on every rank, that rank's shards of the model and of the optimizer state
(``get_state_dict``: DTensors, never gathered) into one DCP folder; :func:`load_shards` reads them back
into a model sharded the same way (``set_state_dict``). The folder's layout, hashes and rotation are
:mod:`kdpipe.pipeline.train.checkpoint_files`'s.

DCP records its ``.metadata`` as a pickle. :func:`load_shards` reads it with :class:`_MetadataUnpickler`,
which builds only the classes DCP's metadata is made of (and refuses anything else), so a checkpoint
folder cannot run code when it is loaded; the tensor files hold raw bytes, and the few non-tensor
values (the optimizer's hyperparameters) are read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kdpipe.pipeline.distributed import PeerStopped
from kdpipe.pipeline.errors import IntegrityError

# (module, name) pairs a DCP .metadata pickle may name (torch 2.x); dtypes are checked apart.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "ChunkStorageMetadata", "MetadataIndex", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
      ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
      ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


def save_shards(folder: Path, root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Write this rank's shards of ``root`` (an FSDP root) and ``optimizer`` into the DCP ``folder``
    (every rank calls it; it returns once all ranks' files and ``.metadata`` are written); the world size."""
    model_state, optimizer_state = get_state_dict(root, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    except CheckpointException as failed:  # a BaseException holding each failed rank's exception
        raise _failure(failed, "while writing its checkpoint shards") from None
    return dist.get_world_size()


def load_shards(folder: Path, root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load this rank's shards from the DCP ``folder`` into ``root`` and ``optimizer`` (every rank calls it)."""
    model_state, optimizer_state = get_state_dict(root, optimizer)  # the sharded templates DCP fills in
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, storage_reader=_SafeReader(folder))
    except CheckpointException as failed:
        raise _failure(failed, "while reading its checkpoint shards") from None
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def wait_for_ranks() -> None:
    """Every rank waits here for the others."""
    dist.barrier()


def gather_to_rank_0(value: dict) -> list[dict] | None:
    """Each rank's ``value`` (JSON-like), in rank order, on rank 0; None on the others."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def _failure(failed: CheckpointException, what: str) -> BaseException:
    """What this rank raises when DCP failed: its own exception (an ``OSError`` of a full disk, say,
    which the caller turns into a one-line error), or, where another rank failed alone,
    :class:`PeerStopped` (that rank prints the error)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if rank in failed.failures:
        return failed.failures[rank][0]
    ranks = ", ".join(str(r) for r in sorted(failed.failures))
    return PeerStopped(f"rank {rank} of {world_size} stopped {what}: rank {ranks} failed; "
                       "the failed rank's own message says why")


class _SafeReader(FileSystemReader):
    """DCP's file reader whose ``.metadata`` goes through :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_CLASSES or is_dtype:
            return super().find_class(module, name)
        raise IntegrityError(f"--resume refused: the checkpoint's DCP .metadata names {module}.{name}, which DCP's "
                             "metadata never holds (edited or not a kdpipe checkpoint); start a new run")
