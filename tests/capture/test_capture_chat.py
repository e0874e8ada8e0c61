"""Chat data through both stages: assistant-only targets, exact values, training and evaluation on
the target positions only. Uses the shipped demo teacher (whose tokenizer has a chat template) and
the shipped chat set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_capture import assert_matches_dense

from kdpipe import open_cache
from kdpipe.pipeline.evaluate.run import evaluate_model
from kdpipe.pipeline.train.trainer import Trainer
from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.stages.cli import main

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "data" / "teacher"
SEQ_LEN = 160  # some shipped conversations are longer: they are truncated
N = 32


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> tuple[Path, list[dict]]:
    lines = (REPO / "data" / "chat" / "train.jsonl").read_text().splitlines()[:N]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, [json.loads(line) for line in lines]


def chat_capture(data, out, *extra):
    result = run_cli("cache-teacher", "--teacher", TEACHER, "--data", data, "--out", out, "--top-k", 16,
                     "--seq-len", SEQ_LEN, "--temperature", 1, "--temperature", 2, "--num-workers", 0, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def chat_cache(records, tmp_path_factory) -> Path:
    return chat_capture(records[0], tmp_path_factory.mktemp("chat_cache") / "cache")


def test_chat_cache_targets_exactly_the_assistant_tokens(chat_cache, records):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    cache = open_cache(chat_cache)
    assert len(cache) == N and cache.schema.mask_meaning == "next-token-target"
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in records[1]]
    assert cache.manifest["totals"]["truncated_rows"] == sum(n > SEQ_LEN for n in lengths) > 0
    for i, record in enumerate(records[1]):
        row = cache.read(i)
        ids, mask = row["input_ids"], row["mask"]
        targets = tokenizer.decode(ids[1:][mask[:-1]])  # position t predicts token t + 1
        expected = "".join(m["content"] + tokenizer.eos_token for m in record["messages"] if m["role"] == "assistant")
        if lengths[i] <= SEQ_LEN:
            assert targets == expected, i
            assert not mask[lengths[i] - 1:].any()  # nothing at or after the conversation's last token
        else:
            assert expected.startswith(targets) and mask.any(), i
        assert row["sample_index"] == i  # one block: rows numbered in order


def test_chat_cache_matches_dense_teacher(chat_cache):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TEACHER).eval()
    cache = open_cache(chat_cache)
    for i in (0, 7, N - 1):
        ids = torch.from_numpy(cache.read(i)["input_ids"])[None]
        with torch.no_grad():  # right padding: the real positions never attend to it
            logits = model(ids).logits[0]
        for t in (1.0, 2.0):
            assert_matches_dense(cache.read_stored(i, temperature=t), logits, t, cache.schema.value_dtype)


@pytest.mark.slow
def test_targets_all_counts_every_token_and_packing_fills_rows(records, tmp_path):
    everything = open_cache(chat_capture(records[0], tmp_path / "all", "--targets", "all"))
    row = everything.read(0)
    last = int(np.nonzero(row["mask"])[0].max())
    assert row["mask"][: last + 1].all()  # every next token of the conversation is a target
    one = open_cache(chat_capture(records[0], tmp_path / "one", "--seq-len", 256))  # none truncated
    packed = open_cache(chat_capture(records[0], tmp_path / "packed", "--seq-len", 256, "--packing"))
    assert packed.manifest["data"]["packing"]["scheme"] == "chat-packed"
    assert len(one) == N and len(packed) <= 0.7 * N  # several whole conversations per row
    targets = lambda cache: [tuple(r["input_ids"][1:][r["mask"][:-1]]) for r in map(cache.read, range(len(cache)))]  # noqa: E731
    assert sum(targets(packed), ()) == sum(targets(one), ())  # the same target tokens, in order


@pytest.mark.slow
def test_evaluate_scores_ce_and_kl_on_the_target_positions_only(chat_cache, records):
    from transformers import AutoModelForCausalLM

    result = evaluate_model(TEACHER, cache=chat_cache, batch_size=8)
    cache = open_cache(chat_cache)
    ids = torch.from_numpy(np.stack([cache.read(i)["input_ids"] for i in range(N)]))
    mask = torch.from_numpy(np.stack([cache.read(i)["mask"] for i in range(N)]))
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = torch.where(mask[:, :-1], ids[:, 1:], -100)  # HF shifts labels by one itself
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(TEACHER).eval()(input_ids=ids, labels=labels).loss
    assert result["tokens"] == int(mask.sum()) == result["positions"]
    assert result["ce"] == pytest.approx(float(expected), rel=1e-4)
    assert result["kl_topk_bins"] == pytest.approx(0.0, abs=1e-3)  # the teacher against its own cache
    with_data = evaluate_model(TEACHER, cache=chat_cache, data=records[0], batch_size=8)
    assert with_data["ce"] == pytest.approx(result["ce"], rel=1e-6)  # --data rows align by sample_index


@pytest.mark.slow
def test_training_on_a_chat_cache_lowers_kl_on_assistant_tokens(chat_cache, tmp_path):
    config = TrainConfig(cache=str(chat_cache), student=str(REPO / "data" / "students" / "lm-student.json"),
                         out=str(tmp_path / "run"), steps=12, batch_size=8, eval_every=0, checkpoint_every=0,
                         log_every=1, lr=3e-3, seed=0, eval_fraction=0.25, alpha=1.0)
    config.validate()
    trainer = Trainer(config)
    trainer.setup()
    before = trainer.evaluate()["kl_topk_bins"]
    trainer.fit()
    after = trainer.evaluate()["kl_topk_bins"]
    assert after < before
