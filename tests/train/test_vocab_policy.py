"""The vocabulary policy (pipeline/train/targets.py): a student larger than the teacher's vocabulary has
its extra logits masked out (loss = the loss of its first V columns), an equal one is unchanged, a
smaller one is refused in one line naming both sizes -- through the public loss (unfused and fused),
on quantized and float caches, and in train-student's Trainer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import kdpipe
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.train import losses
from kdpipe.pipeline.train.targets import TeacherTargets, Vocabulary, apply_vocab_policy, with_vocabulary
from kdpipe.stages.cli import main

V = 300  # the tiny teacher's vocabulary (tests/conftest.py: tiny_lm_dir), its tokenizer's too
H = 24
TEMPERATURES = (1.0, 2.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


@pytest.fixture(scope="module", params=["quantized", "float16"])
def cache(request, tiny_lm_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "cache"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", str(tiny_lm_dir), "--data", str(text_dir), "--out", str(out),
        "--top-k", "16", "--seq-len", "32", "--limit-rows", "12", "--values", request.param,
        "--temperature", "1", "--temperature", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with kdpipe.open_cache(out) as opened:
        assert opened.schema.value_dtype == request.param
        yield opened


def collated(cache, temperature: float) -> dict:
    rows = next(iter(kdpipe.CacheDataset(cache, batch_size=4, shuffle=False)))
    return kdpipe.TargetCollator(cache, temperature=temperature)(rows)


def flat(teacher: dict) -> TeacherTargets:
    """The flat [N, ...] targets of a collated batch's ``teacher`` (per-row [B, P, ...] or flat tensors)."""
    lead = teacher["kd_mask"].dim()
    return TeacherTargets(**{name: value.reshape(-1, *value.shape[lead:]) for name, value in teacher.items()
                             if name != "temperature"})


def reference(targets: TeacherTargets, logits: torch.Tensor, *, temperature: float, kind: str) -> dict:
    """The loss of ``logits [N, V]`` computed directly from the target tensors (no vocabulary policy)."""
    return losses.distillation_loss(logits.float(), targets.labels, targets.topk_ids, targets.topk_logprobs,
                                    targets.tail_logprob, alpha=0.6, temperature=temperature, kind=kind,
                                    kd_mask=targets.kd_mask, ce_mask=targets.ce_mask)


