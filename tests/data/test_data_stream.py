"""Row blocks (kdpipe.pipeline.data.stream) and packing (.packing), on the demo teacher's real BPE
tokenizer and the shipped plays and chat data: the rows do not depend on workers or ranks, each
block is tokenised once, limits cut exactly, and chat rows mask exactly the assistant targets."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kdpipe import open_cache
from kdpipe.pipeline.data import BlockStream, Fields, PackingSpec, resolve_source
from kdpipe.pipeline.data import stream as streamlib
from kdpipe.pipeline.data.chat import render_conversation
from kdpipe.stages.cli import main

DATA = Path(__file__).resolve().parents[2] / "data"
SEQ_LEN = 64
BLOCK_CHARS = 20_000


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DATA / "teacher")


@pytest.fixture(scope="module")
def plays(tmp_path_factory) -> Path:
    """Three shipped plays as JSON Lines, one speech per record (~400k characters, ~20 blocks)."""
    speeches = [s for f in sorted((DATA / "shakespeare" / "train").glob("*.txt"))[:3]
                for s in f.read_text().split("\n\n") if s.strip()]
    path = tmp_path_factory.mktemp("plays") / "plays.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    return path


def blocks_of(data: Path, tokenizer, **options) -> list:
    spec = PackingSpec("causal-lm", SEQ_LEN, tokenizer)
    return list(BlockStream(resolve_source(str(data)), spec, block_chars=BLOCK_CHARS, **options))


def assert_same_blocks(a: list, b: list) -> None:
    assert [x.index for x in a] == [y.index for y in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.rows.inputs, y.rows.inputs)
        np.testing.assert_array_equal(x.rows.mask, y.rows.mask)
        np.testing.assert_array_equal(x.rows.attention_mask, y.rows.attention_mask)
        np.testing.assert_array_equal(x.sample_index, y.sample_index)
        assert x.tokens == y.tokens


@pytest.fixture(scope="module")
def whole(plays, tokenizer) -> list:
    """Every block of the plays, one rank, tokenised inline."""
    blocks = blocks_of(plays, tokenizer)
    assert len(blocks) >= 10
    return blocks


@pytest.fixture
def packed_blocks(monkeypatch) -> list:
    """Records which block each call to ``pack`` tokenises (by its first document), passing through."""
    calls = []
    pack = streamlib.pack

    def counting_pack(spec, docs, **limits):
        calls.append(docs[0].where)
        return pack(spec, docs, **limits)

    monkeypatch.setattr(streamlib, "pack", counting_pack)
    return calls


def block_by_first_document(calls: list) -> dict:
    """``{first document: block index}`` from the calls of a one-rank run (each block once, in order)."""
    return {where: index for index, where in enumerate(calls)}


# ----------------------------------------------------------------------------- workers and ranks
def test_rows_do_not_depend_on_the_number_of_workers(plays, tokenizer, whole):
    assert_same_blocks(blocks_of(plays, tokenizer, num_workers=2), whole)
    for block in whole:
        n = len(block.rows)
        np.testing.assert_array_equal(block.sample_index, (block.index << 32) + np.arange(n))
        assert block.tokens == block.rows.mask.sum() and n == -(-block.tokens // SEQ_LEN)


def test_ranks_split_the_blocks_and_tokenise_each_once(plays, tokenizer, whole, packed_blocks):
    blocks_of(plays, tokenizer)
    block_of = block_by_first_document(packed_blocks)
    assert len(block_of) == len(whole)
    packed_blocks.clear()
    by_rank = {rank: blocks_of(plays, tokenizer, rank=rank, world_size=3) for rank in range(3)}
    for rank, blocks in by_rank.items():
        assert [b.index for b in blocks] == [b.index for b in whole if b.index % 3 == rank]
    union = sorted((b for blocks in by_rank.values() for b in blocks), key=lambda b: b.index)
    assert_same_blocks(union, whole)
    tokenised = collections.Counter(block_of[where] for where in packed_blocks)
    assert tokenised == {b.index: 1 for b in whole}


def test_a_finished_block_is_not_tokenised(plays, tokenizer, whole, packed_blocks):
    blocks_of(plays, tokenizer)
    block_of = block_by_first_document(packed_blocks)
    packed_blocks.clear()
    done = {0, 3, len(whole) - 1}
    blocks = blocks_of(plays, tokenizer, skip=lambda index: index in done)
    assert_same_blocks(blocks, [b for b in whole if b.index not in done])
    assert sorted(block_of[where] for where in packed_blocks) == [b.index for b in whole if b.index not in done]


# ----------------------------------------------------------------------------- limits
def stream_rows(blocks: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of blocks in order: input ids [N, L], mask [N, L], sample_index [N]."""
    blocks = sorted(blocks, key=lambda b: b.index)
    return (np.concatenate([b.rows.inputs for b in blocks]), np.concatenate([b.rows.mask for b in blocks]),
            np.concatenate([b.sample_index for b in blocks]))


