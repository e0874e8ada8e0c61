"""Tokenizers: loading one, and the fingerprint a cache records to tell two tokenizers apart."""

from __future__ import annotations

import hashlib

from kdpipe.pipeline.errors import ConfigError


def load_tokenizer(path: str | None, *, required: bool):
    """The tokenizer in ``path``; None when there is none and it was not asked for explicitly."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        if required:
            raise ConfigError(f"cannot load the tokenizer in {path}: {str(exc).splitlines()[0]}; pass a directory with tokenizer files") from None
        return None


def tokenizer_fingerprint(tokenizer) -> dict:
    """Hash of the tokenizer's full definition plus its vocabulary size and special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:  # slow tokenizer: its vocabulary is its definition
        definition = repr(sorted(tokenizer.get_vocab().items()))
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    return {
        "sha256": hashlib.sha256(definition.encode()).hexdigest(),
        "vocab_size": len(tokenizer),
        "special_ids": special,
        "class": type(tokenizer).__name__,
    }
