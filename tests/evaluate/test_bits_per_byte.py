"""``kdpipe evaluate`` reports bits per byte (pipeline/evaluate/bits_per_byte.py): it equals a hand
computation with the Hugging Face model and tokenizer alone, and two tokenizers count the same bytes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kdpipe.stages.cli import main

REPO = Path(__file__).resolve().parents[2]
PLAY = next((REPO / "data" / "shakespeare" / "heldout").glob("*.txt")).read_text()
DOCS = [PLAY[:700], "Ünïcödé — “quoted”, 日本語, 😀.\n", PLAY[5000:5400]]
SEQ_LEN = 16


def evaluate(model, data, *extra) -> dict:
    result = CliRunner().invoke(main, ["evaluate", "--model", str(model), "--data", str(data), "--seq-len",
                                       str(SEQ_LEN), "--batch-size", "3", "--json", *map(str, extra)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpb") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


@pytest.fixture(scope="module")
def unigram_model(tmp_path_factory) -> Path:
    """The shipped unigram student config (random weights) with the shipped Unigram tokenizer."""
    out = tmp_path_factory.mktemp("unigram_student")
    config = json.loads((REPO / "data" / "students" / "lm-student-unigram.json").read_text())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "data" / "tokenizer-unigram" / name, out / name)
    return out


@torch.no_grad()
def hand_bits_per_byte(model_dir: Path) -> tuple[float, int, int]:
    """Every token of the stream doc, EOS, doc, EOS, ... scored with the context the rows give it:
    rows of SEQ_LEN tokens; a row's first token from the previous row's last position; the first
    token after EOS alone. Bytes: the documents' UTF-8 bytes."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos = tokenizer.eos_token_id
    stream = [t for d in DOCS for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
    rows = [stream[i : i + SEQ_LEN] for i in range(0, len(stream), SEQ_LEN)]
    nll, previous_last = 0.0, torch.log_softmax(model(torch.tensor([[eos]])).logits[0, -1], -1)
    for row in rows:
        logprobs = torch.log_softmax(model(torch.tensor([row])).logits[0], -1)  # [n, V]
        nll -= float(previous_last[row[0]]) + sum(float(logprobs[t, row[t + 1]]) for t in range(len(row) - 1))
        previous_last = logprobs[-1]
    n_bytes = sum(len(d.encode()) for d in DOCS)
    return nll / (math.log(2) * n_bytes), n_bytes, len(stream)


@pytest.mark.parametrize("family", ["bpe", "unigram"])
def test_bits_per_byte_equals_a_hand_computation(family, data, unigram_model):
    model = REPO / "data" / "teacher" if family == "bpe" else unigram_model
    result = evaluate(model, data)
    bits, n_bytes, n_tokens = hand_bits_per_byte(model)
    assert result["bytes"] == n_bytes and result["bpb_tokens"] == n_tokens
    assert result["bits_per_byte"] == pytest.approx(bits, rel=1e-5)
    assert result["tokens"] < n_tokens  # the per-token ce leaves each row's first token out; bpb does not


@pytest.mark.slow
def test_two_tokenizers_count_the_same_bytes_of_a_long_text(tmp_path, unigram_model):
    """A whole play as one .txt file (read in pieces): both count every byte of it."""
    (tmp_path / "play.txt").write_text(PLAY[:80_000])
    bpe = evaluate(REPO / "data" / "teacher", tmp_path / "play.txt", "--seq-len", 256, "--batch-size", 16)
    unigram = evaluate(unigram_model, tmp_path / "play.txt", "--seq-len", 256, "--batch-size", 16)
    assert bpe["bytes"] == unigram["bytes"] == len(PLAY[:80_000].encode())
    assert bpe["bpb_tokens"] != unigram["bpb_tokens"]  # two tokenizations of the same bytes
    assert 1.0 < bpe["bits_per_byte"] < 3.0 < unigram["bits_per_byte"]  # the trained teacher vs random weights