def student_head(extra: int, seed: int = 0):
    """Hidden states [N, H] and an lm-head of V + extra rows (extra < 0: fewer rows), as leaves."""
    g = torch.Generator().manual_seed(seed)
    n = 4 * 32
    hidden = torch.randn(n, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V + extra, H, generator=g) * 0.6).requires_grad_(True)
    bias = (torch.randn(V + extra, generator=g) * 0.3).requires_grad_(True)
    return hidden, weight, bias


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", ["forward-kl", "js"])
def test_a_larger_student_gets_the_loss_of_its_first_v_columns(cache, temperature, kind):
    batch = collated(cache, temperature)
    targets = flat(batch["teacher"])
    loss_fn = kdpipe.DistillationLoss(alpha=0.6, temperature=temperature, kind=kind)
    hidden, weight, bias = student_head(extra=64)
    logits = F.linear(hidden, weight, bias)  # [N, V + 64]: a padded student head
    expected = reference(targets, logits[:, :V], temperature=temperature, kind=kind)
    assert not torch.isclose(reference(targets, logits, temperature=temperature, kind=kind)["loss"],
                             expected["loss"])  # counting the extra columns (the old behaviour) differs

    unfused = loss_fn(batch["teacher"], logits)
    fused = loss_fn(batch["teacher"], hidden=hidden, head_weight=weight, head_bias=bias)
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(unfused[key], expected[key], rtol=0, atol=0)
        torch.testing.assert_close(fused[key], expected[key], rtol=2e-6, atol=2e-6)
    (grad_expected,) = torch.autograd.grad(expected["loss"], weight, retain_graph=True)
    (grad_unfused,) = torch.autograd.grad(unfused["loss"], weight)
    (grad_fused,) = torch.autograd.grad(fused["loss"], weight)
    assert torch.equal(grad_unfused, grad_expected)
    torch.testing.assert_close(grad_fused, grad_expected, rtol=1e-4, atol=1e-6)
    assert not grad_fused[V:].any()  # the masked rows get no gradient


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_a_larger_student_matches_a_dense_computation_on_its_first_v_columns(cache, temperature):
    """Forward KL on the (k+1) bins and CE, written out in float64 from a softmax over columns 0..V-1."""
    batch = collated(cache, temperature)
    targets = flat(batch["teacher"])
    hidden, weight, bias = student_head(extra=64, seed=3)
    logits = F.linear(hidden, weight, bias).detach()  # [N, V + 64]
    log_q = F.log_softmax(logits[:, :V].double() / temperature, dim=-1)
    q_top = log_q.gather(1, targets.topk_ids)
    q_tail = torch.logsumexp(log_q.scatter(1, targets.topk_ids, float("-inf")), dim=-1, keepdim=True)
    log_p = torch.cat([targets.topk_logprobs.double(), targets.tail_logprob.double()[:, None]], dim=1)
    kl = (log_p.exp() * (log_p - torch.cat([q_top, q_tail], dim=1))).sum(-1)
    kd = temperature ** 2 * kl[targets.kd_mask].mean()
    counted = targets.ce_mask & (targets.labels != -100)
    ce = F.cross_entropy(logits[:, :V].double()[counted], targets.labels[counted])
    loss_fn = kdpipe.DistillationLoss(alpha=0.6, temperature=temperature)
    fused = loss_fn(batch["teacher"], hidden=hidden.detach(), head_weight=weight.detach(), head_bias=bias.detach())
    for out in (loss_fn(batch["teacher"], logits), fused):
        torch.testing.assert_close(out["kd"].double(), kd, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["ce"].double(), ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["loss"].double(), 0.6 * kd + 0.4 * ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_an_equal_student_is_unchanged(cache, temperature):
    batch = collated(cache, temperature)
    targets = flat(batch["teacher"])
    loss_fn = kdpipe.DistillationLoss(alpha=0.6, temperature=temperature)
    hidden, weight, bias = student_head(extra=0)
    logits = F.linear(hidden, weight, bias)
    expected = reference(targets, logits, temperature=temperature, kind="forward-kl")
    fused = loss_fn(batch["teacher"], hidden=hidden, head_weight=weight, head_bias=bias)
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(loss_fn(batch["teacher"], logits)[key], expected[key], rtol=0, atol=0)
        torch.testing.assert_close(fused[key], expected[key], rtol=2e-6, atol=2e-6)


def test_a_smaller_student_is_refused_in_one_line_naming_both_sizes(cache):
    batch = collated(cache, 2.0)
    loss_fn = kdpipe.DistillationLoss(alpha=0.6, temperature=2.0)
    hidden, weight, bias = student_head(extra=-48)
    for run in (lambda: loss_fn(batch["teacher"], F.linear(hidden, weight, bias)),
                lambda: loss_fn(batch["teacher"], hidden=hidden, head_weight=weight, head_bias=bias)):
        with pytest.raises(ConfigError) as refused:
            run()
        message = str(refused.value)
        assert "\n" not in message and "(252)" in message and f"{V}" in message, message
        assert "vocab_size" in message  # the fix


def test_the_collator_carries_the_caches_sizes(cache):
    teacher = flat(collated(cache, 1.0)["teacher"])
    n = teacher.kd_mask.shape[0]
    assert torch.equal(teacher.teacher_vocab_size, torch.full((n,), V))
    assert torch.equal(teacher.min_student_vocab, torch.full((n,), V))
    assert Vocabulary.of(cache) == Vocabulary(V, V, "causal-lm")


def padded_teacher_targets(n=6, k=5, teacher=320, tokens=300, seed=0) -> TeacherTargets:
    """Targets of a teacher with 320 logits for 300 real tokens, some top-k ids among the padded 20."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, teacher, generator=g) * 3
    z[:, tokens:] += 4.0  # padded rows the teacher likes: they land in the top-k
    logp = F.log_softmax(z, dim=-1)
    ids = z.topk(k, dim=-1).indices
    tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)
    labels = torch.randint(0, tokens, (n,), generator=g)
    ones = torch.ones(n, dtype=torch.bool)
    targets = TeacherTargets(ids, logp.gather(1, ids), tail, ones, labels, ones, temperature=1.0)
    return with_vocabulary(targets, Vocabulary(teacher, tokens))


def test_a_student_sized_to_the_tokenizer_of_a_padded_teacher_folds_the_padded_ids():
    targets = padded_teacher_targets()
    assert bool((targets.topk_ids >= 300).any())
    logits = torch.randn(targets.kd_mask.shape[0], 300)
    folded_logits, folded = apply_vocab_policy(logits, targets)  # accepted: 300 real tokens covered
    assert torch.equal(folded_logits[:, :300], logits) and bool(torch.isinf(folded_logits[:, 300:]).all())
    moved = torch.logsumexp(targets.topk_logprobs.masked_fill(targets.topk_ids < 300, float("-inf")), dim=-1)
    torch.testing.assert_close(folded.tail_logprob, torch.logaddexp(targets.tail_logprob, moved))
    wide, _ = apply_vocab_policy(torch.randn(targets.kd_mask.shape[0], 384), targets)
    assert wide.shape[1] == 320  # larger than the teacher's 320 logits: cut to them
    with pytest.raises(ConfigError, match=r"vocabulary \(299\) does not cover the 300 ids"):
        apply_vocab_policy(torch.randn(targets.kd_mask.shape[0], 299), targets)


def test_targets_without_sizes_refuse_a_label_the_student_cannot_score():
    targets = padded_teacher_targets()
    bare = TeacherTargets(targets.topk_ids, targets.topk_logprobs, targets.tail_logprob, targets.kd_mask,
                          targets.labels.clone(), targets.ce_mask, temperature=1.0)
    bare.labels[0] = 290
    with pytest.raises(ConfigError, match=r"vocabulary \(280\) cannot score the hard label 290"):
        apply_vocab_policy(torch.randn(bare.kd_mask.shape[0], 280), bare)


STUDENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
}


@pytest.mark.parametrize("fused", [True, False])
def test_train_student_applies_the_same_policy(cache, tmp_path, fused):
    """train-student's Trainer: a student of V + 64 rows trains on the loss of its first V columns;
    one of V - 48 rows is refused before training."""
    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import Trainer

    def trainer_for(vocab: int) -> Trainer:
        student = tmp_path / f"student-{vocab}.json"
        student.write_text(json.dumps({**STUDENT, "vocab_size": vocab}))
        config = TrainConfig(cache=str(cache.root), student=str(student), out=str(tmp_path / f"run-{vocab}"), steps=2,
                             batch_size=4, eval_every=0, fused_loss=fused, seed=1)
        config.validate()
        trainer = Trainer(config)
        trainer.setup()
        return trainer

    with pytest.raises(ConfigError, match=r"\(252\) does not cover the 300 tokens"):
        trainer_for(V - 48)
    trainer = trainer_for(V + 64)
    try:
        assert (trainer.head is not None) == fused
        batch = next(iter(kdpipe.CacheDataset(cache, batch_size=4, shuffle=False)))
        got = trainer.loss(batch, temperature=2.0, alpha=0.6)
        logits = trainer.student_logits(batch, model=trainer.model)
        assert logits.shape[-1] == V + 64
        targets = trainer.targets(batch, temperature=2.0)
        expected = reference(targets, logits.reshape(-1, V + 64)[:, :V], temperature=2.0, kind="forward-kl")
        for key in ("loss", "kd", "ce"):
            torch.testing.assert_close(got[key], expected[key], rtol=2e-6, atol=2e-6)
    finally:
        trainer.close()
