"""Long documents are read and tokenised in pieces (issue 27.8): memory stays bounded whatever the line
length, and with a byte-level BPE tokenizer the rows equal those of the whole text tokenised at once."""

from __future__ import annotations

import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from kdpipe import open_cache
from kdpipe.pipeline.data import Fields, PackingSpec, pack, resolve_source
from kdpipe.pipeline.data.documents import PIECE_CHARS, Document, documents, text_pieces
from kdpipe.pipeline.data.readers import iter_records
from kdpipe.pipeline.errors import DataError

DATA = Path(__file__).resolve().parents[2] / "data"
SEQ_LEN = 64


def one_line(chars: int, seed: int = 0) -> str:
    """Words and single or double spaces, no newline: one long line of ``chars`` characters."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz,.'") for _ in range(rng.randint(1, 9))) for _ in range(2000)]
    parts, size = [], 0
    while size < chars:
        parts.append(rng.choice(words) + rng.choice((" ", " ", " ", "  ")))
        size += len(parts[-1])
    return "".join(parts)[:chars]


def test_pieces_rejoin_to_the_text_and_end_before_whitespace():
    text = one_line(5 * PIECE_CHARS + 123)
    chunks = [text[i : i + 10_000] for i in range(0, len(text), 10_000)]  # as a file is read
    pieces = list(text_pieces(chunks))
    assert "".join(p for p, _ in pieces) == text and [last for _, last in pieces] == [False] * 5 + [True]
    first = pieces[0][0]
    assert PIECE_CHARS // 2 <= len(first) <= PIECE_CHARS and text[len(first)].isspace()
    assert all(len(p) <= PIECE_CHARS and not p[-1].isspace() for p, last in pieces if not last)
    no_space = "x" * (2 * PIECE_CHARS + 5)
    assert [len(p) for p, _ in text_pieces([no_space])] == [PIECE_CHARS, PIECE_CHARS, 5]


def test_a_long_txt_packs_to_the_rows_of_the_whole_text(tmp_path):
    """The .txt is read in pieces (no EOS between them, one at its end); the demo teacher's byte-level
    BPE tokenises them to exactly the whole text's ids. A long text field of a record likewise."""
    tokenizer = AutoTokenizer.from_pretrained(DATA / "teacher")
    text = one_line(3 * PIECE_CHARS + 777, seed=1).replace("  ", "\n", 50)
    (tmp_path / "long.txt").write_text(text)
    docs = list(documents(iter_records(resolve_source(str(tmp_path / "long.txt"))), Fields()))
    assert len(docs) == 4 and [d.continues for d in docs] == [True, True, True, False]
    spec = PackingSpec("causal-lm", SEQ_LEN, tokenizer)
    whole = pack(spec, [Document(text)]).rows  # the text held whole, as before
    pieces = pack(spec, docs).rows
    np.testing.assert_array_equal(pieces.inputs, whole.inputs)
    np.testing.assert_array_equal(pieces.mask, whole.mask)
    record = list(documents([("r.jsonl:1", {"text": text}), ("r.jsonl:2", {"text": "short"})], Fields()))
    assert [d.continues for d in record] == [True, True, True, False, False]
    np.testing.assert_array_equal(pack(spec, record).rows.inputs, pack(spec, [Document(text), Document("short")]).rows.inputs)


def test_invalid_utf8_far_into_a_txt_names_its_byte(tmp_path):
    accents = tmp_path / "accents.txt"  # a two-byte character across the 1 MiB read boundary
    accents.write_bytes(b"a" * ((1 << 20) - 1) + "é tail".encode())
    assert "".join(d.text for d in documents(iter_records(resolve_source(str(accents))), Fields())).endswith("aé tail")
    path = tmp_path / "bad.txt"
    path.write_bytes(b"a" * (3 << 20) + b"\xff tail")
    with pytest.raises(DataError, match=rf"^{path} is not valid UTF-8 \(byte {3 << 20}\); re-encode it"):
        list(documents(iter_records(resolve_source(str(path))), Fields()))


def _capture_peak_rss_mb(data: Path, out: Path) -> float:
    """Run ``kdpipe cache-teacher`` in a child of a fresh process; the child's peak RSS in MB."""
    command = [sys.executable, "-c", "from kdpipe.stages.cli import main; main()", "cache-teacher", "--teacher",
               str(DATA / "teacher"), "--data", str(data), "--out", str(out), "--limit-rows", "20",
               "--seq-len", str(SEQ_LEN), "--top-k", "4", "--num-workers", "0"]
    measure = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.slow
def test_a_20_mb_single_line_captures_in_the_memory_of_a_short_one(tmp_path):
    """Before, the whole line was held and tokenised at once: 4.2 GB peak for 20 MB (8.26 GB for 50 MB)."""
    text = one_line(20_000_000, seed=2)
    (tmp_path / "big.txt").write_text(text)
    (tmp_path / "short.txt").write_text(text[:50_000])
    short_mb = _capture_peak_rss_mb(tmp_path / "short.txt", tmp_path / "short")
    big_mb = _capture_peak_rss_mb(tmp_path / "big.txt", tmp_path / "big")
    assert big_mb < short_mb + 150, (big_mb, short_mb)
    cache = open_cache(tmp_path / "big")
    ids = np.stack([cache.read(i)["input_ids"] for i in range(len(cache))])
    tokenizer = AutoTokenizer.from_pretrained(DATA / "teacher")
    expected = tokenizer(text[: text.index(" ", 20_000)], add_special_tokens=False)["input_ids"][: 20 * SEQ_LEN]
    assert ids.shape == (20, SEQ_LEN)
    np.testing.assert_array_equal(ids.reshape(-1), expected)
