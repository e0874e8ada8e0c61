"""Turning teacher logits into the cache's sparse, exact, multi-temperature view.

For logits ``z`` of one position: ``S = argtopk(z)`` does not depend on ``T``, so one top-k serves
every temperature as long as each temperature's normaliser is kept (KD-NOTES section 2). Per position
we keep the top-k ids, ``z_S - max z`` (so fp16 keeps its precision near the top), and for each
captured ``T``: ``lse_T = log sum_v exp((z_v - max z) / T)`` and the exact log tail mass
``log sum_{v not in S} exp((z_v - max z) / T) - lse_T``, computed from the tail itself rather than
as ``1 - sum p`` so that tiny tails keep their precision.
"""

from __future__ import annotations

import dataclasses

import torch

# fp32 working memory per chunk of positions: [chunk, V] * 4 bytes stays under this. GPUs get
# bigger chunks: fewer, larger kernels (a 16k-token batch at V = 151,936 is 10 GB in fp32).
DEFAULT_CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 1024 * 2**20}


@dataclasses.dataclass
class SparseView:
    topk_ids: torch.Tensor  # [N, k] int64, best first
    topk_logits: torch.Tensor  # [N, k] fp32, z_S - max z (<= 0)
    logsumexp: torch.Tensor  # [N, nT] fp32, log sum_v exp((z_v - max z) / T)
    tail_logprob: torch.Tensor  # [N, nT] fp32, log of the mass outside the top-k at T


def sparse_view_of_logits(
    logits: torch.Tensor,
    *,
    top_k: int,
    temperatures: tuple[float, ...],
    chunk_bytes: int | None = None,
) -> SparseView:
    """Sparse view of ``logits [N, V]`` (any float dtype), never holding more than one fp32 chunk.

    Raises ``FloatingPointError`` naming the first position whose logits are NaN or infinite.
    """
    n, vocab = logits.shape
    chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES["cuda" if logits.is_cuda else "cpu"]
    chunk = max(1, chunk_bytes // (4 * vocab))
    parts = [
        _sparse_view_chunk(logits[start : start + chunk], top_k, temperatures, offset=start)
        for start in range(0, max(n, 1), chunk)  # one empty chunk when no position is a target
    ]
    return SparseView(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(SparseView)))


def _scaled_logsumexp(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.logsumexp(z if temperature == 1.0 else z / temperature, dim=1)


def _sparse_view_chunk(logits, top_k, temperatures, *, offset) -> SparseView:
    # The top-k set needs no fp32 and no temperature: take it on the teacher's own dtype.
    top_values, topk_ids = torch.topk(logits, top_k, dim=1, sorted=True)  # [n, k]
    top_values = top_values.float()
    z = logits.float()  # [n, V] fp32 working copy (a new tensor unless already fp32)
    if z is logits:
        z = z.clone()
    z -= top_values[:, :1]  # shift so the max is 0
    lse = torch.stack([_scaled_logsumexp(z, t) for t in temperatures], dim=1)  # [n, nT]
    # NaN anywhere in a row reaches its logsumexp; +inf reaches its max.
    finite = torch.isfinite(top_values[:, 0]) & torch.isfinite(lse).all(dim=1)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0]) + offset
        raise FloatingPointError(f"teacher logits are NaN or infinite at position {bad}")
    z.scatter_(1, topk_ids, float("-inf"))  # keep only the tail
    tail = torch.stack([_scaled_logsumexp(z, t) for t in temperatures], dim=1)
    return SparseView(topk_ids, top_values - top_values[:, :1], lse, tail - lse)
