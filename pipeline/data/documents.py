"""Records of a data source as documents: plain text, or a chat conversation, with an optional label.

A record with the messages field (default ``messages``: a list of ``{"role", "content"}``) is a
conversation; otherwise its text field (default ``text``) is its text. A ``.txt`` file is one text
document. Classification data carries an integer ``label`` on each record.

**Long texts come in pieces.** A text of more than :data:`PIECE_CHARS` characters (a ``.txt`` file
read piece by piece, or a record's long text field) becomes several documents of at most that many
characters, every piece but the last marked ``continues`` (packing writes no EOS after it), so memory
holds pieces, never a whole document, whatever its length. A piece ends before a whitespace run
(``"...word| word"``) in its last half where there is one, else at :data:`PIECE_CHARS`; each piece is
tokenised on its own. Byte-level BPE tokenizers (GPT-2's, Llama 3's, Qwen's) never merge across such a
boundary, so for them the ids equal the whole text's. Labelled records (classification: one row per
record, truncated) are not split.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Iterator

from kdpipe.pipeline.errors import DataError

PIECE_CHARS = 1 << 16  # characters of a long text's pieces
_LAST_BREAK = re.compile(r"(?s:.*)\S(?=\s)")  # match ends before the last whitespace run after a non-space


@dataclasses.dataclass
class Document:
    text: str | None = None
    label: int | None = None
    messages: list | None = None  # a chat conversation instead of text
    where: str = ""  # file:line, for error messages
    continues: bool = False  # a piece of a long text that the next document continues (no EOS after it)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def size(self) -> int:
        """Characters of content (what a block's size is measured in)."""
        if self.messages is None:
            return len(self.text or "")
        return sum(len(m.get("content") or "") if isinstance(m, dict) else 1 for m in self.messages)


@dataclasses.dataclass
class TextStream:
    """A record that is one text read in chunks (a ``.txt`` file): ``chunks`` yields its characters."""

    chunks: Iterable[str]


@dataclasses.dataclass(frozen=True)
class Fields:
    text: str = "text"
    messages: str = "messages"

    def document(self, where: str, record) -> Document:
        """The document a record holds; raises naming the record and the fix when it holds none."""
        if isinstance(record, (str, TextStream)):  # a .txt file (whole: documents() reads it in pieces)
            return Document(record if isinstance(record, str) else "".join(record.chunks), where=where)
        messages = record.get(self.messages)
        label = _label(record.get("label"), where)
        if messages is not None:
            return Document(label=label, messages=messages, where=where)
        if self.text in record:
            text = record[self.text]
            if text is not None and not isinstance(text, str):
                raise DataError(f"{where}: field '{self.text}' holds {type(text).__name__}, not text; pass --text-field NAME of a string field")
            return Document(text or "", label=label, where=where)
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(
            f"{where} has neither a '{self.text}' nor a '{self.messages}' field (it has: {fields}); "
            "pass --text-field NAME or --messages-field NAME"
        )


def _label(value, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}: label {value!r} must be a non-negative integer class id")
    return value


def documents(records: Iterable[tuple[str, object]], fields: Fields) -> Iterator[Document]:
    """The documents of ``records``, long texts in pieces (see the module doc)."""
    for where, record in records:
        if isinstance(record, TextStream):
            yield from _pieces(where, record.chunks)
            continue
        doc = fields.document(where, record)
        if doc.messages is None and doc.label is None and len(doc.text) > PIECE_CHARS:
            yield from _pieces(where, (doc.text,))
        else:
            yield doc


def _pieces(where: str, chunks: Iterable[str]) -> Iterator[Document]:
    for piece, last in text_pieces(chunks):
        yield Document(piece, where=where, continues=not last)


def text_pieces(chunks: Iterable[str], piece_chars: int = PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """``(piece, is_last)`` for the text that ``chunks`` make together, cut as the module doc says."""
    buffer, start = "", 0
    for chunk in chunks:
        buffer = buffer[start:] + chunk
        start = 0
        while len(buffer) - start > piece_chars:
            limit = start + piece_chars
            found = _LAST_BREAK.match(buffer, start + piece_chars // 2, limit)
            cut = found.end() if found else limit
            yield buffer[start:cut], False
            start = cut
    yield buffer[start:], True
