"""Student step time with cached top-k KD vs hard-label CE only vs online KD (teacher in memory),
and the data loader's rows/s against what the training step consumes. One process, interleaved.

    python benchmarks/train.py --teacher data/teacher --data data/shakespeare/train

Builds a cache of --rows rows first (or uses --cache), then times --steps steps of each variant on
the same prefetched batches, --repeats times, and reports medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kdpipe.pipeline.capture import CaptureSettings, plan_capture, run_capture
from kdpipe.pipeline.train.losses import dense_kd_loss, hard_label_ce
from kdpipe.pipeline.train.targets import teacher_targets
from kdpipe.pipeline.train.trainer import Trainer
from kdpipe.pipeline.train.config import TrainConfig

STUDENT = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128, intermediate_size=344,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="data/teacher")
    p.add_argument("--synthetic", default=None, help="random-init teacher shape from benchmarks/capture.py")
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--data", default="data/shakespeare/train")
    p.add_argument("--cache", default=None)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or str(Path(tmp) / "cache")
        if args.synthetic:
            from capture import synthetic_teacher

            args.teacher = synthetic_teacher(args.synthetic, Path(tmp) / "teacher", args.device)
        if args.cache is None:
            plan = plan_capture(CaptureSettings(teacher=args.teacher, data=args.data, out=cache, top_k=args.top_k,
                                                temperatures=(1.0, args.temperature), seq_len=args.seq_len,
                                                limit_rows=args.rows, device=args.device))
            run_capture(plan)
            teacher = plan.teacher
        else:
            from kdpipe.pipeline.capture import load_teacher
            from kdpipe import open_cache

            m = open_cache(cache).manifest
            teacher = load_teacher(CaptureSettings(teacher=m["capture"]["teacher"], data=m["capture"]["data"], out=tmp,
                                                   device=args.device), load_weights=True)
        student_json = Path(tmp) / "student.json"
        student_json.write_text(json.dumps({**STUDENT, "vocab_size": teacher.vocab_size, "hidden_size": args.student_hidden,
                                            "intermediate_size": args.student_hidden * 8 // 3,
                                            "num_hidden_layers": args.student_layers}))
        trainer = Trainer(TrainConfig(cache=cache, student=str(student_json), out=str(Path(tmp) / "run"), steps=1,
                                      batch_size=args.batch_size, device=args.device, eval_fraction=0.0,
                                      num_workers=args.num_workers))
        trainer.setup()
        report = benchmark(trainer, teacher, args)
    print(json.dumps(report, indent=2))


def benchmark(trainer, teacher, args) -> dict:
    device, opt = trainer.device, trainer.optimizer
    batches = [b for _, b in zip(range(args.steps), trainer.batches())]
    T = args.temperature

    def step_cached_kd(batch):
        trainer.loss(batch, temperature=T, alpha=0.5)["loss"].backward()

    def step_ce_only(batch):
        trainer.loss(batch, temperature=T, alpha=0.0)["loss"].backward()

    def step_online_kd(batch):
        ids = batch["input_ids"].to(device)
        with torch.no_grad():
            teacher_logits = teacher.logits(ids).float()
        logits = trainer.student_logits(batch).float()
        v = logits.shape[-1]
        targets = teacher_targets({k: x.to(device) for k, x in batch.items()}, temperature_index=0, temperature=1.0, task="causal-lm")
        kd = dense_kd_loss(logits.reshape(-1, v), teacher_logits.reshape(-1, v), temperature=T, mask=targets.kd_mask)
        ce = hard_label_ce(logits.reshape(-1, v), targets.labels, mask=targets.ce_mask)
        (0.5 * kd + 0.5 * ce).backward()

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            step(batch)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(batches)

    variants = {"cached_topk_kd": step_cached_kd, "hard_label_ce": step_ce_only, "online_kd": step_online_kd}
    for step in variants.values():  # warm-up
        timed(step)
    times = {name: [] for name in variants}
    loader_rows_per_s = []
    for _ in range(args.repeats):
        for name, step in variants.items():
            times[name].append(timed(step))
        start, rows = time.perf_counter(), 0
        for batch in DataLoader(trainer.train_set, batch_size=None, num_workers=args.num_workers):
            rows += len(batch["sample_index"])
        loader_rows_per_s.append(rows / (time.perf_counter() - start))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    consumed = args.batch_size / (med["cached_topk_kd"] / 1000)
    return {
        "device": str(device), "batch": f"{args.batch_size}x{args.seq_len}", "top_k": trainer.cache.schema.top_k,
        "vocab": teacher.vocab_size, "student_params": sum(p.numel() for p in trainer.model.parameters()),
        "step_ms": med, "ratio_to_hard_label_ce": {k: v / med["hard_label_ce"] for k, v in med.items()},
        "loader_rows_per_s": statistics.median(loader_rows_per_s), "step_consumes_rows_per_s": consumed,
        "loader_headroom": statistics.median(loader_rows_per_s) / consumed, "repeats": args.repeats,
    }


if __name__ == "__main__":
    main()
