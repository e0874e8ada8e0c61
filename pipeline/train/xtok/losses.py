"""Distillation losses between a teacher and a student with different vocabularies.

Both take, at ``M`` aligned positions (:mod:`.align`), the student's raw logits ``[M, V_s]`` and the
teacher's cached targets there (top-k ids ``[M, k]``, their log-probs at ``T``, the log tail mass
``[M]``), and return ``T**2 * mean over the positions`` like every loss of
:mod:`kdpipe.pipeline.train.losses`.

- :func:`exact_map_loss` (GOLD's first half): the teacher's top-k ids that have a student twin
  (:func:`~.vocab_map.shared_token_map`: the same bytes) keep their bins, paired with the twin's
  student probability; the teacher's unmapped top-k mass plus its tail form one remaining bin, and the
  student's ``1 - (mass on the twins)`` the other side's. Any ``--loss`` divergence applies to these
  bins. With ``k = V_t`` it equals the divergence between the full distributions projected on "one
  bin per shared token + one for the rest" (tested against that dense reference).
- :func:`uld_loss` (Boizard et al. 2024, Universal Logit Distillation): the L1 distance between the two
  probability vectors sorted in decreasing order, the shorter padded with zeros. A cache knows the
  teacher's ``k`` largest probabilities and the sum of the rest, so both sides are cut at rank ``k``:
  ``sum_{i<k} |p_(i) - q_(i)| + |r_T - (1 - sum_{i<k} q_(i))|``, the ranks from ``k`` on as one bin
  each (the student's ``k`` largest of its own vocabulary). By the triangle inequality this is a lower
  bound of the full ULD, and equals it when ``k = V_t`` (the teacher's whole vocabulary; its tail is
  then empty and the student's ranks past ``k`` face zeros).
- :func:`group_loss`: both vocabularies cut into the same groups (:func:`~.vocab_map.prefix_groups`: tokens
  that begin one another; :func:`~.vocab_map.first_byte_groups`: tokens' first bytes), the student's
  probabilities summed over each group, and the exact map's bins and divergence on the groups.
- :func:`cross_tokenizer_loss`: one of ``exact-map``, ``uld``, ``exact-map+uld`` (their sum, as GOLD),
  ``prefix-map`` (the exact map's bins and divergence with a many-to-one map instead, each teacher token
  onto the longest student token its bytes begin with: :func:`~.vocab_map.prefix_token_map`),
  ``prefix-groups`` or ``first-byte`` (:func:`group_loss` on those groups).
"""

from __future__ import annotations

import torch

from kdpipe.pipeline.cache.schema import check_temperature
from kdpipe.pipeline.train.losses import TAIL_LOGPROB_FLOOR, _check_kind, _divergence, _reduce, _scaled_fp32

CROSS_TOKENIZER_LOSSES = ("exact-map", "uld", "exact-map+uld", "prefix-map", "prefix-groups", "first-byte")
GROUP_LOSSES = ("prefix-groups", "first-byte")
_NEG_INF = float("-inf")


