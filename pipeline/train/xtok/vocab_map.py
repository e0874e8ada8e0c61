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
import re

import numpy as np

from kdpipe.pipeline.data import byte_spans

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each id ``0 .. len(tokenizer) - 1`` stands for in running text; None for added (special)
    tokens. Byte-level BPE: the token string through GPT-2's byte table; SentencePiece style: ``▁`` is a
    space, ``<0xNN>`` (byte fallback) byte ``NN`` (:func:`kdpipe.pipeline.data.byte_spans.token_bytes`,
    which refuses other families and normalising tokenizers in one line)."""
    table = byte_spans.token_bytes(tokenizer)
    return [None if added else value for value, added in zip(table.table, table.added)]


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
    _pair_eos(mapping, teacher_tokenizer, student_tokenizer)
    return SharedTokenMap(mapping, student_table)


def prefix_token_map(teacher_tokenizer, student_tokenizer, *, teacher_vocab_size: int | None = None) -> SharedTokenMap:
    """Each teacher id onto the student id of the longest student token its bytes begin with (many to one).

    The student's next token, where the teacher's is `` kingdom``, is (about) the first token the student
    makes of those bytes: `` king`` for a student that writes `` king`` + ``dom``. This map gives the student's
    `` king`` the teacher's mass on `` king``, `` kingdom``, `` kings``, ... where the exact map gives it
    `` king``'s alone. Every teacher token with bytes is mapped when the student has byte tokens."""
    teacher_table, student_table = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    mapping = np.full(max(teacher_vocab_size or 0, len(teacher_table)), -1, dtype=np.int64)
    longest_prefix = _longest_prefix_finder(_first_id_by_bytes(student_tokenizer, student_table))
    for teacher_id, value in enumerate(teacher_table):
        if value:
            mapping[teacher_id] = longest_prefix(value)
    _pair_eos(mapping, teacher_tokenizer, student_tokenizer)
    return SharedTokenMap(mapping, student_table)


def _longest_prefix_finder(by_bytes: dict[bytes, int]):
    """``value -> the id of the longest key of by_bytes that value begins with (-1: none)``."""
    longest = max(map(len, by_bytes), default=0)

    def find(value: bytes) -> int:
        for n in range(min(len(value), longest), 0, -1):
            if value[:n] in by_bytes:
                return by_bytes[value[:n]]
        return -1

    return find


def _pair_eos(mapping: np.ndarray, teacher_tokenizer, student_tokenizer) -> None:
    eos_t, eos_s = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if eos_t is not None and eos_s is not None:
        mapping[eos_t] = eos_s


@dataclasses.dataclass(frozen=True)
class TokenGroups:
    """Both vocabularies cut into the same ``count`` groups: ``teacher_group [V_t]`` and ``student_group
    [len(student tokenizer)]``, int64 group numbers, -1 for ids in no group (special tokens, padding)."""

    teacher_group: np.ndarray
    student_group: np.ndarray
    count: int


def prefix_groups(teacher_tokenizer, student_tokenizer, *, teacher_vocab_size: int | None = None) -> TokenGroups:
    """The groups of tokens joined by the prefix relation, seen from both sides.

    Each teacher token is joined to the longest student token its bytes begin with (:func:`prefix_token_map`),
    each student token to the longest teacher token its bytes begin with, ids with the same bytes to each
    other, and the two EOS tokens; a group is a connected set. A group is then about the same event for
    both models, "the text goes on with this stem": a teacher's `` kingdom`` and a student's `` king`` fall
    in one group, and so do a teacher's `` k`` and the student's `` kill`` that the teacher would write
    `` k`` + ``ill``. Its mass is the sum of its tokens' probabilities on each side."""
    teacher_table, student_table = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    teacher_size = max(teacher_vocab_size or 0, len(teacher_table))
    parent = np.arange(teacher_size + len(student_table))  # teacher id i is node i, student id j node V_t + j

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = int(parent[node])
        return node

    def join(a: int, b: int) -> None:
        parent[root(a)] = root(b)

    teacher_by_bytes = _first_id_by_bytes(teacher_tokenizer, teacher_table)
    student_by_bytes = _first_id_by_bytes(student_tokenizer, student_table)
    for own, own_offset, by_bytes, other_offset, other_by_bytes in (
            (teacher_table, 0, teacher_by_bytes, teacher_size, student_by_bytes),
            (student_table, teacher_size, student_by_bytes, 0, teacher_by_bytes)):
        longest_prefix = _longest_prefix_finder(other_by_bytes)
        for token_id, value in enumerate(own):
            if not value:
                continue
            join(own_offset + token_id, own_offset + by_bytes[value])  # same bytes, one group
            other_id = longest_prefix(value)
            if other_id >= 0:
                join(own_offset + token_id, other_offset + other_id)
    eos_t, eos_s = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    grouped = np.zeros(len(parent), dtype=bool)
    grouped[:len(teacher_table)] = [bool(value) for value in teacher_table]
    grouped[teacher_size:] = [bool(value) for value in student_table]
    if eos_t is not None and eos_s is not None:
        join(eos_t, teacher_size + eos_s)
        grouped[eos_t] = grouped[teacher_size + eos_s] = True
    roots = np.array([root(node) for node in range(len(parent))])
    numbers: dict[int, int] = {}
    group = np.array([numbers.setdefault(int(r), len(numbers)) if g else -1 for r, g in zip(roots, grouped)],
                     dtype=np.int64)
    return TokenGroups(group[:teacher_size], group[teacher_size:], len(numbers))


def first_byte_groups(teacher_tokenizer, student_tokenizer, *,
                      teacher_vocab_size: int | None = None) -> TokenGroups:
    """Both vocabularies grouped by their tokens' first byte (256 groups, and one for the two EOS tokens).
    Exact on both sides: a model's probability that the next byte is ``b`` is the sum of its probabilities of
    the tokens that begin with ``b``, whatever its tokenizer."""
    teacher_table, student_table = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)

    def groups(table, size, eos):
        out = np.full(size, -1, dtype=np.int64)
        out[:len(table)] = [value[0] if value else -1 for value in table]
        if eos is not None and teacher_tokenizer.eos_token_id is not None and student_tokenizer.eos_token_id is not None:
            out[eos] = 256
        return out

    return TokenGroups(groups(teacher_table, max(teacher_vocab_size or 0, len(teacher_table)),
                              teacher_tokenizer.eos_token_id),
                       groups(student_table, len(student_table), student_tokenizer.eos_token_id), 257)
