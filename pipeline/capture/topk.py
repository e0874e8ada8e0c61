"""Turning teacher logits into the cache's sparse, exact, multi-temperature view.

For logits ``z`` of one position: ``S = argtopk(z)`` does not depend on ``T``, so one top-k serves
every temperature as long as each temperature's normaliser is kept (docs/THEORY.md section 2). Per position
we keep the top-k ids, ``z_S - max z`` (so fp16 keeps its precision near the top), and for each
captured ``T``: ``lse_T = log sum_v exp((z_v - max z) / T)`` and the exact log tail mass
``log sum_{v not in S} exp((z_v - max z) / T) - lse_T``, computed from the tail itself rather than
as ``1 - sum p`` so that tiny tails keep their precision.

Two entry points give the same view:

- :func:`sparse_view_of_logits` for materialised logits ``[N, V]``. Per chunk of positions it copies
  the logits once into an fp32 buffer, takes the exact top-k there (through group maxima, see
  :func:`_exact_topk`), overwrites the top-k with ``-inf`` and then makes one pass per temperature
  over what is left, the tail: ``tail_T = log sum_{v not in S} exp(z_v / T)``. The full normaliser
  needs no second pass: ``lse_T = logaddexp(tail_T, logsumexp(z_S / T))`` over the ``k`` kept values.
- :func:`sparse_view_of_hidden` for the last hidden states and the lm-head: the head is computed in
  vocabulary blocks, each block's top-k merged into a running top-k, and everything that is not (or
  no longer) in the running top-k is added, when it is rejected or evicted, to a running per-temperature
  sum of the tail; ``[N, V]`` logits never exist, only ``[rows, block]``.

Both raise ``FloatingPointError`` naming the first position whose logits are NaN or ``+inf``
(or all ``-inf``); with ``check_finite=False`` they mark such positions with a NaN logsumexp
instead and never make the host wait for a GPU, so a caller can copy the results back
asynchronously (pinned buffers, ``non_blocking=True``) and look for NaN in its host copy.
Both work on any device with stock PyTorch ops; on a GPU the per-block work of the head-fused path
(top-k merge and tail sums of one ``[rows, block]`` tile) is the natural place for a fused kernel.
"""

from __future__ import annotations

import dataclasses
import math

import torch

# fp32 working memory per chunk of positions: [chunk, V] * 4 bytes stays under this (twice: the
# buffer and a scratch copy). On CPU a chunk that stays in the caches makes every pass after the first
# cheap (one thread, 2048 x 2048 logits: 41 ms at 4 MB, 69 ms at 16 MB), but each chunk costs a few
# dozen parallel ops, which hurts when other processes oversubscribe the cores (two threads on a
# loaded 2-core machine: 165 ms at 4 MB, 146 ms at 8 MB); GPUs get bigger chunks: fewer kernels.
DEFAULT_CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 1024 * 2**20}
# Vocabulary block of the head-fused path and its fp32 ``[rows, block]`` working memory (one
# buffer and one scratch copy). On CPU (one thread, V = 151,936, H = 128, 512 positions) 32k blocks
# in 16 MB were the fastest (912 ms against 1,094 ms for 16k blocks in 8 MB; the head's matmul alone
# 638 ms); smaller blocks pay more merges and per-op overheads, bigger ones fall out of the caches.
DEFAULT_VOCAB_BLOCK = {"cpu": 32768, "cuda": 32768}
DEFAULT_HEAD_CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 1024 * 2**20}

_NEG_INF = float("-inf")
_LOG2E = 1.0 / math.log(2.0)


@dataclasses.dataclass
class SparseView:
    topk_ids: torch.Tensor  # [N, k] int64, best first
    topk_logits: torch.Tensor  # [N, k] fp32, z_S - max z (<= 0)
    logsumexp: torch.Tensor  # [N, nT] fp32, log sum_v exp((z_v - max z) / T)
    tail_logprob: torch.Tensor  # [N, nT] fp32, log of the mass outside the top-k at T


def _empty_view(top_k: int, temperatures, device) -> SparseView:
    n_t = len(temperatures)
    return SparseView(
        torch.zeros(0, top_k, dtype=torch.int64, device=device), torch.zeros(0, top_k, device=device),
        torch.zeros(0, n_t, device=device), torch.zeros(0, n_t, device=device),
    )