def _student_logprobs(student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(_scaled_fp32(student_logits, temperature), dim=-1)


def exact_map_bins(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, teacher_to_student, *,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probs on the ``k + 1`` bins of the exact map, ``[M, k + 1]`` each.

    Bin ``j < k`` is teacher id ``topk_ids[:, j]`` and its student twin (``-inf`` on both sides where it
    has none); bin ``k`` holds the rest on each side. ``teacher_to_student``: int64 ``[V_t]`` (-1: no twin).
    A map that sends several teacher ids to one student id (:func:`~.vocab_map.prefix_token_map`) gives
    that student id one bin, at the first of those top-k slots, holding their summed teacher mass.
    """
    return _bins(_student_logprobs(student_logits, temperature), topk_ids, teacher_topk_logprobs,
                 teacher_tail_logprob, teacher_to_student)


def group_bins(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, teacher_group, student_group, *,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probs on the bins of shared token groups, ``[M, k + 1]`` each
    (:func:`~.vocab_map.prefix_groups`, :func:`~.vocab_map.first_byte_groups`).

    The student's probabilities are summed over each group (``student_group``: int64 ``[V_s]``, -1: in
    none; ids past it in none) and the bins are :func:`exact_map_bins`' with the groups as the student's
    ids: one bin per group among the teacher's top-k ids, holding the teacher's mass on those ids and the
    student's on the whole group; the rest in one bin on each side.
    """
    log_q = _student_logprobs(student_logits, temperature)
    width = log_q.shape[1]
    group = torch.full((width,), -1, dtype=torch.int64, device=log_q.device)
    known = min(width, len(student_group))
    group[:known] = student_group[:known].to(log_q.device)
    count = int(max(int(teacher_group.max()), int(group.max()))) + 1
    column = torch.where(group >= 0, group, count)  # the student's ids in no group: one column of their own
    grouped = log_q.new_zeros(log_q.shape[0], count + 1).index_add_(1, column, log_q.exp())
    log_grouped = grouped.clamp_min(torch.finfo(grouped.dtype).tiny).log()
    return _bins(log_grouped, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, teacher_group)


def _bins(log_q, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, teacher_to_student):
    """:func:`exact_map_bins` from the student's log-probs ``log_q [M, V_s]`` (summing to one)."""
    twin = teacher_to_student.to(topk_ids.device)[topk_ids]  # [M, k]
    mapped = twin >= 0
    same = (twin[:, :, None] == twin[:, None, :]) & mapped[:, None, :] & mapped[:, :, None]  # [M, k, k]
    earlier = torch.ones(twin.shape[1], twin.shape[1], dtype=torch.bool, device=twin.device).tril(-1)
    first = mapped & ~(same & earlier).any(-1)  # the first slot of each student twin in its row
    safe_twin = twin.clamp_min(0)
    q_mapped = log_q.gather(1, safe_twin).masked_fill(~first, _NEG_INF)  # [M, k]
    taken = torch.zeros_like(log_q, dtype=torch.int64).scatter_add_(1, safe_twin, mapped.long()) > 0
    rest = log_q.masked_fill(taken, _NEG_INF)
    with torch.no_grad():
        empty = (rest == _NEG_INF).all(dim=-1, keepdim=True)
    q_rest = torch.logsumexp(rest.masked_fill(empty, 0.0), dim=-1, keepdim=True).masked_fill(empty, _NEG_INF)
    p_top = teacher_topk_logprobs.float()
    p_unmapped = torch.logsumexp(torch.cat([p_top.masked_fill(mapped, _NEG_INF),
                                            teacher_tail_logprob.float()[:, None]], dim=-1), dim=-1, keepdim=True)
    grouped = p_top[:, None, :].expand_as(same).masked_fill(~same, _NEG_INF)  # [M, k, k]: slot j's group
    with torch.no_grad():
        lonely = ~same.any(-1, keepdim=True)
    p_mapped = torch.logsumexp(grouped.masked_fill(lonely, 0.0), dim=-1).masked_fill(~first, _NEG_INF)
    return torch.cat([p_mapped, p_unmapped], dim=-1), torch.cat([q_mapped, q_rest], dim=-1)


def exact_map_loss(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, teacher_to_student, *,
                   temperature, kind="forward-kl", mask=None, skew_lambda=0.1) -> torch.Tensor:
    """The ``kind`` divergence on the exact map's bins (:func:`exact_map_bins`), ``T**2 * mean``.
    Reverse KL floors the teacher's remaining bin at ``log(1e-12)`` as ``sparse_kd_loss`` floors its tail."""
    temperature = check_temperature(temperature)
    _check_kind(kind)
    bins = exact_map_bins(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
                          teacher_to_student, temperature=temperature)
    return _bins_loss(*bins, kind=kind, mask=mask, temperature=temperature, skew_lambda=skew_lambda)


def group_loss(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, teacher_group, student_group, *,
               temperature, kind="forward-kl", mask=None, skew_lambda=0.1) -> torch.Tensor:
    """The ``kind`` divergence on the bins of shared token groups (:func:`group_bins`), ``T**2 * mean``."""
    temperature = check_temperature(temperature)
    _check_kind(kind)
    bins = group_bins(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, teacher_group,
                      student_group, temperature=temperature)
    return _bins_loss(*bins, kind=kind, mask=mask, temperature=temperature, skew_lambda=skew_lambda)


def _bins_loss(log_p, log_q, *, kind, mask, temperature, skew_lambda):
    if kind == "reverse-kl":
        log_p = torch.cat([log_p[:, :-1], log_p[:, -1:].clamp_min(TAIL_LOGPROB_FLOOR)], dim=-1)
    return _reduce(_divergence(log_p, log_q, kind, skew_lambda), mask, temperature)


def uld_distance(student_logits, teacher_topk_logprobs, teacher_tail_logprob, *, temperature: float) -> torch.Tensor:
    """Per position ``[M]``: the sorted-probability L1 distance cut at rank ``k`` (module doc)."""
    k = teacher_topk_logprobs.shape[1]
    p_sorted = teacher_topk_logprobs.float().exp().sort(dim=-1, descending=True).values  # [M, k]
    q = _student_logprobs(student_logits, temperature).exp()
    q_top = q.topk(min(k, q.shape[1]), dim=-1).values  # [M, min(k, V_s)], decreasing
    if q_top.shape[1] < k:  # a student vocabulary smaller than k: zeros at its missing ranks
        q_top = torch.cat([q_top, q_top.new_zeros(q_top.shape[0], k - q_top.shape[1])], dim=-1)
    q_rest = (1.0 - q_top.sum(-1)).clamp_min(0.0)
    p_rest = teacher_tail_logprob.float().exp()
    return (p_sorted - q_top).abs().sum(-1) + (p_rest - q_rest).abs()


def uld_loss(student_logits, teacher_topk_logprobs, teacher_tail_logprob, *, temperature, mask=None) -> torch.Tensor:
    """ULD on cached targets (module doc), ``T**2 * mean`` over the counted positions."""
    temperature = check_temperature(temperature)
    return _reduce(uld_distance(student_logits, teacher_topk_logprobs, teacher_tail_logprob,
                                temperature=temperature), mask, temperature)


def cross_tokenizer_loss(loss: str, student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
                         teacher_to_student, *, temperature, kind="forward-kl", mask=None,
                         student_group=None) -> torch.Tensor:
    """``loss`` in :data:`CROSS_TOKENIZER_LOSSES` at the aligned positions (``mask``: which count).
    ``teacher_to_student``: the exact map; for ``prefix-map`` the prefix map; for ``prefix-groups`` and
    ``first-byte`` the teacher's groups, with the student's in ``student_group``."""
    if loss not in CROSS_TOKENIZER_LOSSES:
        raise ValueError(f"unknown cross-tokenizer loss {loss!r}: use one of {', '.join(CROSS_TOKENIZER_LOSSES)}")
    if loss in GROUP_LOSSES:
        return group_loss(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob, teacher_to_student,
                          student_group, temperature=temperature, kind=kind, mask=mask)
    total = student_logits.new_zeros((), dtype=torch.float32)
    if loss != "uld":
        total = total + exact_map_loss(student_logits, topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
                                       teacher_to_student, temperature=temperature, kind=kind, mask=mask)
    if "uld" in loss:
        total = total + uld_loss(student_logits, teacher_topk_logprobs, teacher_tail_logprob,
                                 temperature=temperature, mask=mask)
    return total
