"""What a text cache records for students with another tokenizer (pipeline/cache/text_spans.py),
captured through the real CLI with both tokenizer families and read back: every row's tokens spell
its text, each token's bytes are what the token stands for (brute force), the rows' texts joined give
the documents back, chat segments are the message contents; and what it costs in bytes/token."""

from __future__ import annotations

import functools
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from kdpipe import open_cache
from kdpipe.pipeline.cache.text_spans import has_text, row_text
from kdpipe.stages.cli import main

REPO = Path(__file__).resolve().parents[2]
TEACHER, UNIGRAM = REPO / "data" / "teacher", REPO / "data" / "tokenizer-unigram"
PLAY = next((REPO / "data" / "shakespeare" / "heldout").glob("*.txt")).read_text()
SEQ_LEN = 64


def capture(teacher, data, out, *extra) -> Path:
    args = ["cache-teacher", "--teacher", teacher, "--data", data, "--out", out, "--seq-len", SEQ_LEN, "--top-k", 8,
            "--num-workers", 0, *extra]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def rows_of(cache_dir: Path) -> list[tuple[dict, object]]:
    """Every row of the cache in sample_index order, with its RowText."""
    cache = open_cache(cache_dir)
    assert has_text(cache.schema)
    rows = []
    for shard in range(len(cache.shards)):
        batch = cache.read_rows(shard, 0, cache.shards[shard]["rows"])
        rows += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["sample_index"]))]
    rows.sort(key=lambda r: int(r["sample_index"]))
    return [(row, row_text(cache.schema, row)) for row in rows]


def token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's bytes from its string (no kdpipe code): added tokens, byte pieces, metaspace, byte level."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token in tokenizer.get_added_vocab():
        return token.encode()
    if "▁" in tokenizer.get_vocab():
        if token.startswith("<0x") and len(token) == 6:
            return bytes([int(token[3:5], 16)])
        return token.replace("▁", " ").encode()
    return bytes(byte_level_alphabet()[c] for c in token)


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """The byte-level pre-tokenizer's character for each byte (as tests/data/test_byte_spans.py finds it)."""
    from tokenizers import pre_tokenizers

    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = {}
    for code in [*range(1, 0x800), *range(0x800, 0xD800, 0x800), *range(0xE000, 0x10000, 0x800),
                 *range(0x10000, 0x110000, 0x4000)]:
        (mapped, _), = level.pre_tokenize_str(chr(code))
        alphabet.update(zip(mapped, chr(code).encode()))
    return alphabet


def check_rows(rows, tokenizer) -> None:
    """Each row: the spans tile the text; a token's span holds its bytes, but for a segment's first
    token, which may carry a prepended space or template text before the segment (then its bytes end
    with the span's); tokens without text cover nothing; segments tile the text."""
    for row, text in rows:
        spans = text.token_spans
        assert b"".join(text.text[s:e] for s, e in spans) == text.text
        firsts = {int(np.argmax(spans[:, 1] > start)) for _, start, _ in text.segments}
        for t, (token_id, (s, e)) in enumerate(zip(row["input_ids"].tolist(), spans.tolist())):
            if s == e:
                continue
            expected = token_bytes(tokenizer, token_id)
            assert expected == text.text[s:e] or (t in firsts and expected.endswith(text.text[s:e])), (t, expected)
        bounds = [(s, e) for _, s, e in text.segments]
        assert [b for b, _ in bounds] == [0] + [e for _, e in bounds[:-1]]
        assert not bounds or bounds[-1][1] == len(text.text)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    """Three documents: a long one (rows start mid-document), one with non-ASCII text, a short one."""
    folder = tmp_path_factory.mktemp("docs")
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in [
        PLAY[:9000], "Ünïcödé — “quotes”, 日本語 and 😀 in a play: ﬁn.\n", "Exeunt.",
    ]) + "\n")
    return folder / "a.jsonl"


