"""Bits per byte: a text's cross-entropy in a unit that does not depend on the tokenizer.

``bits_per_byte = NLL / (ln 2 · B)``, with ``NLL`` the model's negative log-likelihood (nats) of the
whole token stream of ``--data`` and ``B`` the UTF-8 bytes of its documents' text. Per-token CE is
not comparable between tokenizers (a token holds more or less text); bits per byte is, when both
count the same bytes and score every token (KD-NOTES.md section 5). Exactly:

- **The stream** is ``--data`` packed as cache-teacher packs text (``concat-eos``): each document's
  tokens, then EOS, cut into rows of ``seq_len``. **Every token of it is scored once**: position
  ``t`` of a row predicts token ``t + 1`` (the positions of the per-token ``ce``); a row's first token
  is predicted by the previous row's last real position (the rows follow each other in the stream:
  a data block's last, padded row continues in the next block's first); the data's very first token
  is predicted after the EOS token alone, as after a document boundary. The EOS tokens are scored
  too: ending a document is part of the text (they cover no bytes).
- **The bytes** are every byte of the documents' text: the sum of the rows' per-token byte lengths
  (:mod:`kdpipe.pipeline.cache.text_spans`), the same for any tokenizer on the same ``--data``. With
  ``--max-rows`` the rows scored, and so the bytes, depend on the tokenizer.

Reported for text ``--data`` (not chat, not a cache) when the model's tokenizer gives exact byte spans
(:mod:`kdpipe.pipeline.data.byte_spans`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class ByteScores:
    """NLL and bytes summed over the rows of a text stream, given in order."""

    def __init__(self, start_logprobs: torch.Tensor | None):
        """``start_logprobs [V]``: the model's log-probabilities after EOS alone (for the data's first
        token); None when the tokenizer has no EOS (then the first token is not scored)."""
        self.nll, self.bytes, self.tokens = 0.0, 0, 0
        self._pending = start_logprobs  # log-probs of what follows the stream so far

    def add(self, logits: torch.Tensor, inputs: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        """One batch of consecutive rows: ``logits [B * L, V]``, ``inputs``, ``mask`` (real tokens) and
        ``lengths`` (bytes of each token) ``[B, L]``."""
        B, L = inputs.shape
        logits = logits.reshape(B, L, -1)
        ids = torch.from_numpy(inputs).to(logits.device)
        real = torch.from_numpy(mask).to(logits.device)
        within = real[:, :-1] & real[:, 1:]  # position t predicts token t + 1 of the same row
        nll = F.cross_entropy(logits[:, :-1].reshape(B * (L - 1), -1).float(), ids[:, 1:].reshape(-1), reduction="none")
        self.nll += float(nll[within.reshape(-1)].sum())
        self.tokens += int(within.sum())
        for r, n in enumerate(mask.sum(axis=1).tolist()):
            if n == 0:
                continue
            if self._pending is not None:  # the row's first token, after the stream before it
                self.nll -= float(self._pending[ids[r, 0]])
                self.tokens += 1
            self._pending = torch.log_softmax(logits[r, n - 1].float(), dim=-1)
        self.bytes += int(lengths[mask].sum())

    def result(self) -> dict:
        bits = self.nll / (math.log(2) * self.bytes) if self.bytes else math.nan
        return {"bits_per_byte": bits, "bytes": self.bytes, "bpb_tokens": self.tokens}


def start_logprobs(model, eos_id: int | None) -> torch.Tensor | None:
    """The model's next-token log-probabilities ``[V]`` after the EOS token alone."""
    if eos_id is None:
        return None
    with torch.no_grad():
        inputs = torch.tensor([[eos_id]], device=model.device)
        logits = model.logits(inputs, torch.ones_like(inputs))  # [1, 1, V]
    return torch.log_softmax(logits[0, 0].float(), dim=-1)
