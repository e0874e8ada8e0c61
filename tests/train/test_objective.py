"""The collated batch's layout, the loss's reductions and terms, and loader misuse (issue 26 items 1, 5, 8).

Real caches of the tiny Llama teacher; real student logits and a real lm-head; no kdpipe code mocked.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

import kdpipe
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.train.batch_layout import flat_targets
from kdpipe.pipeline.train.objective import targets_for
from kdpipe.stages.cli import main

P, K, V, H = 16, 8, 300, 24


def capture(tiny_lm_dir, text_dir, out, *extra) -> str:
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", str(tiny_lm_dir), "--data", str(text_dir), "--out", str(out),
        "--seq-len", str(P), "--limit-rows", "24", "--temperature", "1", "--temperature", "2", *extra],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return str(out)


@pytest.fixture(scope="module")
def cache(tiny_lm_dir, text_dir, tmp_path_factory):
    return kdpipe.open_cache(capture(tiny_lm_dir, text_dir, tmp_path_factory.mktemp("obj") / "topk", "--top-k", str(K)))


@pytest.fixture(scope="module")
def mixed(tiny_lm_dir, text_dir, tmp_path_factory):
    return kdpipe.open_cache(capture(tiny_lm_dir, text_dir, tmp_path_factory.mktemp("obj") / "mixed", "--top-k", "4",
                                     "--sample", "12", "--sample-temperature", "2"))


def collated(cache, *, batch_size=4, temperature=2.0, kind="forward-kl") -> dict:
    data = kdpipe.CacheDataset(cache, batch_size=batch_size, shuffle=False)
    return next(iter(DataLoader(data, batch_size=None, collate_fn=kdpipe.TargetCollator(cache, temperature=temperature,
                                                                                          kind=kind))))


def student(seed=0):
    """A student's last hidden states [4, P, H] and lm-head (weight [V, H], bias [V]), as leaves."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, P, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_(True)
    bias = (torch.randn(V, generator=g) * 0.1).requires_grad_(True)
    return hidden, weight, bias


def logits_of(hidden, weight, bias):
    return torch.nn.functional.linear(hidden, weight, bias)  # [B, P, V]


