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

from kdpipe.pipeline.errors import DataError

_TOKENIZE_BATCH = 32  # documents per tokenizer call
_TOKENIZE_CHARS = 1 << 18  # characters per tokenizer call (but for one longer document)


@dataclasses.dataclass
class Rows:
    inputs: np.ndarray  # [N, L] int64 token ids, or [N, ...] float32 arrays
    mask: np.ndarray  # [N, P] bool: positions whose prediction is a target (see module doc)
    labels: np.ndarray | None  # [N] int64 (classification)
    attention_mask: np.ndarray | None  # [N, L] int64: 1 at real tokens (text), None for arrays

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, n: int) -> "Rows":
        cut = lambda a: None if a is None else a[:n]  # noqa: E731
        return Rows(cut(self.inputs), cut(self.mask), cut(self.labels), cut(self.attention_mask))

    @classmethod
    def concat(cls, parts: list["Rows"]) -> "Rows":
        join = lambda name: None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return cls(join("inputs"), join("mask"), join("labels"), join("attention_mask"))


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

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return pad if pad is not None else 0

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
        return out


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
    pieces, total = [], 0
    for batch in _tokenize_batches(docs):
        for doc, ids in zip(batch, spec.tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]):
            separator = [eos] if eos is not None and not doc.continues else []  # none inside a long text
            pieces.append(np.asarray(ids + separator, dtype=np.int64))
            total += len(pieces[-1])
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
    return PackedBlock(Rows(ids.reshape(n_rows, L), real, None, real.astype(np.int64)), len(stream))


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
    from kdpipe.pipeline.data.chat import render_conversation

    L = spec.seq_len
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []  # each row: its conversations' (ids, mask)
    used, truncated, tokens = L, 0, 0
    for doc in docs:
        if max_tokens is not None and tokens >= max_tokens:
            break
        ids, is_target = render_conversation(doc.messages, spec.tokenizer, targets=spec.targets, where=doc.where)
        cut = len(ids) > L
        ids, is_target = ids[:L], is_target[:L]
        mask = np.zeros(len(ids), dtype=bool)
        mask[:-1] = is_target[1:]  # position t predicts token t + 1
        if not spec.packing or used + len(ids) > L:
            if max_rows is not None and len(rows) >= max_rows:
                break
            rows.append([])
            used = 0
        rows[-1].append((ids, mask))
        used += len(ids)
        tokens += len(ids)
        truncated += cut  # counted once kept: the conversation a row limit stops at is not in the block
    ids_out = np.full((len(rows), L), spec.pad_id, dtype=np.int64)
    mask_out = np.zeros((len(rows), L), dtype=bool)
    attention = np.zeros((len(rows), L), dtype=np.int64)
    for r, convs in enumerate(rows):
        n = sum(len(ids) for ids, _ in convs)
        ids_out[r, :n] = np.concatenate([ids for ids, _ in convs])
        mask_out[r, :n] = np.concatenate([m for _, m in convs])
        attention[r, :n] = 1
    return PackedBlock(Rows(ids_out, mask_out, None, attention), tokens, truncated)


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
