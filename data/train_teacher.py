"""Train the demo teacher: a small Llama causal LM on data/shakespeare/train.

Usage:
    python data/train_teacher.py                 # CPU, 2 threads: ~10-12 min when idle
    python data/train_teacher.py --device cuda   # same recipe on a GPU (the shipped weights)

Everything is seeded and the number of steps is fixed (not time-based), so a re-run
on the same device and torch build should give the same weights. Prints the held-out
cross-entropy next to a unigram baseline, so the teacher's quality is visible at a glance.
"""

import argparse
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

DATA = Path(__file__).resolve().parent


def token_stream(tok, split: str) -> torch.Tensor:
    # Documents (plays) are concatenated with <|endoftext|> in front of each, the
    # same layout a student pipeline sees, in sorted-file order for determinism.
    ids = []
    for f in sorted((DATA / "shakespeare" / split).glob("*.txt")):
        ids.append(tok.eos_token_id)
        ids.extend(tok(f.read_text(encoding="utf-8"))["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def chunks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    # Non-overlapping windows for evaluation; the ragged tail is dropped.
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def mean_ce(model, rows: torch.Tensor, device, batch: int = 64) -> float:
    # Token-weighted mean over all predicted positions (seq_len - 1 per row).
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i : i + batch].to(device)
        n = x.shape[0] * (x.shape[1] - 1)  # predicted positions in this batch
        total += model(input_ids=x, labels=x).loss.item() * n
        count += n
    model.train()
    return total / count


def unigram_ce(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    # Add-one smoothed unigram model fitted on train, scored on held-out: the
    # baseline any useful language model must beat by a wide margin.
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return -logp[held].mean().item()


def add_dropout(model, p: float) -> None:
    # Llama has no embedding/residual dropout, and with ~0.5 M training tokens a 3.4 M
    # parameter model over-fits within a few epochs. Forward hooks add dropout to the
    # embeddings and to each attention/MLP output before it joins the residual stream.
    # They act only in train mode and are not part of the saved model.
    def hook(module, inputs, out):
        if isinstance(out, tuple):  # attention returns (hidden, attn_weights)
            return (F.dropout(out[0], p, module.training),) + out[1:]
        return F.dropout(out, p, module.training)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DATA / "teacher"))
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    ap.add_argument("--dropout", type=float, default=0.1, help="embedding/residual dropout (training only)")
    ap.add_argument("--attn-dropout", type=float, default=0.0)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    tok = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    train = token_stream(tok, "train")
    held = token_stream(tok, "heldout")
    held_rows = chunks(held, args.seq_len)
    # An equally sized, evenly spaced sample of training windows to compare
    # train vs held-out loss (i.e. to see over-fitting) at the same cost.
    train_rows = chunks(train, args.seq_len)
    train_rows = train_rows[torch.linspace(0, len(train_rows) - 1, len(held_rows)).long()]
    vocab = len(tok)
    print(f"train tokens {len(train)}  held-out tokens {len(held)}  vocab {vocab}")
    print(f"unigram held-out CE {unigram_ce(train, held, vocab):.4f} nats")

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=256,
        tie_word_embeddings=args.tie,
        attention_dropout=args.attn_dropout,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).to(device)
    if args.dropout > 0:
        add_dropout(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}")

    # No weight decay on norms (1-D gains), as is usual for transformers.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:  # linear warmup, then cosine down to min_lr_frac * lr
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))

    # Random window starts from a dedicated seeded generator: a fixed data order,
    # and across epochs the model sees shifted windows rather than identical chunks.
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len)
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq_len, (args.batch,), generator=gen)
        x = train[starts[:, None] + offsets].to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  held-out CE {mean_ce(model, held_rows, device):.4f}  "
                  f"lr {lr_at(step):.2e}  {time.time() - t0:.0f}s", flush=True)
    train_time = time.time() - t0

    train_ce, held_ce = mean_ce(model, train_rows, device), mean_ce(model, held_rows, device)
    print(f"final: train CE {train_ce:.4f}  held-out CE {held_ce:.4f} (ppl {math.exp(held_ce):.1f})  "
          f"train time {train_time / 60:.1f} min")

    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=True, temperature=0.8, top_k=50, max_new_tokens=128,
    )
    model.to("cpu").save_pretrained(args.out, safe_serialization=True)
    # Ship the tokenizer files next to the weights so the directory is self-contained
    # (copied verbatim, so data/tokenizer and the teacher's copy can never diverge).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DATA / "tokenizer" / name, Path(args.out) / name)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
