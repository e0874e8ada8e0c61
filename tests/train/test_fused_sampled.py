"""The fused lm-head + loss on sampled (k = 0) and mixed (top-k + draws) teacher targets (issue 25): the
values and gradients of ``losses.sampled_kd_loss`` (+ hard-label CE) on ``hidden @ W.T + b``, no
``[N, V]`` tensor, the same refusals; the library's loss and ``train-student`` take this path."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

import kdpipe
from kdpipe.pipeline.train.fused_kd import fused_linear_distillation_loss
from kdpipe.pipeline.train.losses import KINDS, SAMPLED_KINDS, hard_label_ce, sampled_kd_loss
from kdpipe.pipeline.train.objective import distillation_objective
from kdpipe.pipeline.train.targets import TeacherTargets
from kdpipe.stages.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py

N, H, V, M = 29, 12, 60, 6
TEMPS = (1.0, 2.0, 3.0, 4.0)  # 2, 3, 4: the CE exponential is the KD one's power (fused_draws)


def make_case(seed=0, *, n=N, h=H, v=V, k=5, m=M, temperature=2.0, teacher_vocab=None):
    """Student (hidden, W, b) and a teacher's targets at ``temperature``: the exact top-k, then ``m`` draw
    slots of ids drawn from the renormalised tail (unique ids, weight ``r_T * count / draws``, exact
    ``log p_T``), the last slot of every third row empty (padding: id 0, ``-inf``, weight 0)."""
    g = torch.Generator().manual_seed(seed)
    tv = teacher_vocab or v
    z = torch.randn(n, tv, generator=g) * 3.0
    logp = F.log_softmax(z / temperature, dim=-1)
    top_ids = z.topk(k, dim=-1).indices
    tail_p = logp.exp().scatter(1, top_ids, 0.0)  # [n, tv]: the tail's probabilities
    draws = torch.multinomial(tail_p / tail_p.sum(1, keepdim=True), 4 * m, replacement=True, generator=g)
    sample_ids = torch.zeros(n, m, dtype=torch.int64)
    sample_logprobs = torch.full((n, m), float("-inf"))
    sample_weights = torch.zeros(n, m)
    for row in range(n):
        ids, counts = draws[row].unique(return_counts=True)
        keep = m - 1 if row % 3 == 0 else m
        pick = torch.randperm(len(ids), generator=g)[:keep]  # any unique ids, not only the smallest
        ids, counts = ids[pick], counts[pick]
        sample_ids[row, :len(ids)] = ids
        sample_logprobs[row, :len(ids)] = logp[row, ids]
        sample_weights[row, :len(ids)] = tail_p[row].sum() * counts / (4 * m)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    return dict(hidden=torch.randn(n, h, generator=g), weight=torch.randn(v, h, generator=g) * 0.5,
                bias=torch.randn(v, generator=g) * 0.1, labels=labels, ids=top_ids, top=logp.gather(1, top_ids),
                sample_ids=sample_ids, sample_logprobs=sample_logprobs, sample_weights=sample_weights,
                kd_mask=torch.rand(n, generator=g) < 0.7, ce_mask=torch.rand(n, generator=g) < 0.8)


def _leaves(c):
    return [c["hidden"].clone().requires_grad_(True), c["weight"].clone().requires_grad_(True),
            c["bias"].clone().requires_grad_(True)]


def _draws(c):
    return dict(sample_ids=c["sample_ids"], sample_logprobs=c["sample_logprobs"], sample_weights=c["sample_weights"])


def unfused(c, *, alpha, temperature, kind="forward-kl", kd_mask=None, ce_mask=None, skew_lambda=0.1):
    """Reference: ``sampled_kd_loss`` and ``hard_label_ce`` on materialised logits; (outputs, grads)."""
    leaves = _leaves(c)
    logits = F.linear(*leaves)
    zero = torch.zeros(())
    kd = zero if alpha == 0.0 else sampled_kd_loss(
        logits, c["ids"], c["top"], c["sample_ids"], c["sample_logprobs"], c["sample_weights"],
        temperature=temperature, kind=kind, mask=kd_mask, skew_lambda=skew_lambda)
    ce = zero if alpha == 1.0 else hard_label_ce(logits, c["labels"], mask=ce_mask)
    loss = alpha * kd + (1.0 - alpha) * ce
    return {"loss": loss, "kd": kd, "ce": ce}, list(torch.autograd.grad(loss, leaves))


def fused(c, **kw):
    leaves = _leaves(c)
    out = fused_linear_distillation_loss(leaves[0], leaves[1], c["labels"], c["ids"], c["top"], None,
                                         head_bias=leaves[2], **_draws(c), **kw)
    return out, list(torch.autograd.grad(out["loss"], leaves))


def assert_same(got, want, rtol=1e-5, atol=1e-6):
    (out_f, grads_f), (out_u, grads_u) = got, want
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(out_f[key], out_u[key], rtol=rtol, atol=atol, msg=key)
    for name, gf, gu in zip(("hidden", "weight", "bias"), grads_f, grads_u):
        scale = max(gu.abs().max().item(), 1e-3)  # compared at the scale of their largest entry
        torch.testing.assert_close(gf, gu, rtol=rtol, atol=atol * scale * 10, msg=name)


@pytest.mark.parametrize("k", [0, 5])  # sampled, mixed
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("kind", SAMPLED_KINDS)
def test_equals_the_unfused_estimator_in_value_and_gradient(kind, temperature, alpha, k):
    c = make_case(seed=int(temperature * 10) + k, k=k, temperature=temperature)
    kw = dict(alpha=alpha, temperature=temperature, kind=kind, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    got = fused(c, chunk_rows=7, **kw)
    assert got[0]["kd"].item() != 0.0 or alpha == 0.0  # a real estimate, not an empty term
    assert_same(got, unfused(c, **kw))


@pytest.mark.parametrize("chunk_rows", [1, 4, N, None])
def test_chunk_sizes_no_masks_and_skew_lambda(chunk_rows):
    c = make_case(seed=3, k=2)
    kw = dict(alpha=0.7, temperature=1.0, kind="skew-kl", skew_lambda=0.3)
    assert_same(fused(c, chunk_rows=chunk_rows, **kw), unfused(c, **kw))


@pytest.mark.parametrize("temperature", TEMPS)
def test_extreme_logits_are_finite_and_equal_unfused(temperature):
    """Logits spread over hundreds: exponentials that underflow (and their powers) change nothing."""
    c = make_case(seed=11, k=3, temperature=temperature)
    c = {**c, "hidden": c["hidden"] * 60.0}
    kw = dict(alpha=0.5, temperature=temperature, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    got = fused(c, chunk_rows=8, **kw)
    assert torch.isfinite(got[0]["loss"]) and all(bool(torch.isfinite(g).all()) for g in got[1])
    assert_same(got, unfused(c, **kw), rtol=1e-5, atol=1e-5)


def test_masked_rows_get_exactly_zero_gradient_whatever_their_targets_hold():
    c = make_case(seed=4, k=3)
    kd_mask, ce_mask = c["kd_mask"], c["ce_mask"]
    neither = ~kd_mask & ~(ce_mask & (c["labels"] != -100))
    assert neither.any() and (kd_mask & ~ce_mask).any()
    clean = {**c}
    c = {**c, "sample_logprobs": c["sample_logprobs"].clone(), "sample_weights": c["sample_weights"].clone()}
    c["sample_logprobs"][~kd_mask] = float("nan")
    c["sample_weights"][~kd_mask] = 1e30
    kw = dict(alpha=0.5, temperature=2.0, kd_mask=kd_mask, ce_mask=ce_mask)
    got = fused(c, chunk_rows=5, **kw)
    assert torch.isfinite(got[0]["loss"]) and bool((got[1][0][neither] == 0).all())
    assert_same(got, unfused(clean, **kw))


def test_all_false_masks_give_zero_and_zero_gradients():
    c = make_case(seed=5)
    none = torch.zeros(N, dtype=torch.bool)
    out, grads = fused(c, alpha=0.5, temperature=2.0, kd_mask=none, ce_mask=none)
    assert out["loss"].item() == 0.0 and all(bool((g == 0).all()) for g in grads)


def test_padded_teacher_vocab_drops_ids_the_student_cannot_score_like_the_unfused_objective():
    """Ids >= V (top-k and draws) of a teacher with 12 more logits, through distillation_objective: the
    fused path (hidden) against the vocabulary policy on the logits (targets.fold_padded_vocab)."""
    c = make_case(seed=6, k=8, m=10, teacher_vocab=V + 12)
    assert (c["ids"] >= V).any() and (c["sample_ids"] >= V).any()
    targets = TeacherTargets(c["ids"], c["top"], torch.zeros(N), c["kd_mask"], c["labels"], c["ce_mask"],
                             **_draws(c), temperature=2.0)
    results = []
    for path in ("logits", "hidden"):
        leaves = _leaves(c)
        inputs = {"student_logits": F.linear(*leaves)} if path == "logits" else \
            {"hidden": leaves[0], "head_weight": leaves[1], "head_bias": leaves[2]}
        out = distillation_objective(targets, alpha=0.5, temperature=2.0, **inputs)
        results.append((out, list(torch.autograd.grad(out["loss"], leaves))))
    assert_same(results[1], results[0])


def test_a_head_with_more_rows_than_vocab_size_uses_its_first_rows():
    c = make_case(seed=7, k=4)
    wide = {**c, "weight": torch.cat([c["weight"], torch.randn(9, H)]), "bias": torch.cat([c["bias"], torch.randn(9)])}
    kw = dict(alpha=0.5, temperature=2.0, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    got_out, got_grads = fused(wide, vocab_size=V, **kw)
    assert bool((got_grads[1][V:] == 0).all())
    assert_same((got_out, [got_grads[0], got_grads[1][:V], got_grads[2][:V]]), unfused(c, **kw))


def test_bf16_autocast_is_close_to_the_unfused_autocast_and_to_fp32():
    c = make_case(seed=8, n=64, h=32, v=300, k=6, m=10)
    kw = dict(alpha=0.5, temperature=2.0, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    fp32 = unfused(c, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(c, chunk_rows=16, **kw)
        ref = unfused(c, **kw)
    assert got[0]["loss"].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
    torch.testing.assert_close(got[0]["loss"], ref[0]["loss"], rtol=1e-5, atol=1e-5)  # the same bf16 logits
    for g, u, f in zip(got[1], ref[1], fp32[1]):
        assert ((g - u).norm() / u.norm()).item() < 2e-2
        assert ((g - f).norm() / f.norm()).item() < 2e-2
    torch.testing.assert_close(got[0]["loss"], fp32[0]["loss"], rtol=2e-2, atol=1e-3)


class Largest(TorchDispatchMode):
    """The most elements of any tensor an op returns while it is active."""

    def __init__(self):
        super().__init__()
        self.biggest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.biggest = max(self.biggest, t.numel())
        return out


@pytest.mark.parametrize("k", [0, 8])
def test_no_tensor_of_n_by_v_is_ever_made(k):
    n, v, chunk = 64, 4096, 16
    c = make_case(seed=9, n=n, v=v, k=k, m=12)
    for alpha, temperature in ((0.5, 2.0), (0.5, 1.0), (1.0, 3.0)):
        with Largest() as seen:
            fused(c, chunk_rows=chunk, alpha=alpha, temperature=temperature, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
        assert seen.biggest <= chunk * v, (alpha, temperature, seen.biggest)


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in SAMPLED_KINDS])
def test_kinds_the_draws_cannot_estimate_are_refused_with_the_unfused_message(kind):
    c = make_case(seed=10)
    with pytest.raises(ValueError) as unfused_error:
        unfused(c, alpha=0.5, temperature=2.0, kind=kind)
    for alpha in (0.0, 0.5):
        with pytest.raises(ValueError) as fused_error:
            fused(c, alpha=alpha, temperature=2.0, kind=kind)
        assert str(fused_error.value) == str(unfused_error.value)
    assert "is not defined on sampled targets" in str(unfused_error.value)


# ----------------------------------------------------------------------------- real caches
def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def caches(tiny_lm_dir, text_dir, tmp_path_factory) -> dict:
    """A sampled (k = 0, draws at T = 1) and a mixed (top-4 + draws at T = 2) cache of the tiny teacher."""
    out = {}
    for name, flags in (("sampled", ("--sample", 16)), ("mixed", ("--top-k", 4, "--sample", 12, "--sample-temperature", 2))):
        folder = tmp_path_factory.mktemp("fused_sampled") / name
        result = run_cli("cache-teacher", "--teacher", tiny_lm_dir, "--data", text_dir, "--out", folder, "--seq-len", 16,
                         "--limit-rows", 24, "--temperature", 1, "--temperature", 2, *flags)
        assert result.exit_code == 0, result.output
        out[name] = folder
    return out


@pytest.mark.parametrize("name", ["sampled", "mixed"])
def test_the_library_loss_takes_the_fused_path_on_a_sampled_cache(caches, name):
    """``kdpipe.DistillationLoss(...)(teacher, hidden=...)`` on a TargetCollator batch runs the fused head
    (before, it made the full logits) with the logits' values and gradients (mean and sum)."""
    cache = kdpipe.open_cache(caches[name])
    collate = kdpipe.TargetCollator(cache, temperature=2.0)
    batch = next(iter(DataLoader(kdpipe.CacheDataset(cache, batch_size=4, shuffle=False), batch_size=None,
                                 collate_fn=collate)))
    assert "sample_ids" in batch["teacher"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 16, 24, generator=g).requires_grad_(True)
    weight = (torch.randn(300, 24, generator=g) / 5).requires_grad_(True)
    for reduction in ("mean", "sum"):
        kw = dict(alpha=0.5, temperature=2.0, reduction=reduction)
        plain = kdpipe.distillation_loss(batch["teacher"], F.linear(hidden, weight), **kw)
        out = kdpipe.DistillationLoss(**kw)(batch["teacher"], hidden=hidden, head_weight=weight)
        if reduction == "mean":  # the fused head's own autograd node (before: a linear layer's full logits)
            assert type(out["loss"].grad_fn).__name__ == "_FusedLinearDistillationBackward"
        for key in ("loss", "kd", "ce", "kd_count", "ce_count"):
            torch.testing.assert_close(out[key], plain[key], rtol=1e-5, atol=1e-5, msg=key)
        for got, want in zip(torch.autograd.grad(out["loss"], (hidden, weight)),
                             torch.autograd.grad(plain["loss"], (hidden, weight))):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="is not defined on sampled targets"):
        kdpipe.distillation_loss(batch["teacher"], hidden=hidden, head_weight=weight, alpha=0.5, temperature=2.0,
                                 kind="js")


