"""Cross-tokenizer losses (pipeline/train/xtok/losses.py) against dense references computed here."""

import math

import numpy as np
import pytest
import torch

from kdpipe.pipeline.train.xtok.losses import cross_tokenizer_loss, exact_map_loss, uld_loss

V_T, V_S, M = 12, 9, 5


def _case(seed: int, k: int, temperature: float):
    """Random teacher/student logits and a one-to-one partial map of teacher ids onto student ids."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(M, V_T, generator=g, dtype=torch.float64) * 2
    student = (torch.randn(M, V_S, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher_ids = torch.randperm(V_T, generator=g)[:6]
    student_ids = torch.randperm(V_S, generator=g)[:6]
    mapping = torch.full((V_T,), -1, dtype=torch.int64)
    mapping[teacher_ids] = student_ids
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    top = log_p.topk(k, dim=-1)
    if k < V_T:
        tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-15))
    else:
        tail = torch.full((M,), -math.inf, dtype=torch.float64)
    return teacher, student, mapping, top.indices, top.values, tail


def _dense_divergence(p: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    """Per row, written from the definitions (0 log 0 = 0)."""
    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)
    if kind == "forward-kl":
        return kl(p, q)
    if kind == "reverse-kl":
        return kl(q, p)
    if kind == "js":
        m = (p + q) / 2
        return (kl(p, m) + kl(q, m)) / 2
    return (p - q).abs().sum(-1) / 2  # tvd


def _projected(teacher, student, mapping, temperature):
    """Full distributions projected on one bin per shared student id + one bin for everything else."""
    p = torch.softmax(teacher / temperature, dim=-1)
    q = torch.softmax(student / temperature, dim=-1)
    to_teacher_bins = torch.zeros(V_T, V_S + 1, dtype=torch.float64)
    for i in range(V_T):
        to_teacher_bins[i, mapping[i] if mapping[i] >= 0 else V_S] = 1
    image = set(mapping[mapping >= 0].tolist())
    to_student_bins = torch.zeros(V_S, V_S + 1, dtype=torch.float64)
    for j in range(V_S):
        to_student_bins[j, j if j in image else V_S] = 1
    return p @ to_teacher_bins, q @ to_student_bins


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "js", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_exact_map_at_full_k_equals_the_dense_projected_divergence(kind, temperature):
    teacher, student, mapping, ids, logprobs, tail = _case(0, V_T, temperature)
    got = exact_map_loss(student, ids, logprobs, tail, mapping, temperature=temperature, kind=kind)
    p_bins, q_bins = _projected(teacher, student, mapping, temperature)
    want = temperature ** 2 * _dense_divergence(p_bins, q_bins, kind).mean()
    assert torch.allclose(got.double(), want, atol=1e-6), (got, want)
    grad_got = torch.autograd.grad(got, student)[0]
    grad_want = torch.autograd.grad(want, student)[0]
    assert torch.allclose(grad_got.double(), grad_want, atol=1e-6)


def test_exact_map_with_a_top_k_equals_a_per_row_brute_force():
    temperature, k = 1.5, 4
    teacher, student, mapping, ids, logprobs, tail = _case(1, k, temperature)
    mask = torch.tensor([True, False, True, True, True])
    got = exact_map_loss(student, ids, logprobs, tail, mapping, temperature=temperature, mask=mask)
    q = torch.softmax(student / temperature, dim=-1)
    total = 0.0
    for row in range(M):
        if not mask[row]:
            continue
        p_bins, q_bins, p_rest, q_used = [], [], tail[row].exp().item(), 0.0
        for j in range(k):
            teacher_id, p = int(ids[row, j]), logprobs[row, j].exp()
            if mapping[teacher_id] >= 0:
                p_bins.append(p)
                q_bins.append(q[row, mapping[teacher_id]])
                q_used = q_used + q[row, mapping[teacher_id]]
            else:
                p_rest += p.item()
        p_all = torch.stack(p_bins + [torch.tensor(p_rest, dtype=torch.float64)])
        q_all = torch.stack(q_bins + [1 - q_used])
        total = total + (p_all * (p_all.log() - q_all.log())).sum()
    want = temperature ** 2 * total / int(mask.sum())
    assert torch.allclose(got.double(), want, atol=1e-6)
    _assert_same_gradient(got, want, student)


@pytest.mark.parametrize("k", [V_T, 5])
def test_a_many_to_one_map_sums_the_teacher_mass_of_each_student_id(k):
    """A prefix map sends several teacher ids to one student id: at k = V_t the dense projection again;
    at a smaller k, the per-row brute force where each student id's bin holds its top-k teachers' mass."""
    teacher, student, _, ids, logprobs, tail = _case(6, k, 1.0)
    mapping = torch.tensor([0, 0, 1, 1, 1, 2, -1, 3, 3, -1, 4, 0], dtype=torch.int64)  # V_T = 12 onto 5 ids
    got = exact_map_loss(student, ids, logprobs, tail, mapping, temperature=1.0)
    if k == V_T:
        p_bins, q_bins = _projected(teacher, student, mapping, 1.0)
        want = _dense_divergence(p_bins, q_bins, "forward-kl").mean()
    else:
        q, total = torch.softmax(student, dim=-1), 0.0
        for row in range(M):
            groups: dict[int, torch.Tensor] = {}
            rest = tail[row].exp()
            for j in range(k):
                twin = int(mapping[ids[row, j]])
                if twin < 0:
                    rest = rest + logprobs[row, j].exp()
                else:
                    groups[twin] = groups.get(twin, 0.0) + logprobs[row, j].exp()
            p_all = torch.stack([*groups.values(), rest])
            q_all = torch.stack([*(q[row, s] for s in groups), 1 - sum(q[row, s] for s in groups)])
            total = total + (p_all * (p_all.log() - q_all.log())).sum()
        want = total / M
    assert torch.allclose(got.double(), want, atol=1e-6), (got, want)
    _assert_same_gradient(got, want, student)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_uld_at_full_k_equals_the_l1_distance_of_the_sorted_full_vectors(temperature):
    teacher, student, mapping, ids, logprobs, tail = _case(2, V_T, temperature)
    got = uld_loss(student, logprobs, tail, temperature=temperature)
    p = torch.softmax(teacher / temperature, dim=-1).sort(dim=-1, descending=True).values
    q = torch.softmax(student / temperature, dim=-1).sort(dim=-1, descending=True).values
    q = torch.cat([q, q.new_zeros(M, V_T - V_S)], dim=-1)  # the shorter vector padded with zeros
    want = temperature ** 2 * (p - q).abs().sum(-1).mean()
    assert torch.allclose(got.double(), want, atol=1e-6)
    _assert_same_gradient(got, want, student)


def _assert_same_gradient(got, want, student):
    grad_got, grad_want = torch.autograd.grad(got, student)[0], torch.autograd.grad(want, student)[0]
    assert torch.allclose(grad_got.double(), grad_want, atol=1e-6)


def test_uld_with_a_top_k_is_the_rank_k_cut_and_a_lower_bound_of_the_full_distance():
    temperature, k = 1.0, 3
    teacher, student, mapping, ids, logprobs, tail = _case(3, k, temperature)
    got = uld_loss(student, logprobs, tail, temperature=temperature)
    p = torch.softmax(teacher, dim=-1).sort(dim=-1, descending=True).values
    q = torch.softmax(student, dim=-1).sort(dim=-1, descending=True).values
    cut = (p[:, :k] - q[:, :k]).abs().sum(-1) + (p[:, k:].sum(-1) - q[:, k:].sum(-1)).abs()
    assert torch.allclose(got.double(), cut.mean(), atol=1e-6)
    full = (p - torch.cat([q, q.new_zeros(M, V_T - V_S)], dim=-1)).abs().sum(-1).mean()
    assert got.item() <= full.item() + 1e-9


def test_the_sum_is_both_terms_and_an_unknown_loss_is_refused():
    teacher, student, mapping, ids, logprobs, tail = _case(4, 5, 1.0)
    both = cross_tokenizer_loss("exact-map+uld", student, ids, logprobs, tail, mapping, temperature=1.0)
    one = cross_tokenizer_loss("exact-map", student, ids, logprobs, tail, mapping, temperature=1.0)
    other = cross_tokenizer_loss("uld", student, ids, logprobs, tail, mapping, temperature=1.0)
    assert torch.allclose(both, one + other)
    with pytest.raises(ValueError, match="unknown cross-tokenizer loss 'gold'"):
        cross_tokenizer_loss("gold", student, ids, logprobs, tail, mapping, temperature=1.0)


def test_a_row_without_any_mapped_id_puts_everything_in_the_remaining_bins():
    teacher, student, _, ids, logprobs, tail = _case(5, 4, 1.0)
    nothing = torch.full((V_T,), -1, dtype=torch.int64)
    got = exact_map_loss(student, ids, logprobs, tail, nothing, temperature=1.0)
    assert abs(got.item()) < 1e-6  # one bin of mass 1 on each side
    assert np.isfinite(torch.autograd.grad(got, student)[0].numpy()).all()


def _groups(seed: int):
    """Random groups of both vocabularies (-1: an id in no group), every group with a student id."""
    g = torch.Generator().manual_seed(seed)
    student_group = torch.tensor([0, 1, 2, 3, 0, 1, 4, -1, 2], dtype=torch.int64)  # V_S = 9, groups 0..4
    teacher_group = torch.randint(0, 5, (V_T,), generator=g)
    teacher_group[torch.randperm(V_T, generator=g)[:2]] = -1
    teacher_group[torch.randperm(V_T, generator=g)[:2]] = 4  # the ungrouped and group 4 also among the teacher's
    return teacher_group, student_group


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "js", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_group_loss_at_full_k_equals_the_divergence_of_the_dense_group_masses(kind, temperature):
    """At k = V_t: one bin per group the teacher has ids in (its mass on them / the student's on the whole
    group), one for the rest on each side (ids in no group, groups only the student has)."""
    teacher, student, _, ids, logprobs, tail = _case(7, V_T, temperature)
    teacher_group, student_group = _groups(7)
    got = cross_tokenizer_loss("prefix-groups", student, ids, logprobs, tail, teacher_group, temperature=temperature,
                               kind=kind, student_group=student_group)
    p = torch.softmax(teacher / temperature, dim=-1)
    q = torch.softmax(student / temperature, dim=-1)
    present = sorted(set(teacher_group[teacher_group >= 0].tolist()))
    p_bins = torch.stack([p[:, teacher_group == c].sum(-1) for c in present] + [p[:, teacher_group < 0].sum(-1)], -1)
    q_groups = [q[:, student_group == c].sum(-1) for c in present]
    q_bins = torch.stack(q_groups + [1 - sum(q_groups)], -1)
    want = temperature ** 2 * _dense_divergence(p_bins, q_bins, kind).mean()
    assert torch.allclose(got.double(), want, atol=1e-6), (got, want)
    _assert_same_gradient(got, want, student)


def test_group_loss_with_a_top_k_equals_a_per_row_brute_force():
    temperature, k = 1.0, 4
    teacher, student, _, ids, logprobs, tail = _case(8, k, temperature)
    teacher_group, student_group = _groups(8)
    mask = torch.tensor([True, True, False, True, True])
    got = cross_tokenizer_loss("first-byte", student, ids, logprobs, tail, teacher_group, temperature=temperature,
                               mask=mask, student_group=student_group)
    q, total = torch.softmax(student, dim=-1), 0.0
    for row in range(M):
        if not mask[row]:
            continue
        groups: dict[int, torch.Tensor] = {}
        rest = tail[row].exp()
        for j in range(k):
            group = int(teacher_group[ids[row, j]])
            if group < 0:
                rest = rest + logprobs[row, j].exp()
            else:
                groups[group] = groups.get(group, 0.0) + logprobs[row, j].exp()
        q_groups = [q[row, student_group == c].sum() for c in groups]
        p_all = torch.stack([*groups.values(), rest])
        q_all = torch.stack([*q_groups, 1 - sum(q_groups)])
        total = total + (p_all * (p_all.log() - q_all.log())).sum()
    want = total / int(mask.sum())
    assert torch.allclose(got.double(), want, atol=1e-6), (got, want)
    _assert_same_gradient(got, want, student)


def test_group_loss_is_zero_when_both_sides_put_the_same_mass_on_every_group():
    """Different distributions inside the groups, the same group masses: nothing to learn."""
    teacher_group = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4])  # V_T = 12
    student_group = torch.tensor([0, 1, 1, 1, 2, 3, 4, 4, 4])  # V_S = 9
    g = torch.Generator().manual_seed(9)
    group_mass = torch.softmax(torch.randn(M, 5, generator=g, dtype=torch.float64), -1)

    def spread(groups, width):  # the group's mass split at random among its ids
        share = torch.rand(M, width, generator=g, dtype=torch.float64) + 0.1
        share = share / torch.stack([share[:, groups == groups[i]].sum(-1) for i in range(width)], -1)
        return (group_mass[:, groups] * share).log()

    teacher_logprobs, student_logits = spread(teacher_group, V_T), spread(student_group, V_S)
    top = teacher_logprobs.topk(V_T, dim=-1)
    tail = torch.full((M,), -math.inf, dtype=torch.float64)
    got = cross_tokenizer_loss("prefix-groups", student_logits, top.indices, top.values, tail, teacher_group,
                               temperature=1.0, student_group=student_group)
    assert abs(got.item()) < 1e-6
