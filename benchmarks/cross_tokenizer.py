"""A student with another tokenizer, distilled from the same cache (issue 24): what each loss buys.

    python benchmarks/cross_tokenizer.py --out benchmarks/results/cross_tokenizer_cpu.json
    python benchmarks/cross_tokenizer.py --steps 5 --rows 64 --seeds 0 --out /tmp/smoke.json   # does it run

One cache of the shipped teacher (``data/teacher``, byte-level BPE, V = 2,048) over the first ``--rows``
128-token rows of the training plays (top-32, T = 1). On it, with ``train-student`` (``--batch-size``, lr 3e-3,
warmup 20, ``--steps``, alpha 0.5 for the KD runs, forward KL, 5% of the rows held out):

- the Unigram student (``data/students/lm-student-unigram.json`` with ``data/tokenizer-unigram``, 1,500
  tokens, metaspace, byte fallback): ``hard-labels`` (alpha 0: CE on its own tokens only) and each
  ``--cross-tokenizer-loss``: ``exact-map``, ``uld``, ``exact-map+uld``, ``prefix-map``;
- for reference, the same architecture with the teacher's tokenizer (``data/students/lm-student.json``):
  ``bpe-hard-labels`` (alpha 0) and ``bpe-cached-kd`` (ordinary cached KD, alpha 0.5).

Every trained student (and the teacher) is scored in **bits per byte** on the held-out play
(``data/shakespeare/heldout``): its first 20,000 characters cut between lines into pieces of at most 300 bytes, each piece
scored alone as ``[EOS] + tokens(piece)`` (every byte of every piece predicted, from the same context for
every model): ``sum CE (nats) / (ln 2 * bytes)``. This is this script's own computation (not
``kdpipe evaluate``), so that all models count exactly the same bytes. Also recorded: the share of
student positions aligned (the runs' held-out ``aligned_share``), and the cache's bytes per token.

``--stand-in-text``: if the cache records no text (a kdpipe without the capture side of issue 24), the
rows' text is rebuilt from the teacher's token ids (exact for a byte-level BPE teacher: each id is its
bytes; segments between EOS tokens) and installed in place of ``kdpipe.pipeline.cache.text_spans``;
the JSON says which source was used.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DATA = REPO / "data"
VARIANTS = {  # name: (student config, tokenizer dir or None, alpha, cross-tokenizer loss)
    "hard-labels": ("lm-student-unigram.json", "tokenizer-unigram", 0.0, "exact-map"),
    "exact-map": ("lm-student-unigram.json", "tokenizer-unigram", 0.5, "exact-map"),
    "uld": ("lm-student-unigram.json", "tokenizer-unigram", 0.5, "uld"),
    "exact-map+uld": ("lm-student-unigram.json", "tokenizer-unigram", 0.5, "exact-map+uld"),
    "prefix-map": ("lm-student-unigram.json", "tokenizer-unigram", 0.5, "prefix-map"),
    "prefix-groups": ("lm-student-unigram.json", "tokenizer-unigram", 0.5, "prefix-groups"),
    "first-byte": ("lm-student-unigram.json", "tokenizer-unigram", 0.5, "first-byte"),
    "bpe-hard-labels": ("lm-student.json", None, 0.0, None),
    "bpe-cached-kd": ("lm-student.json", None, 0.5, None),
}


def cli(*args) -> None:
    from kdpipe.stages.cli import main

    main.main([str(a) for a in args], prog_name="kdpipe", standalone_mode=False)


def install_stand_in_text() -> None:
    """Row text from the teacher's ids (byte-level BPE: exact), as text_spans.row_text would give it."""
    import dataclasses
    import types

    import numpy as np
    from transformers import AutoTokenizer

    from kdpipe.pipeline.train.xtok.vocab_map import token_bytes

    table = token_bytes(AutoTokenizer.from_pretrained(DATA / "teacher"))

    @dataclasses.dataclass
    class RowText:
        text: bytes
        token_spans: np.ndarray
        segments: list

    def row_text(schema, raw):
        lengths = np.array([len(table[i]) if table[i] is not None and m else 0 for i, m in zip(raw["input_ids"], raw["mask"])])
        ends = np.cumsum(lengths)
        text = b"".join(table[i] for i, m in zip(raw["input_ids"], raw["mask"]) if m and table[i] is not None)
        segments, start = [], None
        for a, b in zip(ends - lengths, ends):
            if b > a and start is None:
                start = a
            elif b == a and start is not None:
                segments.append(("text", int(start), int(a)))
                start = None
        if start is not None:
            segments.append(("text", int(start), int(ends[-1])))
        return RowText(text, np.stack([ends - lengths, ends], axis=1), segments)

    tables = {}

    def token_byte_spans(tokenizer, text):
        if id(tokenizer) not in tables:
            tables[id(tokenizer)] = token_bytes(tokenizer)
        own = tables[id(tokenizer)]
        ids = tokenizer.encode(text, add_special_tokens=False)
        lengths = np.array([len(own[i]) for i in ids], dtype=np.int64)
        if len(ids) and own[ids[0]].startswith(b" ") and not text.startswith(" "):
            lengths[0] -= 1  # the prepended metaspace covers no text
        ends = np.cumsum(lengths)
        return np.asarray(ids, np.int64), np.stack([ends - lengths, ends], axis=1)

    spans = types.ModuleType("kdpipe.pipeline.cache.text_spans")
    spans.RowText, spans.row_text, spans.has_text = RowText, row_text, lambda schema: True
    sys.modules[spans.__name__] = spans
    byte_spans = types.ModuleType("kdpipe.pipeline.data.byte_spans")
    byte_spans.token_byte_spans = token_byte_spans
    sys.modules[byte_spans.__name__] = byte_spans


