"""The sparse view of logits: exact against dense softmax, chunking-invariant, NaN-safe."""

import pytest
import torch

from kdpipe.pipeline.capture.topk import sparse_view_of_logits


def test_sparse_view_is_exact_and_independent_of_chunking():
    torch.manual_seed(0)
    logits = torch.randn(37, 500, dtype=torch.float64).float() * 6
    temperatures = (1.0, 2.0, 4.0)
    one = sparse_view_of_logits(logits, top_k=20, temperatures=temperatures)
    many = sparse_view_of_logits(logits, top_k=20, temperatures=temperatures, chunk_bytes=4 * 500 * 5)
    for name in ("topk_ids", "topk_logits", "logsumexp", "tail_logprob"):
        assert torch.equal(getattr(one, name), getattr(many, name)), name
    for j, t in enumerate(temperatures):
        dense = torch.log_softmax(logits.double() / t, dim=-1)
        got = one.topk_logits / t - one.logsumexp[:, j : j + 1]
        torch.testing.assert_close(got.double(), dense.gather(1, one.topk_ids), atol=1e-5, rtol=0)
        tail = torch.logsumexp(dense.scatter(1, one.topk_ids, float("-inf")), dim=-1)
        torch.testing.assert_close(one.tail_logprob[:, j].double(), tail, atol=1e-5, rtol=1e-5)


def test_tiny_tails_keep_their_precision():
    logits = torch.zeros(1, 100)
    logits[0, :5] = 40.0  # the tail holds ~ 95 * exp(-40) ~ 4e-16 of the mass
    view = sparse_view_of_logits(logits, top_k=5, temperatures=(1.0,))
    expected = torch.log(torch.tensor(95.0, dtype=torch.float64)) - 40 - torch.log(torch.tensor(5.0, dtype=torch.float64))
    assert abs(float(view.tail_logprob[0, 0]) - float(expected)) < 1e-3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_name_the_position(bad):
    logits = torch.randn(10, 50)
    logits[7, 3] = bad
    with pytest.raises(FloatingPointError, match="position 7"):
        sparse_view_of_logits(logits, top_k=4, temperatures=(1.0, 2.0), chunk_bytes=4 * 50 * 3)


def test_minus_inf_logits_are_allowed():
    logits = torch.randn(3, 20)
    logits[:, 10:] = float("-inf")  # a masked vocabulary
    view = sparse_view_of_logits(logits, top_k=4, temperatures=(1.0,))
    assert torch.isfinite(view.logsumexp).all() and (view.topk_ids < 10).all()


def test_no_positions_give_an_empty_view():
    # A batch of chat rows whose assistant turns all fall past --seq-len has no target position.
    view = sparse_view_of_logits(torch.zeros(0, 10), top_k=3, temperatures=(1.0, 2.0))
    assert view.topk_ids.shape == (0, 3) and view.logsumexp.shape == (0, 2) and view.tail_logprob.shape == (0, 2)
