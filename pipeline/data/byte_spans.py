"""Exact byte spans of a tokenizer's tokens in the text they came from (cross-tokenizer caches).

A token's *bytes* are what it stands for in UTF-8: for byte-level BPE (GPT-2, Llama 3, Qwen, the demo's
``data/tokenizer``) its string mapped back through the byte alphabet (``Ġ`` is a space); for
SentencePiece-style tokenizers (Llama 2, Mistral, Gemma, ``data/tokenizer-unigram``) its string with
the metaspace ``▁`` as a space, and ``<0xNN>`` byte-fallback pieces as the byte ``NN``; an added
(special) token's bytes are its text. The tokens of a text then tile its UTF-8 bytes: token ``i``
covers ``[start_i, end_i)`` with ``start_0 = 0``, ``start_{i+1} = end_i`` and ``end_{n-1}`` the text's
length. Two things are allowed beyond that:

- the space a metaspace tokenizer prepends (``prepend_scheme`` first/always) to a text, or to the
  text after an added token, is not in the text: that token covers its bytes less the space (a lone
  ``▁`` covers nothing, ``start == end``);
- several tokens of one character (byte-level BPE or byte fallback splitting a multi-byte character,
  which the tokenizer's offsets give the same character span) share it by their byte counts.

The spans follow from the tokens' bytes, which joined must equal the text; each must also meet the
byte range of the token's character offsets from the fast tokenizer (which may be trimmed of spaces). A tokenizer that
normalises text (lowercasing, NFKC, stripping accents or spaces, SentencePiece's precompiled
charsmap) is refused up front; one that still does not match a text raises :class:`DataError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from kdpipe.pipeline.errors import ConfigError, DataError

METASPACE = "▁"
_FIX = ("cross-tokenizer caches and students need a non-normalising tokenizer that keeps the text as it is "
        "(byte-level BPE, or SentencePiece-style with metaspace and byte fallback)")


@dataclasses.dataclass(frozen=True)
class TokenBytes:
    """What each id of a tokenizer stands for, in bytes."""

    name: str
    table: tuple[bytes, ...]  # [V] the bytes of each id
    lengths: np.ndarray  # [V] int64 len(table[id])
    starts_with_space: np.ndarray  # [V] bool
    added: np.ndarray  # [V] bool: an added (special) token, matched as its text
    prepends_space: bool  # metaspace: a space is prepended to the text (and after added tokens)

    @property
    def max_bytes(self) -> int:
        """The most bytes one token covers (at least 4: one character)."""
        return max(4, int(self.lengths.max(initial=0)))


def token_byte_spans(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n] int64, spans [n, 2] int64)``: ``text`` tokenised alone (no special tokens added) and
    each token's byte span ``[start, end)`` in ``text.encode('utf-8')`` (rules in the module doc).

    Raises :class:`ConfigError` for a tokenizer that normalises text or is of another family, and
    :class:`DataError` when its tokens do not tile this text."""
    table = token_bytes(tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    spans = spans_of(table, text, ids, offsets)
    if spans is None:
        raise DataError(f"the tokens of tokenizer {table.name} do not spell the text {text[:30]!r}... byte for "
                        f"byte (it changes the text it tokenises), so their byte spans cannot be matched; {_FIX}")
    return ids, spans


def spans_of(table: TokenBytes, text: str, ids: np.ndarray, char_offsets: np.ndarray) -> np.ndarray | None:
    """Byte spans ``[n, 2]`` of tokens ``ids`` of ``text`` (with the tokenizer's character offsets
    ``[n, 2]``), or None when they do not tile the text (see the module doc)."""
    data = text.encode("utf-8")
    if len(ids) == 0:
        return np.zeros((0, 2), np.int64) if not data else None
    char_to_byte = char_byte_offsets(text)
    byte_offsets = char_to_byte[np.clip(char_offsets, 0, len(text))]  # [n, 2]
    lengths = table.lengths[ids].copy()
    virtual = _prepended_spaces(table, data, ids, byte_offsets)
    lengths[virtual] -= 1
    ends = np.cumsum(lengths)
    starts = ends - lengths
    if ends[-1] != len(data):
        return None
    pieces = [table.table[i] for i in ids.tolist()]
    for at in np.nonzero(virtual)[0].tolist():
        pieces[at] = pieces[at][1:]
    if b"".join(pieces) != data:
        return None
    touches = (starts <= byte_offsets[:, 1]) & (ends >= byte_offsets[:, 0])  # (offsets may be trimmed of spaces)
    if not touches.all():
        return None
    return np.stack([starts, ends], axis=1)


def _prepended_spaces(table: TokenBytes, data: bytes, ids: np.ndarray, byte_offsets: np.ndarray) -> np.ndarray:
    """[n] bool: tokens whose leading space a metaspace tokenizer prepended (it is not in ``data``)."""
    virtual = np.zeros(len(ids), dtype=bool)
    if not table.prepends_space:
        return virtual
    after_added = np.concatenate([[True], table.added[ids[:-1]]])  # a section's first token
    for at in np.nonzero(after_added & table.starts_with_space[ids] & ~table.added[ids])[0].tolist():
        where = int(byte_offsets[at, 0])
        virtual[at] = data[where : where + 1] != b" "
    return virtual


def char_byte_offsets(text: str) -> np.ndarray:
    """``[len(text) + 1]`` int64: the UTF-8 byte offset of each character offset of ``text``."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])


def token_bytes(tokenizer) -> TokenBytes:
    """The :class:`TokenBytes` of ``tokenizer`` (made once per tokenizer object); raises
    :class:`ConfigError` for a tokenizer whose tokens cannot be mapped to exact bytes."""
    return _token_bytes_cached(_Key(tokenizer))


@dataclasses.dataclass(frozen=True)
class _Key:
    tokenizer: object

    def __hash__(self):
        return id(self.tokenizer)

    def __eq__(self, other):
        return isinstance(other, _Key) and other.tokenizer is self.tokenizer


@functools.lru_cache(maxsize=8)
def _token_bytes_cached(key: _Key) -> TokenBytes:
    tokenizer = key.tokenizer
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {name} is a slow (Python) tokenizer without character offsets; {_FIX} "
                          "with a tokenizer.json (a fast tokenizer)")
    spec = json.loads(backend.to_str())
    _check_normalizer(name, spec.get("normalizer"))
    kinds = _component_types(spec.get("pre_tokenizer")) | _component_types(spec.get("decoder"))
    added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if "ByteLevel" in kinds:
        decode = _byte_level_decoder()
    elif "Metaspace" in kinds or _replaces_metaspace(spec.get("decoder")):
        decode = functools.partial(_metaspace_bytes, byte_fallback=bool(spec["model"].get("byte_fallback")))
    else:
        raise ConfigError(f"tokenizer {name} is neither byte-level BPE nor SentencePiece-style (its pre-tokenizer "
                          f"and decoder are {sorted(kinds) or 'none'}); {_FIX}")
    table = tuple(added[i].encode() if i in added else decode(s or "") for i, s in enumerate(strings))
    is_added = np.zeros(len(table), dtype=bool)
    is_added[[i for i in added if i < len(table)]] = True
    return TokenBytes(
        name=name, table=table, lengths=np.fromiter(map(len, table), np.int64, len(table)),
        starts_with_space=np.array([t[:1] == b" " for t in table], dtype=bool), added=is_added,
        prepends_space="Metaspace" in kinds and "ByteLevel" not in kinds,
    )


def _check_normalizer(name: str, normalizer: dict | None) -> None:
    """Allow no normaliser, NFC, or SentencePiece's (Llama 2's) ``Prepend("▁")`` + ``Replace(" ", "▁")``."""
    if normalizer is None:
        return
    kind = normalizer.get("type")
    parts = normalizer.get("normalizers", []) if kind == "Sequence" else [normalizer]
    for part in parts:
        kind = part.get("type")
        ok = kind == "NFC" or (kind == "Prepend" and part.get("prepend") == METASPACE) or (
            kind == "Replace" and part.get("pattern", {}).get("String") == " " and part.get("content") == METASPACE)
        if not ok:
            raise ConfigError(f"tokenizer {name} normalises the text it tokenises ({kind}), so its tokens' byte "
                              f"spans cannot be matched to the text; {_FIX}")


def _component_types(component: dict | None) -> set[str]:
    if not component:
        return set()
    if component.get("type") == "Sequence":
        inner = component.get("pretokenizers") or component.get("decoders") or []
        return set().union(*(_component_types(c) for c in inner)) if inner else set()
    return {component.get("type")}


def _replaces_metaspace(decoder: dict | None) -> bool:
    """Llama 2's decoder: ``Replace("▁", " ")`` (with ByteFallback, Fuse, Strip) instead of Metaspace."""
    if not decoder:
        return False
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "Replace" and p.get("pattern", {}).get("String") == METASPACE for p in parts)


@functools.lru_cache(maxsize=1)
def _byte_level_decoder():
    """GPT-2's byte alphabet: the character that stands for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1

    def decode(token: str) -> bytes:
        if all(c in chars for c in token):
            return bytes(chars[c] for c in token)
        return token.encode()  # not in the byte alphabet: an added token's text

    return decode


def _metaspace_bytes(token: str, *, byte_fallback: bool) -> bytes:
    if byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace(METASPACE, " ").encode()
