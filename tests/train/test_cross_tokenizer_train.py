"""``kdpipe train-student`` with a student that has its own tokenizer (the shipped Unigram one) on a
cache of the shipped BPE teacher: real capture, real training, run.json, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdpipe.stages.cli import main

REPO = Path(__file__).resolve().parents[2]
UNIGRAM = REPO / "data" / "tokenizer-unigram"
STUDENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1500, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "eos_token_id": 0, "bos_token_id": 1, "pad_token_id": 0,
}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory) -> Path:
    """The shipped teacher over the first 12 kB of two held-out-play excerpts, 64-token rows."""
    folder = tmp_path_factory.mktemp("xtok_text")
    play = (REPO / "data" / "shakespeare" / "heldout" / "twelfth_night.txt").read_text()
    (folder / "a.txt").write_text(play[2000:8000])
    (folder / "b.txt").write_text(play[40000:46000])
    out = folder / "cache"
    result = run_cli("cache-teacher", "--teacher", REPO / "data" / "teacher", "--data", folder, "--out", out,
                     "--top-k", 16, "--seq-len", 64, "--temperature", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xtok_student") / "student.json"
    path.write_text(json.dumps(STUDENT))
    return path


def train(cache, student, out, *extra):
    return run_cli("train-student", "--cache", cache, "--student", student, "--tokenizer", UNIGRAM, "--out", out,
                   "--batch-size", 4, "--lr", 3e-3, "--seed", 0, "--log-every", 1, "--eval-every", 3,
                   "--eval-rows", 8, "--eval-fraction", 0.1, "--device", "cpu", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["exact-map+uld", "prefix-map", "first-byte", None])  # None: the default
def test_train_student_with_the_unigram_tokenizer_records_the_loss_and_the_aligned_share(
        text_cache, student, tmp_path, one_thread, loss):
    result = train(text_cache, student, tmp_path / "run", "--steps", 3, *(["--cross-tokenizer-loss", loss] if loss else []))
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    loss = loss or "prefix-groups"
    assert run["resolved_settings"]["cross_tokenizer_loss"] == loss
    assert run["loss_implementation"].startswith("cross-tokenizer: full student logits")
    recorded = run["cross_tokenizer"]
    cache_tokenizer = json.loads((text_cache / "manifest.json").read_text())["tokenizer"]["sha256"]
    assert recorded["loss"] == loss and recorded["student_tokenizer_sha256"] != cache_tokenizer
    assert 0.3 < recorded["aligned_share"] <= 1.0 and recorded["aligned_share_rows"] >= 32
    assert recorded["shared_teacher_ids"] > 500
    held_out = run["final_eval_metrics"]
    assert 0.3 < held_out["aligned_share"] <= 1.0
    assert math.isfinite(held_out["bits_per_byte"]) and held_out["bits_per_byte"] > 0
    assert held_out["kl_exact_map"] > 0 and held_out["uld"] > 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in steps if r["split"] == "train"]
    assert len(train_steps) == 3 and all(r["kd"] > 0 and r["ce"] > 0 for r in train_steps)
    saved = json.loads((tmp_path / "run" / "model" / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == "</s>"  # the student's own tokenizer is saved with it


def test_an_unknown_cross_tokenizer_loss_is_one_line(text_cache, student, tmp_path):
    result = train(text_cache, student, tmp_path / "run", "--steps", 1, "--cross-tokenizer-loss", "gold")
    assert result.exit_code == 2
    assert result.stderr == ("error: unknown --cross-tokenizer-loss 'gold'; use one of exact-map, uld, "
                             "exact-map+uld, prefix-map, prefix-groups, first-byte\n")


def test_a_cache_that_records_no_text_is_refused_in_one_line(student, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the format-1 fixture names its teacher as data/teacher
    result = train(REPO / "tests" / "fixtures" / "cache_v1", student, tmp_path / "run", "--steps", 1, "--eval-every", 0)
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    assert result.stderr == (
        f"error: the student's tokenizer differs from the one cache {REPO / 'tests' / 'fixtures' / 'cache_v1'} "
        "was made with, and the cache records no text; re-capture it with this kdpipe (cache-teacher) to train a "
        "student with another tokenizer, or train with the teacher's tokenizer (--tokenizer DIR)\n")


def test_a_student_tokenizer_that_normalises_the_text_is_refused_in_one_line(text_cache, student, tmp_path):
    lowercase = tmp_path / "tokenizer-lowercase"
    lowercase.mkdir()
    definition = json.loads((UNIGRAM / "tokenizer.json").read_text())
    definition["normalizer"] = {"type": "Lowercase"}
    (lowercase / "tokenizer.json").write_text(json.dumps(definition))
    (lowercase / "tokenizer_config.json").write_text((UNIGRAM / "tokenizer_config.json").read_text())
    result = run_cli("train-student", "--cache", text_cache, "--student", student, "--tokenizer", lowercase,
                     "--out", tmp_path / "run", "--steps", 1, "--device", "cpu")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    assert result.stderr.startswith("error: the student's tokenizer differs") and result.stderr.count("\n") == 1
    assert "normalises the text it tokenises (Lowercase)" in result.stderr


@pytest.mark.slow
def test_a_chat_cache_re_tokenised_by_the_student_aligns_only_inside_assistant_turns(tmp_path):
    import numpy as np
    from transformers import AutoTokenizer

    from kdpipe.pipeline.cache.reader import TeacherCache
    from kdpipe.pipeline.cache.text_spans import row_text
    from kdpipe.pipeline.train.xtok.align import StudentTokenizer, student_row
    from kdpipe.pipeline.train.xtok.vocab_map import shared_token_map

    result = run_cli("cache-teacher", "--teacher", REPO / "data" / "teacher", "--data",
                     REPO / "data" / "chat" / "train.jsonl", "--out", tmp_path / "chat", "--top-k", 8, "--seq-len", 128,
                     "--temperature", 1, "--limit-rows", 6, "--device", "cpu")
    assert result.exit_code == 0, result.output
    cache = TeacherCache(tmp_path / "chat")
    unigram = AutoTokenizer.from_pretrained(UNIGRAM)
    student = StudentTokenizer.of(unigram, shared_token_map(AutoTokenizer.from_pretrained(REPO / "data" / "teacher"),
                                                            unigram).student_bytes)
    decoded, pairs = cache.read_rows(0, 0, 6), 0
    for i in range(6):
        text = row_text(cache.schema, {k: v[i] for k, v in decoded.items()})
        kd_mask = decoded["mask"][i].astype(bool)
        row = student_row(text.text, text.token_spans, text.segments, kd_mask, student, chat=True)
        for s, t in zip(row.student_positions, row.teacher_positions):  # same byte end, inside an assistant turn
            assert row.ends[s] == text.token_spans[t, 1] and kd_mask[t]
            assert any(kind == "assistant" and a < row.ends[s] <= b for kind, a, b in text.segments)
        teacher_ends = {int(e) for (a, e), m in zip(text.token_spans, kd_mask) if e > a and m}
        assert {int(row.ends[s]) for s in row.student_positions} == teacher_ends & {int(e) for e in row.ends if e >= 0}
        head, _ = student.template(text.segments[0][0])
        assert row.input_ids[: len(head)].tolist() == head  # the student's own template opens the row
        pairs += len(row.student_positions)
    assert pairs > 20


def test_a_student_vocabulary_smaller_than_its_tokenizer_is_refused_in_one_line(text_cache, tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**STUDENT, "vocab_size": 1000}))
    result = train(text_cache, small, tmp_path / "run", "--steps", 1)
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    assert result.stderr == ("error: the student's vocabulary (1000) does not cover the 1500 tokens of its tokenizer; "
                             "give the student a vocab_size of at least that\n")


def test_a_resumed_cross_tokenizer_run_ends_bit_identical_and_a_changed_loss_is_refused(text_cache, student, tmp_path,
                                                                                         one_thread):
    from kdpipe.pipeline.train.config import TrainConfig
    from tests.train.crash import train as train_with

    def run(out, *, resume=False, stop_after=None):
        config = TrainConfig(cache=str(text_cache), student=str(student), tokenizer=str(UNIGRAM), out=str(out), steps=4,
                             batch_size=4, checkpoint_every=2, log_every=1, eval_every=0, lr=3e-3, seed=0, device="cpu")
        config.validate()
        train_with(config, resume=resume, stop_after=stop_after)

    run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=3)
    result = run_cli("train-student", "--out", tmp_path / "cut", "--resume", "--cross-tokenizer-loss", "exact-map")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert 'settings.cross_tokenizer_loss (was "prefix-groups", now "exact-map")' in result.stderr, result.stderr
    run(tmp_path / "cut", resume=True)
    full, cut = (tmp_path / "full" / "model" / "model.safetensors"), (tmp_path / "cut" / "model" / "model.safetensors")
    assert full.read_bytes() == cut.read_bytes()
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["cross_tokenizer"]["loss"] == "prefix-groups"
