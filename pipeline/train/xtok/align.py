"""A cache row seen through the student's tokenizer, and where its tokens line up with the teacher's.

The cache records each row's text (:class:`~kdpipe.pipeline.cache.text_spans.RowText`: the bytes, each
teacher token's byte span, the segments: documents or chat messages). The student's row is built
segment by segment: each segment's text tokenised on its own by the student tokenizer, with the
student's own tokens between segments where the teacher has special or template tokens there:

- a text cache (segments of kind ``"text"``: documents): the student's EOS where the teacher has one or
  more real special tokens (its EOS) before a segment, and after the last one;
- a chat cache (segments named by role): the student's own chat template around each message, i.e. the
  text its template writes before and after a message's content (rendered with a placeholder content),
  tokenised as template tokens; only around messages the teacher row also shows its template for.

Special and template tokens cover no text. A segment whose bytes are not whole UTF-8 characters at an
edge (a row cut inside a character) gets the student's byte tokens for those bytes.

**Alignment.** Teacher position ``t`` (its distribution predicts what follows the text up to the end
of token ``t``) and student position ``s`` line up when tokens ``t`` and ``s`` are text tokens ending
at the same byte (inside one segment: segments do not overlap, so the byte says which); there both
predict the same continuation. Special and template tokens never line up. An aligned pair carries the
KD term when the teacher's KD mask is set at ``t``; every student position whose next token is a
target carries CE on it: every next token of a text cache's row, and in a chat cache the content tokens
of assistant messages and the first template token after one (its end of turn), as
:mod:`kdpipe.pipeline.data.chat` marks the teacher's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kdpipe.pipeline.data.byte_spans import token_byte_spans
from kdpipe.pipeline.errors import DataError

IGNORE = -100


@dataclasses.dataclass
class StudentRow:
    """One row in the student's tokens (``L`` of them) and its pairs with the teacher's positions."""

    input_ids: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64: the next student token where it is a CE target, else IGNORE
    ends: np.ndarray  # [L] int64: byte end in the row's text of each text token, -1 for special/template tokens
    byte_lengths: np.ndarray  # [L] int64: bytes of the row's text each token covers (0 for special/template tokens)
    student_positions: np.ndarray  # [M] int64: aligned student positions carrying KD
    teacher_positions: np.ndarray  # [M] int64: the teacher positions they pair with


@dataclasses.dataclass(frozen=True)
class StudentTokenizer:
    """The student's tokenizer with what row building needs, computed once."""

    tokenizer: object
    byte_ids: dict  # single byte -> the student id that stands for it (byte-level or byte-fallback token)
    eos_id: int
    spans: object  # token_byte_spans(tokenizer, text) -> (ids [n], spans [n, 2])

    @classmethod
    def of(cls, tokenizer, student_bytes: list, spans=None) -> "StudentTokenizer":
        """``student_bytes``: :func:`~.vocab_map.token_bytes` of ``tokenizer``."""
        spans = token_byte_spans if spans is None else spans
        byte_ids: dict[bytes, int] = {}
        for i, value in enumerate(student_bytes):
            if value is not None and len(value) == 1:
                byte_ids.setdefault(value, i)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        if eos is None:
            raise DataError("the student's tokenizer has no EOS token (eos_token in tokenizer_config.json), which "
                            "it needs between the documents of a row; add one")
        return cls(tokenizer, byte_ids, int(eos), spans)

    def template(self, role: str) -> tuple[list[int], list[int]]:
        """The student's chat-template tokens before and after the content of one ``role`` message."""
        render = getattr(self.tokenizer, "apply_chat_template", None)
        if not getattr(self.tokenizer, "chat_template", None) or render is None:
            raise DataError("the student's tokenizer has no chat template, which the rows of a chat cache need "
                            "around each message; add a chat_template to its tokenizer_config.json")
        text = render([{"role": role, "content": "\x00"}], tokenize=False)
        before, _, after = text.partition("\x00")
        encode = lambda s: list(self.tokenizer.encode(s, add_special_tokens=False)) if s else []  # noqa: E731
        return encode(before), encode(after)

    def segment(self, data: bytes, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """ids [n], absolute byte ends [n] (-1: no text) and bytes covered [n] of one segment's bytes ``data``
        from byte ``offset``."""
        lead = 0
        while lead < min(3, len(data)) and data[lead] & 0xC0 == 0x80:  # UTF-8 continuation bytes
            lead += 1
        for cut in range(4):
            try:
                text = data[lead:len(data) - cut].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:
            raise DataError(f"a row's text is not UTF-8 (bytes {offset}..{offset + len(data)}); re-capture the cache")
        ids, spans = self.spans(self.tokenizer, text) if text else (np.zeros(0, np.int64), np.zeros((0, 2), np.int64))
        edge_ids = [self._byte_id(data[i:i + 1]) for i in range(lead)]
        tail_ids = [self._byte_id(data[i:i + 1]) for i in range(len(data) - cut, len(data))]
        all_ids = np.concatenate([edge_ids, np.asarray(ids, np.int64), tail_ids]).astype(np.int64)
        spans = np.asarray(spans, np.int64).reshape(-1, 2)
        ends = np.concatenate([np.arange(1, lead + 1), spans[:, 1] + lead,
                               np.arange(len(data) - cut + 1, len(data) + 1)]).astype(np.int64) + offset
        empty = np.concatenate([np.zeros(lead, bool), spans[:, 1] == spans[:, 0], np.zeros(cut, bool)])
        lengths = np.diff(np.concatenate([[offset], ends]))
        return all_ids, np.where(empty, -1, ends), lengths  # a token covering no text (a prepended ▁) ends nowhere

    def _byte_id(self, byte: bytes) -> int:
        if byte not in self.byte_ids:
            raise DataError(f"the student's tokenizer has no token for byte {byte!r} (no byte fallback); "
                            "use a byte-level or byte-fallback tokenizer")
        return self.byte_ids[byte]


def _specials_around(spans: np.ndarray, real: np.ndarray, segments: list) -> tuple[np.ndarray, np.ndarray]:
    """Per segment, whether the teacher row has real tokens without text just before it (after the
    previous segment's last token) and just after it (before the next segment's first token), by token order."""
    text_tokens = np.nonzero(spans[:, 1] > spans[:, 0])[0]
    special = np.nonzero((spans[:, 1] == spans[:, 0]) & real)[0]
    starts = np.asarray([start for _, start, _ in segments], np.int64)
    segment_of = np.searchsorted(starts, spans[text_tokens, 0], side="right") - 1  # [text tokens]
    before, after = np.zeros(len(segments), bool), np.zeros(len(segments), bool)
    for g in range(len(segments)):
        mine = text_tokens[segment_of == g]
        if not len(mine):
            continue
        previous = text_tokens[segment_of < g]
        following = text_tokens[segment_of > g]
        low, high = (previous[-1] if len(previous) else -1), (following[0] if len(following) else len(spans))
        before[g] = bool(((special > low) & (special < mine[0])).any())
        after[g] = bool(((special > mine[-1]) & (special < high)).any())
    return before, after


def student_row(text: bytes, token_spans: np.ndarray, segments: list, teacher_kd_mask: np.ndarray,
                student: StudentTokenizer, *, chat: bool, teacher_real: np.ndarray | None = None,
                max_len: int | None = None) -> StudentRow:
    """The student's row for a teacher row (module doc). ``token_spans [P, 2]``, ``teacher_kd_mask [P]``
    bool; ``teacher_real [P]``: which teacher tokens are real (a text cache's mask; None: all);
    ``max_len``: the student's rows are cut to this many tokens."""
    spans = np.asarray(token_spans, np.int64).reshape(-1, 2)
    real = np.ones(len(spans), bool) if teacher_real is None else np.asarray(teacher_real, bool)
    before, after = _specials_around(spans, real, segments)
    ids, ends, lengths, counted = [], [], [], []  # counted: whether the token is a CE target
    for g, (kind, start, stop) in enumerate(segments):
        seg_ids, seg_ends, seg_lengths = student.segment(text[start:stop], start)
        if chat:
            head, tail = student.template(kind)
            head, tail = (head if before[g] else []), (tail if after[g] else [])
            target = kind == "assistant"
            ids += head + list(seg_ids) + tail
            end_of_turn = [target] + [False] * (len(tail) - 1) if tail else []  # the first token after a turn
            counted += [False] * len(head) + [target] * len(seg_ids) + end_of_turn
        else:
            head = [student.eos_id] if before[g] else []
            tail = [student.eos_id] if after[g] and g == len(segments) - 1 else []  # between two: the next one's head
            ids += head + list(seg_ids) + tail
            counted += [True] * (len(head) + len(seg_ids) + len(tail))
        ends += [-1] * len(head) + list(seg_ends) + [-1] * len(tail)
        lengths += [0] * len(head) + list(seg_lengths) + [0] * len(tail)
    ids, ends, lengths, counted = (np.asarray(ids, np.int64)[:max_len], np.asarray(ends, np.int64)[:max_len],
                                   np.asarray(lengths, np.int64)[:max_len], np.asarray(counted, bool)[:max_len])
    labels = np.full(len(ids), IGNORE, np.int64)
    labels[:-1] = np.where(counted[1:], ids[1:], IGNORE)
    s, t = aligned_positions(ends, spans, real & np.asarray(teacher_kd_mask, bool))
    return StudentRow(ids, labels, ends, lengths, s, t)


def aligned_positions(student_ends: np.ndarray, teacher_spans: np.ndarray, teacher_counted: np.ndarray):
    """(student positions [M], teacher positions [M]) whose text tokens end at the same byte; teacher
    positions only where ``teacher_counted``. Ends are increasing on each side, so a byte names one pair."""
    teacher_text = (teacher_spans[:, 1] > teacher_spans[:, 0]) & teacher_counted
    teacher_pos = np.nonzero(teacher_text)[0]
    student_pos = np.nonzero(student_ends >= 0)[0]
    _, si, ti = np.intersect1d(student_ends[student_pos], teacher_spans[teacher_pos, 1], assume_unique=True,
                               return_indices=True)
    return student_pos[si].astype(np.int64), teacher_pos[ti].astype(np.int64)
