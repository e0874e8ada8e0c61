"""Teacher rows with text, built here from the shipped tokenizers (for the cross-tokenizer tests).

``spans_from_bytes`` is an independent span computation: the tokens' decoded bytes laid end to end
(a SentencePiece tokenizer's first ``▁`` stands for no text), checked to cover the text exactly.
"""

from pathlib import Path

import numpy as np

from kdpipe.pipeline.train.xtok.vocab_map import token_bytes

DATA = Path(__file__).resolve().parents[2] / "data"


def spans_from_bytes(tokenizer, text: str):
    table = token_bytes(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    lengths = np.array([len(table[i]) for i in ids], dtype=np.int64)
    if len(ids) and table[ids[0]].startswith(b" ") and not text.startswith(" "):
        lengths[0] -= 1  # the prepended metaspace
    ends = np.cumsum(lengths)
    assert (ends[-1] if len(ends) else 0) == len(text.encode()), (text, tokenizer.convert_ids_to_tokens(ids))
    spans = np.stack([ends - lengths, ends], axis=1) if len(ids) else np.zeros((0, 2), np.int64)
    return np.asarray(ids, np.int64), spans


def packed_teacher_row(tokenizer, documents: list[str], *, length: int, skip: int = 0):
    """A text cache's row: EOS + document, ... tokenised and cut to ``length`` tokens from token ``skip``.

    Returns (text bytes, token spans [P, 2], segments, mask [P]) as the cache's RowText describes them;
    padded with EOS (mask False) when the documents are shorter."""
    ids, spans, starts, offset = [], [], [], 0
    for doc in documents:
        ids.append(tokenizer.eos_token_id)
        spans.append((offset, offset))
        doc_ids, doc_spans = spans_from_bytes(tokenizer, doc)
        ids += doc_ids.tolist()
        spans += (doc_spans + offset).tolist()
        starts.append((offset, offset + len(doc.encode())))
        offset += len(doc.encode())
    text = "".join(documents).encode()
    ids, spans = ids[skip:skip + length], np.asarray(spans[skip:skip + length], np.int64)
    real = np.ones(len(ids), bool)
    begin = spans[spans[:, 1] > spans[:, 0]][0, 0]
    end = spans[:, 1].max()
    text = text[begin:end]
    spans = (spans - begin).clip(0, len(text))
    segments = [("text", max(a, begin) - begin, min(b, end) - begin) for a, b in starts if b > begin and a < end]
    if len(ids) < length:
        pad = length - len(ids)
        ids += [tokenizer.eos_token_id] * pad
        spans = np.concatenate([spans, np.full((pad, 2), len(text), np.int64)])
        real = np.concatenate([real, np.zeros(pad, bool)])
    return text, spans, segments, real