def leaves_of(value):
    """Every leaf of a nested batch (dicts, lists)."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in leaves_of(v)]
    return [value]


# ----------------------------------------------------------------------------- layout
def test_a_collated_batch_holds_only_per_row_tensors_and_flattens_to_the_trainers_targets(cache):
    batch = collated(cache)
    assert all(isinstance(leaf, torch.Tensor) and leaf.shape[0] == 4 for leaf in leaves_of(batch))
    teacher = batch["teacher"]
    assert teacher["topk_ids"].shape == (4, P, K) and teacher["kd_mask"].shape == (4, P)
    assert teacher["temperature"].dtype == torch.float32 and bool((teacher["temperature"] == 2.0).all())
    raw = next(iter(kdpipe.CacheDataset(cache, batch_size=4, shuffle=False)))
    want = targets_for(cache.schema, raw, temperature=2.0)  # what train-student computes its loss on
    got = flat_targets(teacher)
    for name in ("topk_ids", "topk_logprobs", "tail_logprob", "kd_mask", "labels", "ce_mask"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.temperature == 2.0


def test_rows_split_and_joined_as_accelerate_does_give_the_same_sums(cache):
    batch = collated(cache)
    hidden, weight, bias = student()
    loss_fn = kdpipe.DistillationLoss(alpha=0.6, temperature=2.0, reduction="sum")
    whole = loss_fn(batch["teacher"], logits_of(hidden, weight, bias))
    halves = [loss_fn({k: v[rows] for k, v in batch["teacher"].items()}, logits_of(hidden[rows], weight, bias))
              for rows in (slice(0, 2), slice(2, 4))]
    for key in ("loss", "kd", "ce", "kd_count", "ce_count"):
        torch.testing.assert_close(halves[0][key] + halves[1][key], whole[key], rtol=1e-5, atol=1e-5)
    joined = {k: torch.cat([v[2:], v[:2]]) for k, v in batch["teacher"].items()}  # rows in another order
    again = loss_fn(joined, logits_of(torch.cat([hidden[2:], hidden[:2]]), weight, bias))
    torch.testing.assert_close(again["loss"], whole["loss"], rtol=1e-5, atol=1e-5)


def test_targets_collated_at_another_temperature_are_refused(cache):
    batch = collated(cache, temperature=2.0)
    with pytest.raises(ValueError, match="the targets are at T=2 but temperature=1"):
        kdpipe.distillation_loss(batch["teacher"], torch.zeros(4, P, V), alpha=0.5, temperature=1.0)
    other = collated(cache, temperature=1.0)
    mixed_rows = {k: torch.cat([batch["teacher"][k][:2], other["teacher"][k][2:]]) for k in batch["teacher"]}
    with pytest.raises(ConfigError, match="joins targets made at different temperatures"):
        kdpipe.distillation_loss(mixed_rows, torch.zeros(4, P, V), alpha=0.5, temperature=2.0)


# ----------------------------------------------------------------------------- both terms
@pytest.mark.parametrize("fused", [False, True])
def test_both_terms_are_reported_at_alpha_0_and_1_and_only_the_weighted_one_trains(cache, fused):
    teacher = collated(cache)["teacher"]
    hidden, weight, bias = student()

    def loss(alpha):
        kw = dict(hidden=hidden, head_weight=weight, head_bias=bias) if fused else {}
        logits = None if fused else logits_of(hidden, weight, bias)
        return kdpipe.distillation_loss(teacher, logits, alpha=alpha, temperature=2.0, **kw)

    half, kd_only, ce_only = loss(0.5), loss(1.0), loss(0.0)
    assert half["kd"].item() > 0.01 and half["ce"].item() > 1.0
    torch.testing.assert_close(kd_only["ce"], half["ce"], rtol=1e-6, atol=1e-6)  # computed, not 0.0
    torch.testing.assert_close(ce_only["kd"], half["kd"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kd_only["loss"], half["kd"], rtol=1e-6, atol=1e-6)
    (grad_kd_only,) = torch.autograd.grad(kd_only["loss"], weight)
    (grad_kd,) = torch.autograd.grad(kdpipe.distillation_loss(teacher, logits_of(hidden, weight, bias), alpha=0.5,
                                                              temperature=2.0)["kd"], weight)
    torch.testing.assert_close(grad_kd_only, grad_kd, rtol=1e-5, atol=1e-7)  # no CE in the gradient


# ----------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "js", "tvd", "skew-kl"])
def test_sum_and_none_agree_with_the_mean(cache, kind):
    teacher = collated(cache, kind=kind)["teacher"]
    logits = logits_of(*student())
    kw = dict(alpha=0.7, temperature=2.0, kind=kind)
    mean = kdpipe.distillation_loss(teacher, logits, **kw)
    total = kdpipe.distillation_loss(teacher, logits, reduction="sum", **kw)
    each = kdpipe.distillation_loss(teacher, logits, reduction="none", **kw)
    n_kd, n_ce = int(teacher["kd_mask"].sum()), int((teacher["ce_mask"] & (teacher["labels"] != -100)).sum())
    assert (int(mean["kd_count"]), int(mean["ce_count"])) == (n_kd, n_ce) and n_ce < n_kd  # text: CE skips row ends
    torch.testing.assert_close(total["kd"], mean["kd"] * n_kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total["ce"], mean["ce"] * n_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total["loss"], 0.7 * total["kd"] + 0.3 * total["ce"], rtol=1e-6, atol=1e-5)
    assert each["loss"].shape == each["kd"].shape == each["ce"].shape == (4, P)
    torch.testing.assert_close(each["kd"].sum(), total["kd"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(each["ce"].sum(), total["ce"], rtol=1e-5, atol=1e-5)
    assert bool((each["ce"][~teacher["ce_mask"]] == 0).all()) and bool((each["kd"][~teacher["kd_mask"]] == 0).all())
    (g_none,) = torch.autograd.grad(each["loss"].sum(), logits, retain_graph=True)
    (g_sum,) = torch.autograd.grad(total["loss"], logits)
    torch.testing.assert_close(g_none, g_sum, rtol=1e-5, atol=1e-7)


def test_sampled_targets_per_position_sum_to_the_estimators_sum(mixed):
    teacher = collated(mixed, kind="forward-kl")["teacher"]
    assert "sample_ids" in teacher
    logits = logits_of(*student())
    total = kdpipe.distillation_loss(teacher, logits, alpha=0.5, temperature=2.0, reduction="sum")
    each = kdpipe.distillation_loss(teacher, logits, alpha=0.5, temperature=2.0, reduction="none")
    torch.testing.assert_close(each["kd"].sum(), total["kd"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(each["loss"].sum(), total["loss"], rtol=1e-5, atol=1e-5)


def test_fused_sum_equals_unfused_sum_with_its_gradients_and_refuses_none(cache):
    teacher = collated(cache)["teacher"]
    hidden, weight, bias = student()
    unfused = kdpipe.distillation_loss(teacher, logits_of(hidden, weight, bias), alpha=0.3, temperature=2.0,
                                       reduction="sum")
    fused = kdpipe.distillation_loss(teacher, hidden=hidden, head_weight=weight, head_bias=bias, alpha=0.3,
                                     temperature=2.0, reduction="sum")
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(fused[key], unfused[key], rtol=1e-5, atol=1e-4)
    grads_u = torch.autograd.grad(unfused["loss"], (hidden, weight, bias))
    grads_f = torch.autograd.grad(fused["loss"], (hidden, weight, bias))
    for g_f, g_u in zip(grads_f, grads_u):
        torch.testing.assert_close(g_f, g_u, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="reduction='none' needs the student's logits"):
        kdpipe.distillation_loss(teacher, hidden=hidden, head_weight=weight, alpha=0.3, temperature=2.0,
                                 reduction="none")
    with pytest.raises(ValueError, match="reduction='avg' is invalid"):
        kdpipe.DistillationLoss(reduction="avg")


@pytest.mark.parametrize("fused", [False, True])
def test_sums_over_accumulated_micro_batches_give_the_whole_batchs_gradient(cache, fused):
    """What Hugging Face's num_items_in_batch normalisation needs: sums and counts of each half."""
    teacher = collated(cache)["teacher"]
    hidden, weight, bias = student()
    kw = dict(alpha=0.6, temperature=2.0)

    def loss(rows, reduction):
        part = {k: v[rows] for k, v in teacher.items()}
        if fused:
            return kdpipe.distillation_loss(part, hidden=hidden[rows], head_weight=weight, head_bias=bias,
                                            reduction=reduction, **kw)
        return kdpipe.distillation_loss(part, logits_of(hidden[rows], weight, bias), reduction=reduction, **kw)

    (whole,) = torch.autograd.grad(loss(slice(0, 4), "mean")["loss"], weight)
    halves = [loss(rows, "sum") for rows in (slice(0, 2), slice(2, 4))]
    n_kd = sum(h["kd_count"] for h in halves)
    n_ce = sum(h["ce_count"] for h in halves)
    accumulated = torch.zeros_like(weight)
    for h in halves:  # each term normalised by its own count over the whole batch
        (g,) = torch.autograd.grad(0.6 * h["kd"] / n_kd + 0.4 * h["ce"] / n_ce if not fused else h["loss"], weight)
        accumulated += g
    if fused:  # the fused "kd" and "ce" carry no gradient: check the plain sum's gradient instead
        (total,) = torch.autograd.grad(loss(slice(0, 4), "sum")["loss"], weight)
        torch.testing.assert_close(accumulated, total, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- loaders
def test_dataset_length_is_the_number_of_batches_an_iteration_yields(cache):
    data = kdpipe.CacheDataset(cache, batch_size=5, seed=1)
    assert len(data) == len(list(DataLoader(data, batch_size=None))) == 5  # 24 rows
    assert len(DataLoader(data, batch_size=None, num_workers=2)) == 5
    data.set_epoch(1, start_batch=2)
    assert len(data) == len(list(data)) == 3
    shares = kdpipe.CacheDataset(cache, batch_size=5, seed=1, world_size=2, all_ranks=True)
    assert len(shares) == len(list(shares)) == 2 * 3


def test_all_ranks_yields_each_ranks_share_in_turn(cache):
    shares = kdpipe.CacheDataset(cache, batch_size=5, seed=1, world_size=2, all_ranks=True)
    own = [kdpipe.CacheDataset(cache, batch_size=5, seed=1, rank=r, world_size=2) for r in range(2)]
    for data in (shares, *own):
        data.set_epoch(3)
    got = [b["sample_index"].tolist() for b in DataLoader(shares, batch_size=None, num_workers=2)]
    per_rank = [[b["sample_index"].tolist() for b in DataLoader(d, batch_size=None)] for d in own]
    assert got == [share for step in zip(*per_rank) for share in step]
    with pytest.raises(ConfigError, match="all_ranks=True yields every rank's share, so rank=1 has no meaning"):
        kdpipe.CacheDataset(cache, batch_size=5, rank=1, world_size=2, all_ranks=True)
    with pytest.raises(ConfigError, match="batch_size=0 is invalid"):
        kdpipe.CacheDataset(cache, batch_size=0)


def test_a_loader_that_batches_whole_batches_again_is_refused_with_the_fix(cache):
    data = kdpipe.CacheDataset(cache, batch_size=4, shuffle=False)
    collate = kdpipe.TargetCollator(cache, temperature=2.0)
    with pytest.raises(ConfigError, match=r"TargetCollator got a list of 2 batches: .*DataLoader\(dataset, "
                                          r"batch_size=None, collate_fn=TargetCollator\(cache, temperature=\.\.\.\)\)"):
        next(iter(DataLoader(data, batch_size=2, collate_fn=collate)))
    one = next(iter(DataLoader(data, batch_size=1, collate_fn=collate)))  # a list of one batch: that batch
    whole = next(iter(DataLoader(data, batch_size=None, collate_fn=collate)))
    assert all(torch.equal(a, b) for a, b in zip(leaves_of(one), leaves_of(whole)))
    with pytest.raises(ConfigError, match=r"got no cache rows \(input_ids\).*remove_unused_columns=False"):
        collate({"input_ids": whole["input_ids"]})
    stacked = next(iter(DataLoader(data, batch_size=3)))  # default_collate stacks 3 whole batches: [3, 4, ...]
    with pytest.raises(ConfigError, match=r"got \(3,\) stacked batches of 4 rows: .*batch_size=None"):
        collate(stacked)
    with pytest.raises(ValueError, match="sampler"):  # torch's own refusal: an iterable dataset takes no sampler
        DataLoader(data, batch_size=None, sampler=range(3))


def test_hf_trainer_given_the_dataset_and_collator_says_how_to_build_the_loader(cache, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=1,
                             report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=LlamaForCausalLM(config), args=args,
                      train_dataset=kdpipe.CacheDataset(cache, batch_size=4),  # has a length: no max_steps needed
                      data_collator=kdpipe.TargetCollator(cache, temperature=2.0))
    with pytest.raises(ConfigError, match="TargetCollator got a list of 2 batches.*get_train_dataloader"):
        trainer.train()


def test_a_classification_cache_collates_one_position_per_row_and_the_loss_reads_it(module_teacher, module_cache):
    import numpy as np

    out = module_cache
    with np.load(module_teacher["data"]) as npz:
        x, y = npz["x"].astype(np.float32) / 255.0, npz["y"]
    cache = kdpipe.open_cache(out)
    data = kdpipe.CacheDataset(cache, batch_size=8, inputs=x, shuffle=False)
    batch = next(iter(DataLoader(data, batch_size=None, collate_fn=kdpipe.TargetCollator(cache, temperature=2.0))))
    teacher = batch["teacher"]
    assert batch["inputs"].shape[0] == 8 and teacher["topk_ids"].shape == (8, 1, 3)
    assert teacher["labels"][:, 0].tolist() == [int(y[i]) for i in batch["sample_index"]]
    logits = module_teacher["build"]()(batch["inputs"])[:, None, :]  # [B, 1, 10]
    each = kdpipe.distillation_loss(teacher, logits, alpha=0.5, temperature=2.0, reduction="none")
    mean = kdpipe.distillation_loss(teacher, logits, alpha=0.5, temperature=2.0)
    assert each["ce"].shape == (8, 1) and int(mean["ce_count"]) == int(mean["kd_count"]) == 8
    torch.testing.assert_close(each["loss"].mean(), mean["loss"], rtol=1e-5, atol=1e-6)
