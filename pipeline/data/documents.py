"""Records of a data source as documents: plain text, or a chat conversation, with an optional label.

A record with the messages field (default ``messages``: a list of ``{"role", "content"}``) is a
conversation; otherwise its text field (default ``text``) is its text. A ``.txt`` file is one text
document. Classification data carries an integer ``label`` on each record.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

from kdpipe.pipeline.errors import DataError


@dataclasses.dataclass
class Document:
    text: str | None = None
    label: int | None = None
    messages: list | None = None  # a chat conversation instead of text
    where: str = ""  # file:line, for error messages

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def size(self) -> int:
        """Characters of content (what a block's size is measured in)."""
        if self.messages is None:
            return len(self.text or "")
        return sum(len(m.get("content") or "") if isinstance(m, dict) else 1 for m in self.messages)


@dataclasses.dataclass(frozen=True)
class Fields:
    text: str = "text"
    messages: str = "messages"

    def document(self, where: str, record) -> Document:
        """The document a record holds; raises naming the record and the fix when it holds none."""
        if isinstance(record, str):  # a .txt file
            return Document(record, where=where)
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
    for where, record in records:
        yield fields.document(where, record)
