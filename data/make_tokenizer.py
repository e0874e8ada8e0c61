"""Train the demo byte-level BPE tokenizer on data/shakespeare/train.

Usage:
    python data/make_tokenizer.py

Writes data/tokenizer/ (tokenizer.json + tokenizer_config.json), loadable with
transformers.AutoTokenizer.from_pretrained("data/tokenizer"). BPE training is
deterministic for a fixed input, and the input order is fixed (sorted file names).
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parent
VOCAB_SIZE = 2048
EOT = "<|endoftext|>"  # the one special token: document separator, eos, bos and pad


# ChatML-style turns in plain text; each turn ends with the one end-of-text token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|endoftext|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def main() -> None:
    files = sorted((DATA / "shakespeare" / "train").glob("*.txt"))
    docs = [f.read_text(encoding="utf-8") for f in files]

    # GPT-2 style byte-level BPE: every byte is in the base alphabet, so there is no
    # unknown token and any UTF-8 text round-trips exactly.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT,
        bos_token=EOT,
        pad_token=EOT,
        unk_token=None,
    )
    out = DATA / "tokenizer"
    fast.save_pretrained(out)
    # transformers 5 records its new class name "TokenizersBackend"; the 4.x name is
    # understood by both, and pyproject allows transformers>=4.45.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE  # for the chat demo (data/chat); no generation markers
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    n_chars = sum(len(d) for d in docs)
    n_tokens = sum(len(tok.encode(d).ids) for d in docs)
    print(f"vocab {tok.get_vocab_size()}  train {n_chars} chars -> {n_tokens} tokens "
          f"({n_chars / n_tokens:.2f} chars/token)  saved to {out}")


if __name__ == "__main__":
    main()
