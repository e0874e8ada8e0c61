"""Documents to fixed-size model rows: the token ids the teacher sees and the positions that count.

- **Text, causal LM** (``concat-eos``): every document is tokenised, followed by the tokenizer's EOS
  token as a separator (a long text's pieces, :mod:`.documents`, have one after the last piece only); the documents of a block are concatenated and cut into rows of ``seq_len``
  tokens. The block's last, partial row is padded with the pad id (EOS when there is none).
  ``mask[t]`` is True at every real token: the teacher's prediction there is a target (for the last
  position of a row, the target is the next row's first token).
- **Chat, causal LM** (``chat``): each conversation is rendered with the tokenizer's chat template
  (:mod:`.chat`) and becomes one row, truncated to ``seq_len`` tokens (counted as a truncated row) and
  padded; with ``packing`` several whole conversations share a row while they fit. ``mask[t]`` is True
  when token ``t + 1`` is a distillation target: an assistant token (``targets="assistant"``) or any
  token of the same conversation (``targets="all"``). So position ``t`` predicts a target token, and
  the hard label there is ``input_ids[t + 1]``.
- **Classification** (``one-document-per-row``): each document is one row, truncated or padded to
  ``seq_len``, with one position (``mask = [True]``) and its ``label``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from kdpipe.pipeline.cache.text_spans import segment_code
from kdpipe.pipeline.data.byte_spans import spans_of, token_bytes
from kdpipe.pipeline.errors import ConfigError, DataError

_TOKENIZE_BATCH = 32  # documents per tokenizer call
_TOKENIZE_CHARS = 1 << 18  # characters per tokenizer call (but for one longer document)


@dataclasses.dataclass
class RowsText:
    """The text of rows (causal LM, a tokenizer with exact byte spans; see :mod:`kdpipe.pipeline.cache.text_spans`)."""

    lengths: np.ndarray  # [N, L] int64: bytes of the row's text each token covers (0: none)
    segments: np.ndarray  # [N, L] uint8: segment code of each token (cache.text_spans.segment_code)
    texts: np.ndarray  # [N] object: the row's text, bytes (its tokens' spans joined)


@dataclasses.dataclass
class Rows:
    inputs: np.ndarray  # [N, L] int64 token ids, or [N, ...] float32 arrays
    mask: np.ndarray  # [N, P] bool: positions whose prediction is a target (see module doc)
    labels: np.ndarray | None  # [N] int64 (classification)
    attention_mask: np.ndarray | None  # [N, L] int64: 1 at real tokens (text), None for arrays
    text: RowsText | None = None  # what the tokens spell, when recorded

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, n: int) -> "Rows":
        cut = lambda a: None if a is None else a[:n]  # noqa: E731
        text = None if self.text is None else RowsText(*(cut(a) for a in dataclasses.astuple(self.text)))
        return Rows(cut(self.inputs), cut(self.mask), cut(self.labels), cut(self.attention_mask), text)

    @classmethod
    def concat(cls, parts: list["Rows"]) -> "Rows":
        join = lambda name: None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        text = None
        if parts[0].text is not None:
            text = RowsText(*(np.concatenate(a) for a in zip(*(dataclasses.astuple(p.text) for p in parts))))
        return cls(join("inputs"), join("mask"), join("labels"), join("attention_mask"), text)


@dataclasses.dataclass
class PackedBlock:
    rows: Rows
    tokens: int  # real (non-padding) tokens in the rows
    truncated_rows: int = 0  # rows cut at seq_len (chat, classification)


@dataclasses.dataclass(frozen=True)
class PackingSpec:
    """How documents become rows; picklable, so tokenizer workers receive it once."""

    task: str  # "causal-lm" or "classification"
    seq_len: int
    tokenizer: object
    chat: bool = False
    targets: str = "assistant"  # chat only: "assistant" or "all"
    packing: bool = False  # chat only: several conversations per row
    record_text: bool = True  # causal LM: the rows record their text when the tokenizer allows (cache/text_spans.py)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return pad if pad is not None else 0

    @property
    def text_token_bytes(self) -> int | None:
        """The most bytes one token covers when the rows record their text (causal LM, a tokenizer with
        exact byte spans: :mod:`.byte_spans`), else None."""
        if self.task != "causal-lm" or not self.record_text or _text_problem(self.tokenizer):
            return None
        return token_bytes(self.tokenizer).max_bytes

    @property
    def scheme(self) -> str:
        if self.task == "classification":
            return "one-document-per-row"
        return ("chat-packed" if self.packing else "chat") if self.chat else "concat-eos"

    def describe(self) -> dict:
        """The packing as recorded in the manifest."""
        out = {"scheme": self.scheme, "seq_len": self.seq_len, "pad_id": self.pad_id}
        if self.scheme == "concat-eos":
            out |= {"separator_id": self.tokenizer.eos_token_id, "last_row": "padded"}
        if self.chat:
            out |= {"targets": self.targets, "chat_template_sha256": _template_hash(self.tokenizer)}
        if self.task == "classification":
            out["truncation"] = True
        else:
            problem = _text_problem(self.tokenizer) if self.record_text else "--no-text"
            out["text"] = f"not recorded: {problem}" if problem else "recorded (cache/text_spans.py)"
        return out


def _text_problem(tokenizer) -> str | None:
    """Why ``tokenizer``'s tokens have no exact byte spans (the rows cannot record their text), or None."""
    try:
        token_bytes(tokenizer)
    except ConfigError as exc:
        return str(exc)
    return None


