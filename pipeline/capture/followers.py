"""The ranks of a tensor-parallel group that write nothing (``tp_rank > 0``, see :mod:`.tensor_parallel`).

They must run exactly the batches their group's writer runs, since every forward of the split teacher
is a collective of the group: :func:`share_progress` sends them the shards and blocks the writer's
progress record kept when the capture (re)started, :class:`FollowerProgress` answers the capture loop's
questions from that, and :class:`DiscardWriter` takes the shards they make and drops them.
"""

from __future__ import annotations

import json

import torch


class FollowerProgress:
    """The progress of a rank that writes nothing (``tp_rank > 0``): the writer's finished shards and
    blocks when the capture started (:func:`share_progress`), so that it runs the same batches."""

    def __init__(self):
        self.record: dict = {"shards": {}, "blocks": {}}
        self.redo: list[str] = []
        self.stale_tmp: list = []

    def start(self, plan) -> None:
        pass

    def is_done(self, shard_name: str) -> bool:
        return shard_name in self.record["shards"]

    def block_done(self, block: int) -> bool:
        return str(block) in self.record["blocks"]

    def finish(self, **_) -> None:
        pass


def share_progress(log, group) -> None:
    """The writer of ``group``'s tensor-parallel ranks sends the shards and blocks its record kept to
    the others (their :class:`FollowerProgress`); every rank of the group calls this after ``log.start``."""
    import torch.distributed as dist

    source = group.rank - group.tp_rank
    if group.writes:
        kept = {"shards": sorted(log.record["shards"]), "blocks": sorted(log.record["blocks"])}
        payload = torch.tensor(list(json.dumps(kept).encode()), dtype=torch.uint8, device=group.device)
        size = torch.tensor([len(payload)], dtype=torch.int64, device=group.device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=group.device)
    dist.broadcast(size, src=source, group=group.tp_group)
    if not group.writes:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=group.device)
    dist.broadcast(payload, src=source, group=group.tp_group)
    if not group.writes:
        kept = json.loads(bytes(payload.cpu().tolist()).decode())
        log.record = {"shards": dict.fromkeys(kept["shards"]), "blocks": dict.fromkeys(kept["blocks"])}


class DiscardWriter:
    """The shard writer of a rank that writes nothing: same calls as run.py's, no effect."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def check(self) -> None:
        pass

    def put_shard(self, *args, **kwargs) -> None:
        pass

    def put_block(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