@pytest.fixture(scope="module")
def unigram_teacher(tmp_path_factory) -> Path:
    """A random Llama (vocab 1500) with the shipped Unigram tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("unigram_teacher")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                                 eos_token_id=0, bos_token_id=1, pad_token_id=0)).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(UNIGRAM / name, out / name)
    return out


@pytest.mark.parametrize("family", ["bpe", "unigram"])
def test_text_rows_spell_their_documents(family, docs, unigram_teacher, tmp_path):
    teacher = TEACHER if family == "bpe" else unigram_teacher
    rows = rows_of(capture(teacher, docs, tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    check_rows(rows, tokenizer)
    documents = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    # joined in order, the rows' texts are the documents' texts joined (packed with EOS between them)
    assert b"".join(text.text for _, text in rows) == "".join(documents).encode()
    # segments start at every document's start and at every row's start (a row may start mid-document)
    row_starts = np.cumsum([0] + [len(text.text) for _, text in rows[:-1]])
    segment_starts = {int(at) + s for at, (_, text) in zip(row_starts, rows) for _, s, _ in text.segments}
    document_starts = np.cumsum([0] + [len(d.encode()) for d in documents[:-1]])
    assert set(document_starts.tolist()) | {int(a) for a, (_, t) in zip(row_starts, rows) if t.text} == segment_starts
    assert {kind for _, text in rows for kind, _, _ in text.segments} == {"text"}
    eos = tokenizer.eos_token_id
    for row, text in rows:  # EOS and padding cover no text
        assert (text.token_spans[row["input_ids"] == eos, 1] == text.token_spans[row["input_ids"] == eos, 0]).all()
    assert len(rows) > 3 and any(text.segments[0][1] == 0 and row["input_ids"][0] != eos for row, text in rows[1:])


def test_chat_rows_hold_the_message_contents(tmp_path):
    lines = (REPO / "data" / "chat" / "train.jsonl").read_text().splitlines()[:12]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    rows = rows_of(capture(TEACHER, data, tmp_path / "cache", "--seq-len", 256))
    check_rows(rows, AutoTokenizer.from_pretrained(TEACHER))
    for (row, text), line in zip(rows, lines):
        messages = json.loads(line)["messages"]
        got = [(kind, text.text[s:e].decode()) for kind, s, e in text.segments]
        n_tokens = int(row["text_lengths"].astype(bool).sum())
        if row["input_ids"][-1] == 0 and n_tokens:  # not truncated: every message's content, whole
            assert got == [(m["role"], m["content"]) for m in messages if m["content"]], got
        else:  # truncated: a prefix of them
            assert all(kind == m["role"] for (kind, _), m in zip(got, messages))


def test_text_costs_a_few_bytes_per_token(docs, tmp_path):
    """Stored (compressed) bytes of the text fields per real token, from the zarr shard's entries."""
    out = capture(TEACHER, docs, tmp_path / "cache")
    cache = open_cache(out)
    tokens = sum(s["tokens"] for s in cache.shards)
    text_bytes = total = 0
    for shard in (out / "shards").glob("*.zarr.zip"):
        with zipfile.ZipFile(shard) as zf:
            for info in zf.infolist():
                total += info.file_size
                text_bytes += info.file_size if info.filename.startswith("text_") else 0
    per_token = text_bytes / tokens
    print(f"text fields: {per_token:.2f} B/token of {total / tokens:.1f} B/token stored")
    assert 0.5 < per_token < 3.0  # the text itself (~3 B/token raw) compresses; the padding costs ~nothing


def test_no_text_captures_without_it(docs, tmp_path):
    out = capture(TEACHER, docs, tmp_path / "cache", "--no-text", "--limit-rows", 2)
    cache = open_cache(out)
    assert not has_text(cache.schema) and "text_lengths" not in cache.read_rows(0, 0, 1)
    assert cache.manifest["data"]["packing"]["text"] == "not recorded: --no-text"
