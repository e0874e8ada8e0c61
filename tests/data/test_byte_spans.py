"""Exact byte spans of both shipped tokenizer families (pipeline/data/byte_spans.py), brute-force
checked: the spans tile the text, and every span's bytes are what its token stands for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdpipe.pipeline.data.byte_spans import char_byte_offsets, token_byte_spans
from kdpipe.pipeline.errors import ConfigError, DataError
from kdpipe.stages.cli import main

REPO = Path(__file__).resolve().parents[2]
BPE, UNIGRAM = REPO / "data" / "tokenizer", REPO / "data" / "tokenizer-unigram"
HELDOUT = next((REPO / "data" / "shakespeare" / "heldout").glob("*.txt")).read_text()
TEXTS = [
    HELDOUT[:6000],
    "  leading spaces, tabs\tand\n\nnewlines  ",
    "Unicode: héllo wörld, ñ, 日本語, emoji 😀👍🏽, math ∑ x²",
    "special <|endoftext|> and </s> typed in text, and a byte piece <0x41>",
    "", "a", " ", "\n",
]


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level pre-tokenizer's character for each byte, found by running it (the tokenizers
    library, not kdpipe) over characters whose UTF-8 bytes cover every byte valid UTF-8 can hold."""
    from tokenizers import pre_tokenizers

    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = {}
    codes = [*range(1, 0x800), *range(0x800, 0xD800, 0x800), *range(0xE000, 0x10000, 0x800),
             *range(0x10000, 0x110000, 0x4000)]
    for code in codes:
        char = chr(code)
        (mapped, _), = level.pre_tokenize_str(char)
        alphabet.update(zip(mapped, char.encode()))
    return alphabet


def token_bytes_brute(tokenizer, token_id: int, family: str) -> bytes:
    """What a token stands for, from its string alone: byte pieces, added tokens, metaspace, byte level."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token in tokenizer.get_added_vocab():
        return token.encode()
    if family == "unigram":
        if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode()
    alphabet = ALPHABET or ALPHABET.update(byte_level_alphabet()) or ALPHABET
    return bytes(alphabet[c] for c in token)


ALPHABET: dict[str, int] = {}


@pytest.fixture(scope="module", params=[BPE, UNIGRAM], ids=["bpe", "unigram"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.param)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_spans_tile_the_text_and_each_is_its_tokens_bytes(tokenizer, text):
    family = "unigram" if "unigram" in tokenizer.name_or_path else "bpe"
    ids, spans = token_byte_spans(tokenizer, text)
    data = text.encode("utf-8")
    assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(data[s:e] for s, e in spans) == data  # re-tokenised text == the original
    assert (spans[1:, 0] == spans[:-1, 1]).all() and (len(spans) == 0 or spans[0, 0] == 0)
    prepended = 0
    for i, (token_id, (s, e)) in enumerate(zip(ids.tolist(), spans.tolist())):
        expected = token_bytes_brute(tokenizer, token_id, family)
        if expected != data[s:e]:  # only the space a metaspace tokenizer prepends to the text is not in it
            assert expected == b" " + data[s:e] and i == 0 and family == "unigram", (i, expected, data[s:e])
            prepended += 1
    assert prepended <= 1


def test_byte_fallback_and_split_characters_share_their_character(tokenizer):
    ids, spans = token_byte_spans(tokenizer, "x😀")
    assert spans.tolist()[-4:] == [[1, 2], [2, 3], [3, 4], [4, 5]]  # 4 bytes, one token each (not in either vocabulary)


def test_char_byte_offsets():
    text = "aé日😀"
    assert char_byte_offsets(text).tolist() == [len(text[:i].encode()) for i in range(len(text) + 1)]


def _with_normalizer(normalizer: dict) -> PreTrainedTokenizerFast:
    spec = json.loads((BPE / "tokenizer.json").read_text())
    spec["normalizer"] = normalizer
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   name_or_path="lowercasing-bpe")


NORMALIZERS = [{"type": "Lowercase"}, {"type": "NFKC"},
               {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "StripAccents"}]}]


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_a_normalising_tokenizer_is_refused_in_one_line(normalizer):
    with pytest.raises(ConfigError) as caught:
        token_byte_spans(_with_normalizer(normalizer), "already lowercase text")  # refused whatever the text
    message = str(caught.value)
    assert "\n" not in message and "lowercasing-bpe" in message and "normalises" in message
    assert "non-normalising" in message or "keeps the text as it is" in message


def test_a_tokenizer_whose_tokens_do_not_spell_the_text_is_refused():
    spec = json.loads((UNIGRAM / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = False  # unseen characters become <unk>
    spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>")
    token_byte_spans(tok, "plain words")  # fine where no character is unknown
    with pytest.raises(DataError, match="do not spell the text"):
        token_byte_spans(tok, "日本")


def test_capture_with_a_normalising_teacher_records_no_text_and_says_why(tmp_path, tiny_lm_dir):
    """The cache still works for same-tokenizer students; the manifest says why it has no text."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for f in tiny_lm_dir.iterdir():
        (teacher / f.name).write_bytes(f.read_bytes())
    spec = json.loads((teacher / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (teacher / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "d.txt").write_text(HELDOUT[:3000].lower())
    result = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(teacher), "--data", str(tmp_path / "d.txt"),
                                       "--out", str(tmp_path / "c"), "--seq-len", "32", "--top-k", "4",
                                       "--limit-rows", "2", "--num-workers", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert "text_token_bytes" not in manifest["schema"]
    why = manifest["data"]["packing"]["text"]
    assert why.startswith("not recorded: tokenizer") and "Lowercase" in why


@pytest.mark.slow
def test_the_shipped_unigram_tokenizer_is_made_by_its_script(tmp_path):
    subprocess.run([sys.executable, str(REPO / "data" / "make_tokenizer_unigram.py"), str(tmp_path)], check=True,
                   capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (UNIGRAM / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(UNIGRAM)
    assert len(tok) == 1500 and tok.eos_token_id == 0 and tok.bos_token_id == 1
    student = json.loads((REPO / "data" / "students" / "lm-student-unigram.json").read_text())
    reference = json.loads((REPO / "data" / "students" / "lm-student.json").read_text())
    assert student["vocab_size"] == len(tok)
    assert {k: v for k, v in student.items() if not k.endswith("_id") and k != "vocab_size"} == \
        {k: v for k, v in reference.items() if not k.endswith("_id") and k != "vocab_size"}
    assert np.mean([len(t) for t in tok.tokenize(HELDOUT[:5000])]) > 1.5  # real pieces, not characters