def heldout_pieces(max_bytes: int = 300, limit: int = 20_000) -> list[str]:
    text = "".join(p.read_text() for p in sorted((DATA / "shakespeare" / "heldout").glob("*.txt")))[:limit]
    pieces, current = [], ""
    for block in text.splitlines(keepends=True):  # whole lines, at most max_bytes together
        if current and len((current + block).encode()) > max_bytes:
            pieces.append(current)
            current = ""
        current += block
    return pieces + ([current] if current else [])


def bits_per_byte(model_dir: Path, pieces: list[str]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nats, total_bytes = 0.0, 0
    with torch.no_grad():
        for piece in pieces:
            ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer.encode(piece, add_special_tokens=False)])
            assert ids.shape[1] <= model.config.max_position_embeddings, "a held-out piece is longer than the model's context"
            logits = model(ids).logits[0, :-1].float()
            nats += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            total_bytes += len(piece.encode())
    return nats / (math.log(2) * total_bytes)


def train(cache: Path, out: Path, variant: str, seed: int, steps: int, batch_size: int) -> dict:
    config, tokenizer, alpha, loss = VARIANTS[variant]
    extra = ["--tokenizer", DATA / tokenizer, "--cross-tokenizer-loss", loss] if tokenizer else ["--tokenizer", DATA / "teacher"]
    started = time.perf_counter()
    cli("train-student", "--cache", cache, "--student", DATA / "students" / config, "--out", out, "--steps", steps,
        "--batch-size", batch_size, "--lr", 3e-3, "--warmup", 20, "--alpha", alpha, "--seed", seed, "--eval-fraction", 0.05,
        "--eval-every", steps, "--eval-rows", 32, "--checkpoint-every", 0, "--log-every", 50, "--device", "cpu", *extra)
    run = json.loads((out / "run.json").read_text())
    return {"seconds": time.perf_counter() - started, "held_out_in_run": run.get("final_eval_metrics")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--stand-in-text", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="xtok_bench_"))
    cache = work / "cache"
    cli("cache-teacher", "--teacher", DATA / "teacher", "--data", DATA / "shakespeare" / "train", "--out", cache,
        "--top-k", 32, "--seq-len", 128, "--temperature", 1, "--limit-rows", args.rows, "--device", "cpu")
    manifest = json.loads((cache / "manifest.json").read_text())
    from kdpipe.pipeline.cache.reader import TeacherCache
    from kdpipe.pipeline.cache.text_spans import has_text

    recorded = has_text(TeacherCache(cache).schema)
    text_source = "the cache's recorded text" if recorded else None
    if not recorded:
        if not args.stand_in_text:
            sys.exit("the cache records no text; pass --stand-in-text to rebuild it from the teacher's ids")
        install_stand_in_text()
        text_source = "stand-in: rebuilt from the teacher's ids (exact for its byte-level BPE), cache recorded none"
    pieces = heldout_pieces()
    report = {
        "command": " ".join(["python", *sys.argv]), "machine": platform.machine(), "python": platform.python_version(),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "settings": {"rows": args.rows, "steps": args.steps, "seeds": args.seeds, "batch_size": args.batch_size, "lr": 3e-3,
                     "alpha_kd": 0.5, "top_k": 32, "seq_len": 128, "temperature": 1.0,
                     "heldout": f"{len(pieces)} pieces of <= 300 bytes, {sum(len(p.encode()) for p in pieces)} bytes"},
        "text_source": text_source, "cache_bytes_per_token": manifest["totals"]["bytes_per_token"],
        "results": {"teacher": {"bits_per_byte": bits_per_byte(DATA / "teacher", pieces)}},
    }
    runs: dict[str, list] = {variant: [] for variant in args.variants}
    for seed in args.seeds:  # every variant of a seed before the next seed: a cut-off run still compares them
        for variant in args.variants:
            out = work / f"{variant}-{seed}"
            record = train(cache, out, variant, seed, args.steps, args.batch_size)
            record["bits_per_byte"] = bits_per_byte(out / "model", pieces)
            record["seed"] = seed
            runs[variant].append(record)
            print(variant, seed, f"{record['bits_per_byte']:.4f}", f"{record['seconds']:.0f}s", flush=True)
            report["results"][variant] = summary(runs[variant])
            report["wall_seconds"] = time.perf_counter() - started
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")  # after every run: a cut-off run keeps its part
    print(json.dumps({k: (v.get("bits_per_byte_mean", v.get("bits_per_byte")), v.get("bits_per_byte_spread"),
                          v.get("aligned_share_mean")) for k, v in report["results"].items()}, indent=1))


def summary(runs: list[dict]) -> dict:
    bpb = [r["bits_per_byte"] for r in runs]
    shares = [(r["held_out_in_run"] or {}).get("aligned_share") for r in runs]
    return {"bits_per_byte_mean": statistics.mean(bpb), "bits_per_byte_spread": max(bpb) - min(bpb), "runs": runs,
            "aligned_share_mean": statistics.mean(shares) if None not in shares else None}


if __name__ == "__main__":
    main()