def _raise_non_finite(finite: torch.Tensor, offset: int) -> None:
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0]) + offset
        raise FloatingPointError(f"teacher logits are NaN or infinite at position {bad}")


def _check_top_k(top_k: int, vocab: int) -> None:
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k = {top_k} must be between 1 and the vocabulary size {vocab}")


# ----------------------------------------------------------------------------- exact top-k
def _group_size(vocab: int, top_k: int) -> int:
    """Columns per group for :func:`_exact_topk` (0: a plain ``torch.topk``).

    The work is a top-k over the ``V / g`` group maxima plus one over ``k * g`` candidates;
    ``g = sqrt(V / k)`` balances the two, and ``g <= 16`` keeps the first one on ``torch.topk``'s
    cheaper partial-sort path (measured on CPU at V = 151,936, k = 64, 512 rows, one thread: 47 ms at
    g = 16, 86 ms at g = 49, 111 ms for a plain top-k). Below ``V = 16 k`` a plain top-k is as cheap.
    """
    if vocab < 16 * top_k:
        return 0
    return max(2, min(16, int(math.sqrt(vocab / top_k))))


def _exact_topk(z: torch.Tensor, top_k: int, per_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k values (best first) and column ids of each row of ``z [n, V]`` (unit column stride),
    and each row's max (NaN when the row holds a NaN).

    The first ``G * g`` columns (``G = V // g``) are cut into ``G`` interleaved groups of ``g``
    (column ``c`` in group ``c mod G``); the last ``V - G g < g`` columns are candidates anyway.
    Every member of a row's top-k lies in one of the ``k`` groups with the largest maxima or in those
    last columns (an element of another group is beaten by ``k`` group maxima), so the top-k of
    these ``k g + V - G g`` candidates is the row's top-k, up to the order of ties.
    ``per_group = 0``: a plain ``torch.topk``.
    """
    n, vocab = z.shape
    if per_group == 0:
        values, ids = torch.topk(z, top_k, dim=1, sorted=True)
        return values, ids, values[:, 0]
    groups = vocab // per_group
    group_max = z[:, : groups * per_group].unflatten(1, (per_group, groups)).amax(dim=1)  # [n, G]; NaN propagates
    best_groups = torch.topk(group_max, top_k, dim=1, sorted=False).indices  # [n, k]
    members = torch.arange(0, groups * per_group, groups, device=z.device)  # [g]: the columns of group 0
    cand_ids = (best_groups[:, :, None] + members).reshape(n, -1)  # [n, k*g]
    row_max = group_max.amax(dim=1)
    if groups * per_group < vocab:
        rest = torch.arange(groups * per_group, vocab, device=z.device)
        cand_ids = torch.cat([cand_ids, rest.expand(n, -1)], dim=1)
        row_max = torch.maximum(row_max, z[:, groups * per_group :].amax(dim=1))  # (NaN propagates)
    values, where = torch.topk(z.gather(1, cand_ids), top_k, dim=1, sorted=True)
    return values, cand_ids.gather(1, where), row_max


# ----------------------------------------------------------------------------- tail sums
def _tail_sums(buf: torch.Tensor, temperatures, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, s)`` with ``m = max`` of each row of ``buf`` (the tail: everything else is ``-inf``) and
    ``s[:, j] = sum exp((buf - m) / T_j)`` (fp32, every term <= 1 and the largest = 1, so nothing
    overflows and a far tail does not underflow). Overwrites ``buf`` (shifted) and ``scratch``.
    A row with an empty tail gets ``m = -inf`` and ``s = 0``."""
    tail_max = buf.amax(dim=1)  # [n]
    ref = torch.where(torch.isfinite(tail_max), tail_max, torch.zeros_like(tail_max))
    buf.sub_(ref[:, None])
    sums = torch.empty(buf.shape[0], len(temperatures), dtype=torch.float32, device=buf.device)
    for j, t in enumerate(temperatures):
        # exp(x / T) as exp2(x * log2(e) / T): one rounding more than a division, and on CPU
        # PyTorch's exp2 is several times faster than its exp (measured: 0.3 vs 0.9 ns per value)
        torch.mul(buf, _LOG2E / t, out=scratch)
        scratch.exp2_()
        torch.sum(scratch, dim=1, out=sums[:, j])
    return tail_max, sums


def _merge_tails(tail_max, tail_sum, new_max, new_sum, inv_t):
    """Running tail ``(M [n] f64, S [n, nT] f64)`` plus a part ``(m, s)``, both as in :func:`_tail_sums`."""
    new_max, new_sum = new_max.double(), new_sum.double()
    top = torch.maximum(tail_max, new_max)
    ref = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    tail_sum = tail_sum * torch.exp((tail_max - ref)[:, None] * inv_t) + new_sum * torch.exp((new_max - ref)[:, None] * inv_t)
    return top, tail_sum


def _finish(values, ids, tail_max, tail_sum, temperatures, finite) -> SparseView:
    """The view from the top-k ``values`` (fp32, best first) and the tail ``(max, sum)`` as in
    :func:`_tail_sums`; rows not ``finite`` get a NaN logsumexp. The [n]-sized arithmetic is in fp64."""
    temps = torch.tensor(temperatures, dtype=torch.float64, device=values.device)
    row_max = values[:, :1]
    top = values - row_max  # fp32 z_S - max z, as stored
    head = torch.logsumexp(top.double()[:, :, None] / temps, dim=1)  # [n, nT]
    # log of the tail relative to the row max: (m_tail - max z) / T + log s (-inf for an empty tail)
    shift = tail_max.double() - row_max[:, 0].double()
    tail = torch.where(tail_sum > 0, shift[:, None] / temps + torch.log(tail_sum.double()), float("-inf"))
    lse = torch.logaddexp(head, tail)
    lse = torch.where(finite[:, None], lse, float("nan"))
    return SparseView(ids, top, lse.float(), (tail - lse).float())


# ----------------------------------------------------------------------------- materialised logits
def sparse_view_of_logits(
    logits: torch.Tensor,
    *,
    top_k: int,
    temperatures: tuple[float, ...],
    chunk_bytes: int | None = None,
    check_finite: bool = True,
) -> SparseView:
    """Sparse view of ``logits [N, V]`` (any float dtype), never holding more than one fp32 chunk
    (plus one scratch buffer of the same size). The result is on the logits' device.

    Raises ``FloatingPointError`` naming the first position whose logits are NaN or infinite (or all
    ``-inf``). ``check_finite=False`` skips that check, the only point where the host waits for a
    GPU: such positions get a NaN ``logsumexp`` instead, for the caller to look for in its host copy.
    """
    n, vocab = logits.shape
    _check_top_k(top_k, vocab)
    if n == 0:  # a batch of chat rows whose assistant turns all fall past --seq-len
        return _empty_view(top_k, temperatures, logits.device)
    chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES["cuda" if logits.is_cuda else "cpu"]
    per_group = _group_size(vocab, top_k)
    chunk = max(1, min(n, chunk_bytes // (4 * vocab)))
    buf = torch.empty(chunk, vocab, dtype=torch.float32, device=logits.device)
    scratch = torch.empty(chunk, vocab, dtype=torch.float32, device=logits.device) if top_k < vocab else None
    parts = []
    for start in range(0, n, chunk):
        part = logits[start : start + chunk]
        rows = part.shape[0]
        parts.append(_view_chunk(part, buf[:rows], None if scratch is None else scratch[:rows],
                                 top_k, temperatures, per_group, offset=start, check_finite=check_finite))
    if len(parts) == 1:
        return parts[0]
    return SparseView(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(SparseView)))


def _view_chunk(logits, buf, scratch, top_k, temperatures, per_group, *, offset, check_finite) -> SparseView:
    buf.copy_(logits)  # the one fp32 copy
    values, ids, row_max = _exact_topk(buf, top_k, per_group)
    # NaN anywhere in a row reaches its max; so does +inf. A row of -inf has no distribution.
    finite = torch.isfinite(row_max)
    if check_finite:
        _raise_non_finite(finite, offset)
    if top_k == buf.shape[1]:
        tail_max = torch.full_like(row_max, _NEG_INF)
        tail_sum = torch.zeros(len(values), len(temperatures), device=values.device)
    else:
        buf.scatter_(1, ids, _NEG_INF)  # keep only the tail
        tail_max, tail_sum = _tail_sums(buf, temperatures, scratch)
    return _finish(values, ids, tail_max, tail_sum, temperatures, finite)


def sparse_view_of_logits_reference(
    logits: torch.Tensor, *, top_k: int, temperatures: tuple[float, ...], chunk_bytes: int | None = None,
) -> SparseView:
    """The straightforward two-pass-per-temperature version (logsumexp of everything, then of the
    tail), kept as the reference for tests and ``benchmarks/capture.py``."""
    n, vocab = logits.shape
    chunk_bytes = chunk_bytes or (1024 if logits.is_cuda else 256) * 2**20  # its defaults then
    chunk = max(1, chunk_bytes // (4 * vocab))
    parts = []
    for start in range(0, max(n, 1), chunk):
        z_in = logits[start : start + chunk]
        top_values, topk_ids = torch.topk(z_in, top_k, dim=1, sorted=True)
        top_values = top_values.float()
        z = z_in.float()
        if z is z_in:
            z = z.clone()
        z -= top_values[:, :1]
        lse = torch.stack([torch.logsumexp(z / t, dim=1) for t in temperatures], dim=1)
        finite = torch.isfinite(top_values[:, 0]) & torch.isfinite(lse).all(dim=1)
        _raise_non_finite(finite, start)
        z.scatter_(1, topk_ids, _NEG_INF)
        tail = torch.stack([torch.logsumexp(z / t, dim=1) for t in temperatures], dim=1)
        parts.append(SparseView(topk_ids, top_values - top_values[:, :1], lse, tail - lse))
    return SparseView(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(SparseView)))


# ----------------------------------------------------------------------------- head-fused
@torch.inference_mode()
def sparse_view_of_hidden(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    *,
    top_k: int,
    temperatures: tuple[float, ...],
    vocab_block: int | None = None,
    chunk_bytes: int | None = None,
    check_finite: bool = True,
) -> SparseView:
    """Sparse view of ``logits = hidden @ head_weight.T + head_bias`` without materialising them.

    ``hidden [N, H]`` and ``head_weight [V, H]`` (``head_bias [V]``) in the teacher's dtype: each
    block of logits is computed as the teacher's head computes them (``F.linear`` in that dtype, so
    bf16 logits stay bf16-rounded; fp32 straight into the working buffer), then handled in fp32.
    Vocabulary blocks of ``vocab_block`` ids (at least ``top_k``) are taken in order; positions in
    row chunks whose fp32 ``[rows, block]`` buffer stays under ``chunk_bytes``. Per position the
    state is the running top-k (values, ids) and the running tail ``(max, sum exp((z - max) / T))``
    per temperature, in fp64: a block's values outside its own top-k go to the tail at once, and
    merging the block's top-k into the running one sends the evicted values there too. So the tail
    is summed from the tail values themselves, exactly as :func:`sparse_view_of_logits` does, and the
    result equals it on the same logits up to the order of ties and rounding.

    Raises ``FloatingPointError`` naming the first position whose logits are NaN or infinite (or all
    ``-inf``), unless ``check_finite=False`` (see :func:`sparse_view_of_logits`).
    """
    if hidden.shape[0] == 0:
        _check_top_k(top_k, head_weight.shape[0])
        return _empty_view(top_k, temperatures, hidden.device)
    partial = partial_of_hidden(hidden, head_weight, head_bias, top_k=top_k, temperatures=temperatures,
                                vocab_block=vocab_block, chunk_bytes=chunk_bytes)
    return view_of_partial(partial, temperatures, check_finite=check_finite)


@dataclasses.dataclass
class HeadPartial:
    """The state :func:`sparse_view_of_hidden` keeps per position, in absolute logits (not shifted by
    the max): what a slice of the vocabulary contributes, for combining slices (tensor parallelism)."""

    values: torch.Tensor  # [N, k] fp32, the slice's top-k logits, best first
    ids: torch.Tensor  # [N, k] int64, their ids (in the head's rows)
    tail_max: torch.Tensor  # [N] fp64, the largest logit outside the top-k (-inf: none)
    tail_sum: torch.Tensor  # [N, nT] fp64, sum over the rest of exp((z - tail_max) / T)
    bad: torch.Tensor  # [N] bool, a NaN or +inf logit in the slice


def view_of_partial(partial: HeadPartial, temperatures: tuple[float, ...], *, check_finite: bool = True) -> SparseView:
    """The sparse view of a :class:`HeadPartial` that covers the whole vocabulary."""
    finite = ~partial.bad & torch.isfinite(partial.values[:, 0])  # (a row of -inf has no distribution)
    if check_finite:
        _raise_non_finite(finite, 0)
    return _finish(partial.values, partial.ids, partial.tail_max, partial.tail_sum, temperatures, finite)


@torch.inference_mode()
def partial_of_hidden(
    hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None = None, *,
    top_k: int, temperatures: tuple[float, ...], vocab_block: int | None = None, chunk_bytes: int | None = None,
) -> HeadPartial:
    """The running top-k and tail of :func:`sparse_view_of_hidden` (same arguments), before the view."""
    n, hidden_size = hidden.shape
    vocab = head_weight.shape[0]
    if head_weight.shape[1] != hidden_size:
        raise ValueError(f"head weight {tuple(head_weight.shape)} does not match hidden size {hidden_size}")
    _check_top_k(top_k, vocab)
    device = hidden.device
    kind = "cuda" if hidden.is_cuda else "cpu"
    block = min(vocab, max(top_k, vocab_block or DEFAULT_VOCAB_BLOCK[kind]))
    rows = max(1, min(n, (chunk_bytes or DEFAULT_HEAD_CHUNK_BYTES[kind]) // (4 * block)))
    inv_t = 1.0 / torch.tensor(temperatures, dtype=torch.float64, device=device)
    # fp32 logits go straight from the matmul into the working buffer (F.linear is this addmm);
    # other dtypes are computed in their own dtype, as the teacher's head rounds them, and copied
    direct = head_weight.dtype == torch.float32 and hidden.dtype == torch.float32

    best_values = torch.empty(n, top_k, dtype=torch.float32, device=device)
    best_ids = torch.empty(n, top_k, dtype=torch.int64, device=device)
    tail_max = torch.full((n,), _NEG_INF, dtype=torch.float64, device=device)
    tail_sum = torch.zeros(n, len(temperatures), dtype=torch.float64, device=device)
    bad = torch.zeros(n, dtype=torch.bool, device=device)
    buf = torch.empty(rows * block, dtype=torch.float32, device=device)  # flat: views of any shape
    scratch = torch.empty(rows * block, dtype=torch.float32, device=device)

    for v0 in range(0, vocab, block):  # the first block has at least top_k ids
        v1 = min(vocab, v0 + block)
        cols = v1 - v0
        weight = head_weight[v0:v1]
        bias = None if head_bias is None else head_bias[v0:v1]
        per_group = _group_size(cols, top_k)
        k_block = min(top_k, cols)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            b = buf[: (r1 - r0) * cols].view(r1 - r0, cols)
            if not direct:
                b.copy_(torch.nn.functional.linear(hidden[r0:r1], weight, bias))
            elif bias is None:
                torch.mm(hidden[r0:r1], weight.t(), out=b)
            else:
                torch.addmm(bias, hidden[r0:r1], weight.t(), out=b)
            values, ids, row_max = _exact_topk(b, k_block, per_group)
            bad[r0:r1] |= torch.isnan(row_max) | (row_max == float("inf"))  # a block of -inf is fine
            if k_block < cols:  # the block's values outside its top-k: straight to the tail
                b.scatter_(1, ids, _NEG_INF)
                part_max, part_sum = _tail_sums(b, temperatures, scratch[: b.numel()].view_as(b))
                tail_max[r0:r1], tail_sum[r0:r1] = _merge_tails(tail_max[r0:r1], tail_sum[r0:r1], part_max, part_sum, inv_t)
            ids = ids + v0
            if v0 == 0:
                best_values[r0:r1], best_ids[r0:r1] = values, ids
                continue
            # merge the running top-k with the block's: the k best stay, the evicted go to the tail
            cand = torch.cat([best_values[r0:r1], values], dim=1)
            cand_ids = torch.cat([best_ids[r0:r1], ids], dim=1)
            kept_values, kept = torch.topk(cand, top_k, dim=1, sorted=True)
            best_values[r0:r1], best_ids[r0:r1] = kept_values, cand_ids.gather(1, kept)
            cand.scatter_(1, kept, _NEG_INF)
            part_max, part_sum = _tail_sums(cand, temperatures, torch.empty_like(cand))
            tail_max[r0:r1], tail_sum[r0:r1] = _merge_tails(tail_max[r0:r1], tail_sum[r0:r1], part_max, part_sum, inv_t)
    return HeadPartial(best_values, best_ids, tail_max, tail_sum, bad)
