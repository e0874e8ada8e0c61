"""Several processes of one command: started by ``torchrun``, or by a scheduler (``--rank``).

Under ``torchrun`` (its environment holds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``) a process
takes its rank and world size from the environment (:func:`launch_from_env`); a rank or world size
given as well must have the same values. The processes then form a ``torch.distributed`` group
(:func:`process_group`: gloo on CPU, nccl on CUDA). Stage one uses it for barriers only (after every
rank has finished its data blocks, rank 0 alone writes the manifest); a capture process started
without torchrun (a Slurm array task, a Kubernetes job) is on its own and the last rank to finish
writes the manifest.

Tensor parallelism (``cache-teacher --tensor-parallel TP``): the world is cut into ``WORLD_SIZE / TP``
data-parallel groups of ``TP`` consecutive ranks (:func:`data_parallel_rank`); the ranks of a group
run one teacher split over them and see the same data, the groups split the data blocks as ranks do
without tensor parallelism. :class:`Group` then also holds this rank's tensor-parallel process group.

A rank that waits longer than the group's timeout (``DEFAULT_TIMEOUT_MIN`` minutes unless asked
otherwise) for the others, or whose partner process died, stops with a
:class:`~kdpipe.pipeline.errors.DistributedError` at :meth:`Group.barrier`, so an error on one rank
does not hang the others. Training exchanges gradients instead of waiting at barriers: there
:func:`peer_failures` turns the process group's error on the healthy ranks into :class:`PeerStopped`,
which the command reports without an ``error:`` line of its own (the failed rank printed the cause).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Iterator, Mapping

import torch

from kdpipe.pipeline.errors import ConfigError, DistributedError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_MIN = 30.0


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process stands among the capture's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None  # None: not started by torchrun
    local_world_size: int = 1  # processes on this machine (torchrun's --nproc-per-node)

    @property
    def torchrun(self) -> bool:
        return self.local_rank is not None


def launch_from_env(*, rank: int | None = None, world_size: int | None = None,
                    env: Mapping[str, str] | None = None) -> Launch:
    """The launch of this process: torchrun's environment when present, else ``rank`` of
    ``world_size`` (defaults 0 of 1). Under torchrun, a ``rank`` or ``world_size`` given that
    differs from the environment's is a :class:`ConfigError`."""
    env = os.environ if env is None else env
    if not all(name in env for name in TORCHRUN_VARS):
        return Launch(rank=0 if rank is None else rank, world_size=1 if world_size is None else world_size)
    values = {}
    for name in (*TORCHRUN_VARS, "LOCAL_WORLD_SIZE"):
        raw = env.get(name, "1")
        try:
            values[name] = int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not a whole number; start the capture with torchrun, "
                              "or unset RANK, WORLD_SIZE and LOCAL_RANK and pass --rank/--world-size") from None
    for option, given, name in (("--rank", rank, "RANK"), ("--world-size", world_size, "WORLD_SIZE")):
        if given is not None and given != values[name]:
            raise ConfigError(
                f"{option} {given} contradicts {name}={values[name]} set by torchrun; drop --rank and "
                "--world-size under torchrun (it sets both), or start the processes without torchrun"
            )
    if values["LOCAL_RANK"] < 0 or values["LOCAL_WORLD_SIZE"] < 1:
        raise ConfigError(f"LOCAL_RANK={values['LOCAL_RANK']} and LOCAL_WORLD_SIZE={values['LOCAL_WORLD_SIZE']} "
                          "from the environment make no sense; start the capture with torchrun")
    return Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])


def data_parallel_rank(launch: Launch, tensor_parallel: int) -> tuple[int, int]:
    """``(data-parallel rank, data-parallel size)`` of this process when its ``launch`` is cut into
    groups of ``tensor_parallel`` consecutive ranks; ConfigError when the world size does not divide."""
    if tensor_parallel < 1:
        raise ConfigError(f"--tensor-parallel {tensor_parallel} must be 1 (no tensor parallelism) or more")
    if launch.world_size % tensor_parallel:
        raise ConfigError(f"--tensor-parallel {tensor_parallel} does not divide the {launch.world_size} processes "
                          f"(WORLD_SIZE); start a multiple of {tensor_parallel} processes (torchrun --nproc-per-node)")
    return launch.rank // tensor_parallel, launch.world_size // tensor_parallel