STUDENT = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 16,
           "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "max_position_embeddings": 64}


@pytest.mark.slow
def test_train_student_on_sampled_and_mixed_caches_runs_fused_and_trains_like_the_unfused_loss(caches, tmp_path):
    from safetensors.torch import load_file

    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    for name, draws in (("sampled", "16 importance-weighted draws"), ("mixed", "exact top-4 + 12 importance-weighted draws")):
        common = ["train-student", "--cache", caches[name], "--student", student, "--steps", 4, "--batch-size", 4,
                  "--device", "cpu", "--temperature", 2, "--alpha", 0.7, "--eval-every", 0, "--lr", 1e-3]
        weights = {}
        for path, flags in (("fused", ()), ("plain", ("--no-fused-loss",))):
            out = tmp_path / f"{name}-{path}"
            result = run_cli(*common, "--out", out, *flags)
            assert result.exit_code == 0, result.output
            ran = json.loads((out / "run.json").read_text())["loss_implementation"]
            assert (ran.startswith("fused") if path == "fused" else ran.startswith("unbiased estimator")), ran
            assert f"unbiased estimator: {draws} per position" in ran
            weights[path] = load_file(out / "model" / "model.safetensors")
        assert weights["fused"].keys() == weights["plain"].keys()
        for key, fused_value in weights["fused"].items():
            torch.testing.assert_close(fused_value, weights["plain"][key], rtol=1e-4, atol=3e-5, msg=key)
        initial = initial_weights(student)
        assert not torch.equal(initial["lm_head.weight"], weights["fused"]["lm_head.weight"])  # the runs trained
    refused = run_cli("train-student", "--cache", caches["sampled"], "--student", student, "--steps", 1,
                      "--device", "cpu", "--loss", "tvd", "--out", tmp_path / "tvd")
    assert refused.exit_code == 2 and refused.output.count("error:") == 1 and "Traceback" not in refused.output
    assert "--loss tvd is not defined on a sampled cache" in refused.output and not (tmp_path / "tvd").exists()


def initial_weights(student_json) -> dict:
    """The student's weights before training (the trainer seeds its initialisation with --seed 0)."""
    from kdpipe.pipeline.models.students import load_student

    model = load_student(str(student_json), task="causal-lm", seed=0, tokenizer_path=None).model
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("k", [0, 5])
def test_cuda_fused_estimator_equals_unfused_in_fp32_and_bf16_autocast(k):
    c = {key: value.cuda() for key, value in make_case(seed=12, n=96, h=32, v=500, k=k, m=10).items()}
    kw = dict(alpha=0.5, temperature=2.0, kd_mask=c["kd_mask"], ce_mask=c["ce_mask"])
    assert_same(fused(c, chunk_rows=32, **kw), unfused(c, **kw), rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, ref = fused(c, chunk_rows=32, **kw), unfused(c, **kw)
    torch.testing.assert_close(got[0]["loss"], ref[0]["loss"], rtol=1e-4, atol=1e-4)
    for g, u in zip(got[1], ref[1]):
        assert ((g - u).norm() / u.norm()).item() < 2e-2
