"""Tests for kdpipe.pipeline.train.metrics against explicit reference computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdpipe.pipeline.train import metrics


def test_token_cross_entropy_equals_f_cross_entropy_on_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(20, 7, generator=g), torch.randint(0, 7, (20,), generator=g)
    mask = torch.rand(20, generator=g) > 0.3
    total, count = metrics.token_cross_entropy(logits, targets, mask)
    assert count == int(mask.sum())
    torch.testing.assert_close(total / count, F.cross_entropy(logits[mask], targets[mask]))


def brute_force_macro_f1(pred, target):
    f1s = []
    for c in sorted(set(pred) | set(target)):
        tp = sum(p == c and t == c for p, t in zip(pred, target))
        fp = sum(p == c and t != c for p, t in zip(pred, target))
        fn = sum(p != c and t == c for p, t in zip(pred, target))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(f1s) / len(f1s)


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_brute_force_per_class(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 6, (50,), generator=g)
    pred = torch.where(torch.rand(50, generator=g) < 0.5, target, torch.randint(0, 8, (50,), generator=g))
    expected = brute_force_macro_f1(pred.tolist(), target.tolist())
    assert metrics.macro_f1(pred, target, num_classes=8) == pytest.approx(expected)


def test_accumulated_confusion_equals_one_batch():
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randint(0, 5, (40,), generator=g), torch.randint(0, 5, (40,), generator=g)
    acc = metrics.ConfusionMatrix(5)
    for part in range(4):
        acc.add(pred[part * 10:(part + 1) * 10], target[part * 10:(part + 1) * 10])
    assert acc.macro_f1 == pytest.approx(metrics.macro_f1(pred, target, 5))
    assert acc.accuracy == pytest.approx(metrics.accuracy(pred, target))


def test_ece_on_a_constructed_case():
    # Bin (0.6, 0.667]: 3 items at confidence 0.65, 1 correct -> |1/3 - 0.65| weighted 3/5.
    # Bin (0.933, 1]: 2 items at confidence 0.95, both correct -> |1 - 0.95| weighted 2/5.
    probs = torch.tensor([0.65, 0.65, 0.65, 0.95, 0.95])
    correct = torch.tensor([True, False, False, True, True])
    expected = 3 / 5 * abs(1 / 3 - 0.65) + 2 / 5 * abs(1.0 - 0.95)
    assert metrics.expected_calibration_error(probs, correct, bins=15) == pytest.approx(expected)


def test_ece_is_zero_when_confidence_equals_accuracy_per_bin():
    probs = torch.tensor([0.5, 0.5, 1.0, 1.0])
    correct = torch.tensor([True, False, True, True])
    assert metrics.expected_calibration_error(probs, correct, bins=10) == pytest.approx(0.0)


def test_ece_streamed_over_batches_equals_one_batch():
    g = torch.Generator().manual_seed(1)
    probs, correct = torch.rand(100, generator=g), torch.rand(100, generator=g) > 0.4
    bins = metrics.CalibrationBins(15)
    for p, c in zip(probs.split(30), correct.split(30)):
        bins.add(p, c)
    assert bins.value == pytest.approx(metrics.expected_calibration_error(probs, correct))


def test_sparse_kl_to_teacher_at_k_equals_v_is_dense_kl():
    g = torch.Generator().manual_seed(2)
    n, v = 16, 30
    teacher, student = torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3
    mask = torch.ones(n, dtype=torch.bool)
    mask[-3:] = False
    log_p = F.log_softmax(teacher, -1)
    ids = teacher.topk(v, dim=-1).indices
    total, count = metrics.sparse_kl_to_teacher(student, ids, log_p.gather(1, ids),
                                                torch.full((n,), -math.inf), mask)
    dense = (log_p.exp() * (log_p - F.log_softmax(student, -1))).sum(-1)  # [N]
    assert count == n - 3
    torch.testing.assert_close(total / count, dense[mask].mean())


def test_sparse_kl_to_teacher_is_a_lower_bound_below_k_equals_v():
    g = torch.Generator().manual_seed(4)
    teacher, student = torch.randn(8, 40, generator=g) * 2, torch.randn(8, 40, generator=g) * 2
    log_p = F.log_softmax(teacher, -1)
    ids = teacher.topk(5, dim=-1).indices
    tail = torch.logsumexp(log_p.scatter(1, ids, -math.inf), -1)
    mask = torch.ones(8, dtype=torch.bool)
    sparse, _ = metrics.sparse_kl_to_teacher(student, ids, log_p.gather(1, ids), tail, mask)
    dense = (log_p.exp() * (log_p - F.log_softmax(student, -1))).sum()
    assert 0 < sparse <= dense


def test_top1_agreement_counts_masked_argmax_matches():
    student = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    topk_ids = torch.tensor([[1, 2], [2, 0], [0, 2]])
    agree, count = metrics.top1_agreement(student, topk_ids, torch.tensor([True, True, False]))
    assert (agree, count) == (1, 2)


def test_mean_is_nan_before_anything_is_counted():
    mean = metrics.Mean()
    assert math.isnan(mean.value)
    mean.add(torch.tensor(3.0), 2)
    mean.add(1.0, 2)
    assert mean.value == 1.0


def test_dense_kl_to_teacher_is_the_kl_over_every_id_and_bounds_the_topk_bins_kl():
    g = torch.Generator().manual_seed(5)
    teacher, student = torch.randn(12, 40, generator=g) * 2, torch.randn(12, 40, generator=g) * 2
    mask = torch.rand(12, generator=g) > 0.25
    total, count = metrics.dense_kl_to_teacher(student, teacher, mask, temperature=2.0)
    p, q = F.softmax(teacher.double() / 2, -1), F.softmax(student.double() / 2, -1)
    expected = sum(float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(12) if mask[i])
    assert count == int(mask.sum()) and float(total) == pytest.approx(expected, rel=1e-5)
    log_p = F.log_softmax(teacher, -1)
    for k in (1, 5, 39):
        ids = teacher.topk(k, dim=-1).indices
        tail = torch.logsumexp(log_p.scatter(1, ids, -math.inf), -1)
        bins, _ = metrics.sparse_kl_to_teacher(student, ids, log_p.gather(1, ids), tail, mask)
        full, _ = metrics.dense_kl_to_teacher(student, teacher, mask)
        assert bins <= full + 1e-6


def test_dense_kl_to_teacher_with_a_padded_student_vocabulary():
    g = torch.Generator().manual_seed(6)
    teacher, student = torch.randn(4, 10, generator=g), torch.randn(4, 16, generator=g)
    total, _ = metrics.dense_kl_to_teacher(student, teacher, torch.ones(4, dtype=torch.bool))
    log_p, log_q = F.log_softmax(teacher.double(), -1), F.log_softmax(student.double(), -1)[:, :10]
    assert float(total) == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="must cover the teacher's"):
        metrics.dense_kl_to_teacher(teacher, student, torch.ones(4, dtype=torch.bool))


def test_cache_kl_name_says_what_the_kl_is():
    assert metrics.cache_kl_name(top_k=32, vocab_size=2048, sampled=False) == "kl_topk_bins"
    assert metrics.cache_kl_name(top_k=2048, vocab_size=2048, sampled=False) == "kl_full"
    assert metrics.cache_kl_name(top_k=12, vocab_size=2048, sampled=True) == "kl_full_estimate"
    assert "lower bound" in metrics.KL_MEANINGS["kl_topk_bins"]