class Group:
    """The ``torch.distributed`` group of a torchrun capture; see :func:`process_group`.

    ``rank`` and ``world_size`` are torchrun's (every process); with ``tensor_parallel > 1`` the
    capture's ranks are the data-parallel groups (``capture_rank`` of ``capture_world_size``), and
    ``tp_group`` is the process group of this rank's ``tensor_parallel`` consecutive ranks, whose
    first (``tp_rank == 0``, :attr:`writes`) writes the group's shards."""

    def __init__(self, launch: Launch, device: torch.device, timeout_min: float, tensor_parallel: int = 1):
        self.rank, self.world_size, self.timeout_min = launch.rank, launch.world_size, timeout_min
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.tensor_parallel = tensor_parallel
        self.capture_rank, self.capture_world_size = data_parallel_rank(launch, tensor_parallel)
        self.tp_rank = launch.rank % tensor_parallel
        self.tp_group = None  # made in _start when tensor_parallel > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes(self) -> bool:
        """This process writes its data-parallel group's shards and progress record."""
        return self.tp_rank == 0

    def _start(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            torch.cuda.set_device(self.device)
        try:
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(minutes=self.timeout_min))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(self._message("to join the other ranks", exc)) from None
        if self.tensor_parallel > 1:  # every rank makes every group, in the same order
            for first in range(0, self.world_size, self.tensor_parallel):
                ranks = list(range(first, first + self.tensor_parallel))
                group = dist.new_group(ranks, timeout=datetime.timedelta(minutes=self.timeout_min))
                if self.rank in ranks:
                    self.tp_group = group

    def barrier(self, what: str) -> None:
        """Wait until every rank gets here (``what``: for the error message, e.g. "for the other
        ranks to finish their blocks")."""
        import torch.distributed as dist

        try:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()
        except RuntimeError as exc:
            raise DistributedError(self._message(what, exc)) from None

    def _message(self, what: str, exc: BaseException) -> str:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return (
            f"rank {self.rank} of {self.world_size} gave up waiting {what} ({first}): another rank failed (see its "
            f"error: line) or took longer than the {self.timeout_min:g}-minute timeout; fix that and re-run the same "
            "command to resume"
        )

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def process_group(launch: Launch, device: torch.device, *, timeout_min: float = DEFAULT_TIMEOUT_MIN,
                  tensor_parallel: int = 1) -> Iterator[Group | None]:
    """The group of a torchrun launch (None for a process started on its own), destroyed on exit.

    ``device`` is where this process runs its teacher (nccl for CUDA, else gloo); ``timeout_min``
    bounds every wait for the other ranks (joining, barriers); ``tensor_parallel``: ranks per
    tensor-parallel group (see the module doc)."""
    if not launch.torchrun:
        yield None
        return
    if not timeout_min > 0:
        raise ConfigError(f"timeout {timeout_min:g} minutes must be positive (the default is {DEFAULT_TIMEOUT_MIN:g})")
    group = Group(launch, device, timeout_min, tensor_parallel)
    group._start()
    try:
        yield group
    finally:
        group.close()


class PeerStopped(DistributedError):
    """This rank's exchange with the others failed because another rank stopped (it failed, and said
    why, or was killed) or stopped answering; this rank itself did nothing wrong."""


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the process group failing (gloo or nccl: a peer gone, a timeout), not a bug."""
    dist_error = getattr(torch.distributed, "DistError", None)  # DistBackendError, DistNetworkError, ...
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return any(mark in text for mark in ("gloo/transport", "Connection closed by peer", "Connection reset by peer",
                                         "NCCL", "ProcessGroupGloo", "ProcessGroupNCCL"))


@contextlib.contextmanager
def peer_failures(launch: Launch, what: str) -> Iterator[None]:
    """Turn a process-group failure while ``what`` (e.g. "at step 7") into :class:`PeerStopped`; other
    errors pass unchanged, and a process on its own has no peers."""
    if not launch.torchrun or launch.world_size == 1:
        yield
        return
    try:
        yield
    except RuntimeError as exc:
        if not is_collective_failure(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = first.split("] ", 1)[-1].split(". ")[0][:120]  # without gloo's source location and advice
        raise PeerStopped(f"rank {launch.rank} of {launch.world_size} stopped {what}: another rank failed or stopped "
                          f"answering ({first}); the failed rank's own message says why") from None