def _template_hash(tokenizer) -> str | None:
    import hashlib

    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None


def pack(spec: PackingSpec, docs: list, *, max_rows: int | None = None, max_tokens: int | None = None) -> PackedBlock:
    """Rows of ``docs`` (see module doc), stopping once ``max_rows`` rows or ``max_tokens`` tokens are made."""
    for doc in docs:
        if doc.is_chat != spec.chat:
            kind, other = ("a conversation", "plain text") if doc.is_chat else ("plain text", "conversations")
            raise DataError(f"{doc.where} is {kind}, but the data's first record is {other}; "
                            "a capture's data must be all text or all conversations (split it into two captures)")
    if spec.task == "classification":
        return _classification(spec, docs[: max_rows or len(docs)])
    return _chat(spec, docs, max_rows, max_tokens) if spec.chat else _concat_eos(spec, docs, max_rows, max_tokens)


def _concat_eos(spec: PackingSpec, docs: list, max_rows, max_tokens) -> PackedBlock:
    eos, L = spec.tokenizer.eos_token_id, spec.seq_len
    budget = min(x for x in (max_tokens, None if max_rows is None else max_rows * L, float("inf")) if x is not None)
    table = token_bytes(spec.tokenizer) if spec.text_token_bytes else None
    pieces, texts, total, starts = [], [], 0, True
    for batch in _tokenize_batches(docs):
        enc = spec.tokenizer([d.text for d in batch], add_special_tokens=False,
                             return_offsets_mapping=table is not None)
        for i, doc in enumerate(batch):
            separator = [eos] if eos is not None and not doc.continues else []  # none inside a long text
            pieces.append(np.asarray(enc["input_ids"][i] + separator, dtype=np.int64))
            total += len(pieces[-1])
            if table is not None:
                texts.append(_document_text(table, doc.text, pieces[-1], enc["offset_mapping"][i], starts=starts))
                starts = not doc.continues or not texts[-1][2]  # a long text's next piece continues its segment
        if total >= budget:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    stream = stream[: int(min(budget, len(stream)))]
    n_rows = -(-len(stream) // L)
    ids = np.full(n_rows * L, spec.pad_id, dtype=np.int64)
    ids[: len(stream)] = stream
    real = np.zeros(n_rows * L, dtype=bool)
    real[: len(stream)] = True
    real = real.reshape(n_rows, L)
    rows = Rows(ids.reshape(n_rows, L), real, None, real.astype(np.int64))
    if table is not None:
        rows.text = _rows_text(texts, n_rows, L, len(stream))
    return PackedBlock(rows, len(stream))


def _document_text(table, text: str, ids: np.ndarray, offsets, *, starts: bool) -> tuple[np.ndarray, np.ndarray, bytes]:
    """``(lengths [n], segment codes [n], bytes)`` of one document's tokens ``ids`` (its own, then any
    separator); a document whose tokens do not spell it (a tokenizer that changes some character)
    records no text: its tokens cover nothing."""
    lengths, codes = np.zeros(len(ids), np.int64), np.zeros(len(ids), np.uint8)
    own = len(offsets)
    spans = spans_of(table, text, ids[:own], np.asarray(offsets, dtype=np.int64).reshape(-1, 2))
    if spans is None:
        return lengths, codes, b""
    lengths[:own] = spans[:, 1] - spans[:, 0]
    covers = lengths > 0
    codes[covers] = segment_code("text", start=False)
    if starts and covers.any():
        codes[np.argmax(covers)] = segment_code("text", start=True)
    return lengths, codes, text.encode("utf-8")


def _rows_text(texts: list[tuple[np.ndarray, np.ndarray, bytes]], n_rows: int, L: int, n_tokens: int) -> RowsText:
    """The :class:`RowsText` of rows cut from the token stream whose documents' texts are ``texts``."""
    lengths, codes = np.zeros(n_rows * L, np.int64), np.zeros(n_rows * L, np.uint8)
    if texts:
        lengths[:n_tokens] = np.concatenate([t[0] for t in texts])[:n_tokens]
        codes[:n_tokens] = np.concatenate([t[1] for t in texts])[:n_tokens]
    blob = b"".join(t[2] for t in texts)
    bounds = np.concatenate([[0], np.cumsum(lengths)[L - 1 :: L]])  # byte offset of each row's start
    row_texts = np.empty(n_rows, dtype=object)
    for r in range(n_rows):
        row_texts[r] = blob[bounds[r] : bounds[r + 1]]
    return RowsText(lengths.reshape(n_rows, L), codes.reshape(n_rows, L), row_texts)


def _tokenize_batches(docs: list) -> Iterator[list]:
    """``docs`` in consecutive batches of at most :data:`_TOKENIZE_BATCH` documents and (but for a
    single longer one) :data:`_TOKENIZE_CHARS` characters: what one tokenizer call holds."""
    batch, chars = [], 0
    for doc in docs:
        if batch and (len(batch) == _TOKENIZE_BATCH or chars + len(doc.text) > _TOKENIZE_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc.text)
    if batch:
        yield batch


def _chat(spec: PackingSpec, docs: list, max_rows, max_tokens) -> PackedBlock:
    from kdpipe.pipeline.data.chat import conversation_text, render_conversation

    L = spec.seq_len
    table = token_bytes(spec.tokenizer) if spec.text_token_bytes else None
    rows: list[list[tuple]] = []  # each row: its conversations' (ids, mask, text or None)
    used, truncated, tokens = L, 0, 0
    for doc in docs:
        if max_tokens is not None and tokens >= max_tokens:
            break
        ids, is_target = render_conversation(doc.messages, spec.tokenizer, targets=spec.targets, where=doc.where)
        text = None if table is None else conversation_text(spec.tokenizer, table, doc.messages, ids, where=doc.where)
        cut = len(ids) > L
        ids, is_target = ids[:L], is_target[:L]
        if text is not None:  # its first L tokens' text
            lengths, codes, data = text
            text = (lengths[:L], codes[:L], data[: int(lengths[:L].sum())])
        mask = np.zeros(len(ids), dtype=bool)
        mask[:-1] = is_target[1:]  # position t predicts token t + 1
        if not spec.packing or used + len(ids) > L:
            if max_rows is not None and len(rows) >= max_rows:
                break
            rows.append([])
            used = 0
        rows[-1].append((ids, mask, text))
        used += len(ids)
        tokens += len(ids)
        truncated += cut  # counted once kept: the conversation a row limit stops at is not in the block
    ids_out = np.full((len(rows), L), spec.pad_id, dtype=np.int64)
    mask_out = np.zeros((len(rows), L), dtype=bool)
    attention = np.zeros((len(rows), L), dtype=np.int64)
    for r, convs in enumerate(rows):
        n = sum(len(ids) for ids, _, _ in convs)
        ids_out[r, :n] = np.concatenate([ids for ids, _, _ in convs])
        mask_out[r, :n] = np.concatenate([m for _, m, _ in convs])
        attention[r, :n] = 1
    out = Rows(ids_out, mask_out, None, attention)
    if table is not None:
        texts = [[text for _, _, text in convs] for convs in rows]
        out.text = _chat_rows_text(texts, L)
    return PackedBlock(out, tokens, truncated)


def _chat_rows_text(rows: list[list[tuple[np.ndarray, np.ndarray, bytes]]], L: int) -> RowsText:
    """The :class:`RowsText` of chat rows, each the texts of its conversations."""
    lengths, codes = np.zeros((len(rows), L), np.int64), np.zeros((len(rows), L), np.uint8)
    row_texts = np.empty(len(rows), dtype=object)
    for r, convs in enumerate(rows):
        n = sum(len(t[0]) for t in convs)
        lengths[r, :n] = np.concatenate([t[0] for t in convs])
        codes[r, :n] = np.concatenate([t[1] for t in convs])
        row_texts[r] = b"".join(t[2] for t in convs)
    return RowsText(lengths, codes, row_texts)


def _classification(spec: PackingSpec, docs: list) -> PackedBlock:
    if any(d.label is None for d in docs):
        where = next(d.where for d in docs if d.label is None)
        raise DataError(f"{where} has no 'label'; classification data needs an integer label on every record")
    if not docs:
        return PackedBlock(Rows(np.zeros((0, spec.seq_len), np.int64), np.zeros((0, 1), bool), np.zeros(0, np.int64), np.zeros((0, spec.seq_len), np.int64)), 0)
    enc = spec.tokenizer([d.text for d in docs], truncation=True, max_length=spec.seq_len, padding="max_length")
    attention = np.asarray(enc["attention_mask"], dtype=np.int64)
    truncated = sum(1 for e in (enc.encodings or []) if e.overflowing)
    rows = Rows(np.asarray(enc["input_ids"], dtype=np.int64), np.ones((len(docs), 1), dtype=bool),
                np.asarray([d.label for d in docs], dtype=np.int64), attention)
    return PackedBlock(rows, int(attention.sum()), truncated)