@pytest.mark.parametrize("world_size", [1, 2])
def test_limit_rows_gives_the_first_rows(plays, tokenizer, whole, world_size):
    ids, mask, keys = stream_rows(whole)
    first_block = len(whole[0].rows)
    for limit in (1, first_block - 1, first_block, first_block + 1, 3 * first_block + 5):
        blocks = [b for rank in range(world_size)
                  for b in blocks_of(plays, tokenizer, rank=rank, world_size=world_size, limit_rows=limit)]
        got_ids, got_mask, got_keys = stream_rows(blocks)
        assert len(got_ids) == limit
        np.testing.assert_array_equal(got_ids, ids[:limit])
        np.testing.assert_array_equal(got_mask, mask[:limit])
        np.testing.assert_array_equal(got_keys, keys[:limit])


@pytest.mark.parametrize("world_size", [1, 2])
def test_max_tokens_gives_the_first_tokens(plays, tokenizer, whole, world_size):
    ids, mask, keys = stream_rows(whole)
    tokens = ids[mask]
    first_block = whole[0].tokens
    for limit in (1, SEQ_LEN + 1, first_block - 1, first_block, first_block + 7, 3 * first_block + 100):
        blocks = [b for rank in range(world_size)
                  for b in blocks_of(plays, tokenizer, rank=rank, world_size=world_size, max_tokens=limit)]
        got_ids, got_mask, got_keys = stream_rows(blocks)
        assert sum(b.tokens for b in blocks) == limit
        np.testing.assert_array_equal(got_ids[got_mask], tokens[:limit])
        # every row but the last is the unlimited stream's row; the last is cut where the limit falls
        np.testing.assert_array_equal(got_keys, keys[: len(got_keys)])
        np.testing.assert_array_equal(got_ids[:-1], ids[: len(got_ids) - 1])
        last = got_mask[-1]
        assert last[: last.sum()].all() and not last[last.sum():].any()


