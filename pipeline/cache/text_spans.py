"""The text a cache row's tokens cover, for students with another tokenizer (cross-tokenizer KD).

A causal-LM text or chat cache records, next to each row's ``input_ids``, the UTF-8 text the row's
tokens spell and each token's byte span in it, so that a student can re-tokenise the row with its own
tokenizer and align its positions with the teacher's (``KD-NOTES.md`` section 5). Three stored fields
(``schema.text_token_bytes = W``, the most bytes one teacher token covers; ``L`` input tokens):

==================  =======  =============  =====================================================
field               shape    dtype          meaning
==================  =======  =============  =====================================================
``text_lengths``    ``[L]``  uint8/uint16   bytes of the text each input token covers (0: none)
``text_segments``   ``[L]``  uint8          the token's segment kind, ``+ 128`` where one starts
``text_bytes``      ``[L*W]`` uint8         the row's text, zero-padded (its length: sum of lengths)
==================  =======  =============  =====================================================

Token ``t`` covers ``text[s_t : s_t + text_lengths[t]]`` with ``s_t`` the sum of the lengths before
it: the tokens tile the text in order. Tokens that cover nothing: special tokens (EOS, BOS), chat
template tokens, padding, and the space a SentencePiece tokenizer prepends. ``text_segments[t]`` is 0
for those, else the kind of text the token is in (``SEGMENT_KINDS``: 1 a document, 2.. a chat
message of that role), plus :data:`SEGMENT_START` at the first token of a document or message. A row
that starts mid-document starts a segment at its first token with text. A segment is the run of
text from one start to the next: a student tokenises each segment on its own and puts its own
special and template tokens between segments.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SEGMENT_KINDS = ("text", "system", "user", "assistant", "tool")  # codes 1, 2, ...
SEGMENT_START = 128  # added to the code of a segment's first token
TEXT_FIELDS = ("text_lengths", "text_segments", "text_bytes")


@dataclasses.dataclass
class RowText:
    text: bytes  # UTF-8 bytes of the text the row's tokens cover (documents / message contents, joined)
    token_spans: np.ndarray  # [P, 2] int64: byte [start, end) in ``text`` of each input token (start == end: none)
    segments: list[tuple[str, int, int]]  # (kind, start, end) in ``text``: one document's or message's run


def has_text(schema) -> bool:
    """Whether the cache records its rows' text (kdpipe captures since issue 24, causal-lm text and chat)."""
    return getattr(schema, "text_token_bytes", None) is not None


def segment_code(kind: str, *, start: bool) -> int:
    """The ``text_segments`` value of a token of a ``kind`` segment (``SEGMENT_KINDS``)."""
    return SEGMENT_KINDS.index(kind) + 1 + (SEGMENT_START if start else 0)


def length_dtype(text_token_bytes: int) -> np.dtype:
    """How ``text_lengths`` is stored: uint8 when every token covers at most 255 bytes."""
    return np.dtype("uint8" if text_token_bytes <= 255 else "uint16")


def text_fields(schema) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The stored (and logical) text fields of ``schema``; none when it records no text."""
    if not has_text(schema):
        return {}
    length, width = schema.input_len, schema.text_token_bytes
    return {"text_lengths": ((length,), length_dtype(width)), "text_segments": ((length,), np.dtype("uint8")),
            "text_bytes": ((length * width,), np.dtype("uint8"))}


def text_columns(schema, lengths: np.ndarray, segments: np.ndarray, texts) -> dict[str, np.ndarray]:
    """The text fields of a batch of rows: ``lengths`` and ``segments`` ``[N, L]``, ``texts`` the rows'
    text as ``N`` bytes objects (each ``sum(lengths[i])`` long, at most ``L * W`` bytes)."""
    fields = text_fields(schema)
    capacity = fields["text_bytes"][0][0]
    data = np.zeros((len(texts), capacity), dtype=np.uint8)
    for i, text in enumerate(texts):
        assert len(text) == int(lengths[i].sum()) <= capacity, f"row text of {len(text)} bytes, lengths {lengths[i]}"
        data[i, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    return {"text_lengths": np.asarray(lengths).astype(fields["text_lengths"][1]),
            "text_segments": np.asarray(segments, dtype=np.uint8), "text_bytes": data}


def row_text(schema, row: dict) -> RowText:
    """The :class:`RowText` of one decoded row (``TeacherCache.read_rows(...)`` sliced to a row) of a
    cache that records text (:func:`has_text`)."""
    assert has_text(schema), "the cache records no text: check has_text(schema) first"
    lengths = np.asarray(row["text_lengths"], dtype=np.int64)
    codes = np.asarray(row["text_segments"], dtype=np.int64)
    ends = np.cumsum(lengths)
    spans = np.stack([ends - lengths, ends], axis=1)
    text = np.asarray(row["text_bytes"], dtype=np.uint8)[: int(ends[-1]) if len(ends) else 0].tobytes()
    return RowText(text, spans, _segments(codes, spans))


def _segments(codes: np.ndarray, spans: np.ndarray) -> list[tuple[str, int, int]]:
    segments: list[tuple[str, int, int]] = []
    for t in np.nonzero(codes)[0].tolist():
        kind = SEGMENT_KINDS[(codes[t] & ~SEGMENT_START) - 1]
        if codes[t] & SEGMENT_START or not segments:
            segments.append((kind, int(spans[t, 0]), int(spans[t, 1])))
        else:
            segments[-1] = (segments[-1][0], segments[-1][1], int(spans[t, 1]))
    return [s for s in segments if s[2] > s[1]]
