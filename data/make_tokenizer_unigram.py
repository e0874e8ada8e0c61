"""Train the second demo tokenizer: a SentencePiece-style Unigram model on data/shakespeare/train.

Usage:
    python data/make_tokenizer_unigram.py [OUT]    # OUT defaults to data/tokenizer-unigram

Writes data/tokenizer-unigram/ (tokenizer.json + tokenizer_config.json), loadable with
transformers.AutoTokenizer.from_pretrained("data/tokenizer-unigram"). It is of another family than
the demo's byte-level BPE (data/tokenizer/): a Unigram model of 1,500 pieces with a Metaspace
pre-tokenizer (a space becomes "▁", one "▁" is prepended to a text) and byte fallback (a character
outside the vocabulary becomes its UTF-8 bytes as "<0xNN>" pieces, so there is no unknown token),
as Llama 2's, Mistral's and Gemma's tokenizers are. A student with this tokenizer distils from the
demo teacher's cache across tokenizers (README "A student with another tokenizer").

Unigram training in `tokenizers` has no random state (EM over the seed pieces); it runs on one
thread here and the scores are rounded to 6 decimals, so the files come out byte-identical on every
run (checked by tests/data/test_byte_spans.py); the input order is fixed (sorted file names), and SEED
is set anyway for any library that draws.
"""

import json
import os
import random
import sys
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: the EM sums come out the same every run
os.environ["RAYON_NUM_THREADS"] = "1"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parent
VOCAB_SIZE = 1500
SEED = 0
EOS, BOS, UNK = "</s>", "<s>", "<unk>"  # ids 0, 1, 2; byte fallback means <unk> never appears
SPECIALS = [EOS, BOS, UNK]
BYTES = [f"<0x{b:02X}>" for b in range(256)]  # byte-fallback pieces, ids 3..258
BYTE_PIECE_SCORE = -1e4  # log-probability of a byte piece as a piece of text: never chosen

# The same ChatML-style turns as the BPE tokenizer's (data/make_tokenizer.py), ended by its eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def main(out: Path = DATA / "tokenizer-unigram") -> None:
    random.seed(SEED)
    files = sorted((DATA / "shakespeare" / "train").glob("*.txt"))
    docs = [f.read_text(encoding="utf-8") for f in files]

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[*SPECIALS, *BYTES],
        unk_token=UNK,
        initial_alphabet=list("<>x0123456789ABCDEF"),  # "<0x41>" typed in a text has a path of pieces
        max_piece_length=16,
        shrinking_factor=0.75,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    _enable_byte_fallback(tok)

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS, unk_token=UNK, pad_token=EOS)
    fast.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # understood by transformers 4.x and 5
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    n_chars = sum(len(d) for d in docs)
    n_tokens = sum(len(tok.encode(d).ids) for d in docs)
    print(f"vocab {tok.get_vocab_size()}  train {n_chars} chars -> {n_tokens} tokens "
          f"({n_chars / n_tokens:.2f} chars/token)  saved to {out}")


def _enable_byte_fallback(tok: Tokenizer) -> None:
    """Turn on the Unigram model's byte fallback (the trainer has no switch for it); the byte pieces
    are in the vocabulary as special tokens so that training never merges them. Their added-token
    entries are dropped again and their scores made far lower than any path through other pieces, so
    that "<0x41>" typed in a text is text, never the byte piece (as in SentencePiece, where byte
    pieces only stand for bytes)."""
    spec = json.loads(tok.to_str())
    spec["model"]["byte_fallback"] = True
    fixed = len(SPECIALS) + len(BYTES)  # ids 0..258 as given
    for entry in spec["model"]["vocab"]:
        entry[1] = BYTE_PIECE_SCORE if entry[0] in BYTES else round(entry[1], 6)  # 6 decimals: same file every run
    # The trainer ends the vocabulary with the characters it must keep, in a hash map's (per-process
    # random) order with made-up decreasing scores, and lists other pieces of equal score in that order
    # too: give those characters one score (the lowest) and sort pieces by score, then by text.
    learnt = spec["model"]["vocab"][fixed:]
    start = len(learnt)
    while start > 0 and len(learnt[start - 1][0]) == 1 and learnt[start - 1][1] - learnt[-1][1] < 0.01:
        start -= 1
    for entry in learnt[start:]:
        entry[1] = learnt[-1][1]
    spec["model"]["vocab"][fixed:] = sorted(learnt, key=lambda e: (-e[1], e[0]))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in BYTES]
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True},
    ]}
    fresh = Tokenizer.from_str(json.dumps(spec))
    tok.__setstate__(fresh.__getstate__())


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:2]))