def test_limit_rows_on_a_large_corpus_returns_in_seconds(tiny_lm_dir, tmp_path):
    from transformers import AutoTokenizer

    play = (DATA / "shakespeare" / "heldout" / "twelfth_night.txt").read_text()
    lines = [json.dumps({"text": speech}) + "\n" for speech in play.split("\n\n")]
    chunk = "".join(lines).encode()
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "wb") as f:
        for _ in range(-(-100 * 2**20 // len(chunk))):
            f.write(chunk)
    corpus_chars = corpus.stat().st_size  # ASCII text: one byte per character

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    sample = [json.loads(line)["text"] for line in lines]
    started = time.perf_counter()
    tokenizer(sample, add_special_tokens=False)
    chars_per_s = len(chunk) / (time.perf_counter() - started)  # JSON syntax counted too: errs fast
    full_tokenisation_s = corpus_chars / chars_per_s

    out = tmp_path / "cache"
    args = ["cache-teacher", "--teacher", tiny_lm_dir, "--data", corpus, "--out", out, "--seq-len", 32,
            "--top-k", 4, "--limit-rows", 10, "--num-workers", 0]
    started = time.perf_counter()
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    elapsed = time.perf_counter() - started
    corpus.unlink()  # 100 MB: not left in pytest's kept temporary folders
    assert result.exit_code == 0, result.output
    assert elapsed < 0.2 * full_tokenisation_s and elapsed < 30, (elapsed, full_tokenisation_s)

    cache = open_cache(out)
    eos = [tokenizer.eos_token_id]
    first = np.concatenate([tokenizer(s, add_special_tokens=False)["input_ids"] + eos for s in sample[:40]])
    assert len(cache) == 10 and cache.manifest["totals"]["tokens"] == 320
    np.testing.assert_array_equal(np.concatenate([cache.read(i)["input_ids"] for i in range(10)]), first[:320])


# ----------------------------------------------------------------------------- chat packing
@pytest.fixture(scope="module")
def conversations() -> list:
    """The first 40 shipped chat conversations (59 to 191 tokens with the demo teacher's template)."""
    with open(DATA / "chat" / "train.jsonl") as f:
        records = [json.loads(line) for _, line in zip(range(40), f)]
    return [Fields().document(f"train.jsonl:{n}", r) for n, r in enumerate(records, start=1)]


def rendered(conversations, tokenizer, targets: str) -> list[tuple[np.ndarray, np.ndarray]]:
    return [render_conversation(d.messages, tokenizer, targets=targets, where=d.where) for d in conversations]


def assert_row_holds(row_ids, row_mask, row_attention, parts, pad_id) -> None:
    """A row holds the conversations ``parts`` ((ids, is_target) each) back to back, then padding;
    mask[t] == is_target[t + 1] inside a conversation, False at its last token and on padding."""
    at = 0
    for ids, is_target in parts:
        n = len(ids)
        np.testing.assert_array_equal(row_ids[at : at + n], ids)
        np.testing.assert_array_equal(row_mask[at : at + n - 1], is_target[1:])
        assert not row_mask[at + n - 1]  # the next token belongs to the next conversation, or is padding
        at += n
    assert (row_ids[at:] == pad_id).all() and not row_mask[at:].any()
    assert (row_attention[:at] == 1).all() and (row_attention[at:] == 0).all()


@pytest.mark.parametrize("targets", ["assistant", "all"])
def test_chat_rows_hold_one_conversation_each(conversations, tokenizer, targets):
    L = 128
    spec = PackingSpec("causal-lm", L, tokenizer, chat=True, targets=targets)
    packed = streamlib.pack(spec, conversations)
    convs = rendered(conversations, tokenizer, targets)
    assert len(packed.rows) == len(conversations)
    assert packed.truncated_rows == sum(len(ids) > L for ids, _ in convs) > 0
    assert packed.tokens == sum(min(len(ids), L) for ids, _ in convs)
    for r, (ids, is_target) in enumerate(convs):
        rows = packed.rows
        assert_row_holds(rows.inputs[r], rows.mask[r], rows.attention_mask[r], [(ids[:L], is_target[:L])], spec.pad_id)


def test_truncated_conversations_are_counted_only_when_kept(conversations, tokenizer):
    spec = PackingSpec("causal-lm", 16, tokenizer, chat=True)  # every conversation is longer than 16 tokens
    packed = streamlib.pack(spec, conversations, max_rows=2)
    assert len(packed.rows) == 2 and packed.truncated_rows == 2


@pytest.mark.parametrize("targets", ["assistant", "all"])
def test_chat_packing_puts_whole_conversations_in_a_row(conversations, tokenizer, targets):
    L = 256
    spec = PackingSpec("causal-lm", L, tokenizer, chat=True, targets=targets, packing=True)
    packed = streamlib.pack(spec, conversations)
    convs = rendered(conversations, tokenizer, targets)
    layout: list[list[int]] = []  # conversation indices of each row: greedy, in order, while they fit
    used = L
    for i, (ids, _) in enumerate(convs):
        if used + len(ids) > L:
            layout.append([])
            used = 0
        layout[-1].append(i)
        used += len(ids)
    assert max(len(row) for row in layout) >= 3 and len(layout) < 0.6 * len(convs)
    assert packed.truncated_rows == 0 and packed.tokens == sum(len(ids) for ids, _ in convs)
    assert len(packed.rows) == len(layout)
    for r, members in enumerate(layout):
        rows = packed.rows
        assert_row_holds(rows.inputs[r], rows.mask[r], rows.attention_mask[r], [convs[i] for i in members], spec.pad_id)
