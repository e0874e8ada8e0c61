"""Which teacher token and which student token are the same event: the same decoded **bytes**.

Token strings are never compared: a byte-level BPE writes a space as ``Ġ`` and a byte as one of 256
printable stand-ins, a SentencePiece-style tokenizer writes a space as ``▁`` and a byte it has no piece
for as ``<0xNN>``. :func:`token_bytes` turns every id into the bytes it stands for in running text
(``None`` for special tokens, which stand for no text), and :func:`shared_token_map` pairs the ids of
two tokenizers whose bytes are equal.

The map is one-to-one, so that a student bin never collects two teacher bins: where several ids of one
tokenizer have the same bytes (a Unigram piece ``a`` and its byte-fallback twin ``<0x61>``), the one a
tokenizer emits for that text is kept (the piece, not the byte-fallback token; then the lowest id), and
the others stay unmapped. The two end-of-sequence tokens are paired too (both predict "the document
ends here"), when both tokenizers have one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import numpy as np

from kdpipe.pipeline.errors import ConfigError

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in of each byte in byte-level BPE (GPT-2's table), inverted: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _decoder_steps(tokenizer) -> list[dict]:
    """The steps of the tokenizer's decoder (a ``Sequence`` flattened), from its backend definition."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; "
                          "cross-tokenizer training needs tokenizer.json (a fast tokenizer)")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each id ``0 .. len(tokenizer) - 1`` stands for in running text; None for special tokens.

    Byte-level BPE: the token string through GPT-2's byte table. SentencePiece style (a ``Metaspace``
    or ``Replace ▁`` decoder): ``▁`` is a space, ``<0xNN>`` (byte fallback) is byte ``NN``, anything
    else its UTF-8. Raises ConfigError for a decoder of another kind (WordPiece ``##``, ...).
    """
    steps = _decoder_steps(tokenizer)
    kinds = {step.get("type") for step in steps}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if "ByteLevel" in kinds:
        alphabet = _byte_level_alphabet()
        convert = lambda piece: bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()  # noqa: E731
    elif kinds & {"Metaspace", "Replace"}:
        space = next((s.get("replacement") for s in steps if s.get("type") == "Metaspace"), None) or "▁"
        fallback = "ByteFallback" in kinds

        def convert(piece: str) -> bytes:
            match = _BYTE_FALLBACK.match(piece) if fallback else None
            return bytes([int(match.group(1), 16)]) if match else piece.replace(space, " ").encode()
    else:
        raise ConfigError(f"cannot tell which bytes the tokens of a tokenizer with a {'/'.join(sorted(map(str, kinds)))} "
                          "decoder stand for; cross-tokenizer training supports byte-level BPE and "
                          "SentencePiece-style (Metaspace, byte fallback) tokenizers")
    return [None if i in special or piece is None else convert(piece) for i, piece in enumerate(pieces)]


def _is_byte_fallback(tokenizer, token_id: int) -> bool:
    return bool(_BYTE_FALLBACK.match(tokenizer.convert_ids_to_tokens(token_id) or ""))


def _first_id_by_bytes(tokenizer, table: list[bytes | None]) -> dict[bytes, int]:
    """bytes -> the id a tokenizer emits for them: pieces before byte-fallback tokens, then the lowest id."""
    order = sorted((i for i, b in enumerate(table) if b), key=lambda i: (_is_byte_fallback(tokenizer, i), i))
    out: dict[bytes, int] = {}
    for i in order:
        out.setdefault(table[i], i)
    return out


@dataclasses.dataclass(frozen=True)
class SharedTokenMap:
    """``teacher_to_student[i]``: the student id with teacher id ``i``'s bytes, or -1 (int64 ``[V_t]``)."""

    teacher_to_student: np.ndarray
    student_bytes: list  # the student's token_bytes (its byte tokens let a row's broken UTF-8 edges through)

    @property
    def shared(self) -> int:
        """How many teacher ids have a student twin."""
        return int((self.teacher_to_student >= 0).sum())


def shared_token_map(teacher_tokenizer, student_tokenizer, *, teacher_vocab_size: int | None = None) -> SharedTokenMap:
    """The one-to-one map of teacher ids onto student ids with the same bytes (module doc).

    ``teacher_vocab_size``: rows of the teacher's logits (``>= len(teacher_tokenizer)``; ids past the
    tokenizer are padding and map to -1). Built once per pair of tokenizers (a few ms for 100k ids).
    """
    teacher_table, student_table = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    size = max(teacher_vocab_size or 0, len(teacher_table))
    mapping = np.full(size, -1, dtype=np.int64)
    student_by_bytes = _first_id_by_bytes(student_tokenizer, student_table)
    for value, teacher_id in _first_id_by_bytes(teacher_tokenizer, teacher_table).items():
        mapping[teacher_id] = student_by_bytes.get(value, -1)
    eos_t, eos_s = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if eos_t is not None and eos_s is not None:
        mapping[eos_t] = eos_s
    return SharedTokenMap(mapping, student_table)
