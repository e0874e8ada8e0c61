"""``kdpipe train-student``: train a student from a teacher cache (the teacher is never loaded)."""

from __future__ import annotations

import click

from kdpipe.pipeline.train import Trainer
from kdpipe.pipeline.train_config import merge_config
from kdpipe.pipeline.storage.location import parse_storage_options
from kdpipe.stages.cli import storage_options_flag, user_errors
from kdpipe.stages.display import Progress, training_fields


@click.command("train-student")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="TOML file of settings; flags override it.")
@click.option("--cache", default=None, help="Teacher cache (from cache-teacher): a directory or an s3:// (gs://, az://) URL.")
@click.option("--student", default=None, help="HF config.json / model dir, or package.module:factory.")
@click.option("--out", default=None, help="Run directory (model/, checkpoint/, metrics.jsonl, run.json).")
@click.option("--loss", default=None, help="forward-kl (default), reverse-kl, js, tvd, skew-kl.")
@click.option("--alpha", default=None, type=float, help="Weight of the KD term (default 0.5); 1 - alpha weighs hard-label CE.")
@click.option("--temperature", default=None, type=float, help="Distillation temperature; must be captured in the cache (default 1).")
@click.option("--schedule", default=None, help='Phases, e.g. "0:T=4,alpha=0.9;600:T=1,alpha=0.5".')
@click.option("--steps", default=None, type=int, help="Optimizer steps (or use --epochs).")
@click.option("--epochs", default=None, type=float, help="Passes over the training rows.")
@click.option("--batch-size", default=None, type=int, help="Rows per micro-batch of each rank (default 8).")
@click.option("--grad-accum", default=None, type=int, help="Micro-batches per optimizer step (default 1).")
@click.option("--lr", default=None, type=float, help="Peak learning rate (default 1e-3).")
@click.option("--warmup", default=None, type=int, help="Linear warmup steps before cosine decay (default 0).")
@click.option("--seed", default=None, type=int)
@click.option("--device", default=None, help="auto (default), cpu, cuda.")
@click.option("--data", default=None, help="The capture's .npz (module/classification caches).")
@click.option("--tokenizer", default=None, help="Tokenizer dir (default: the student's, else the teacher's from the manifest).")
@click.option("--eval-cache", default=None, help="Cache of held-out data to evaluate on (default: a fraction of --cache).")
@click.option("--eval-data", default=None, help="The .npz that --eval-cache was captured from (module caches).")
@click.option("--eval-fraction", default=None, type=float, help="Held-out fraction of cache rows (default 0.05).")
@click.option("--eval-every", default=None, type=int, help="Evaluate every N steps (default 100).")
@click.option("--checkpoint-every", default=None, type=int, help="Checkpoint every N steps (default 100).")
@click.option("--num-workers", default=None, type=int, help="DataLoader worker processes (default 0).")
@click.option("--fused-loss/--no-fused-loss", default=None, help="Compute the lm-head and the loss together, chunk by chunk, so the student's [tokens, vocab] logits never exist (default: on where the student's output layer allows it; run.json says which ran).")
@storage_options_flag
@click.option("--local-cache", default=None, help="Folder keeping shards downloaded from an s3:// (gs://, az://) cache, shared by the processes of this machine and kept between runs [default: a temporary folder holding only the shards in use and read ahead].")
@click.option("--local-cache-gb", default=None, type=float, help="Size limit of --local-cache in GB (10^9 bytes); least recently used shards go first [default: no limit].")
@click.option("--read-ahead", default=None, type=int, help="Shards of a remote cache downloaded ahead of training (default 4).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@user_errors
def train_student(config_file, resume, **flags):
    """Train a student on CACHE with alpha*T^2*KL(p_T||q_T) + (1-alpha)*CE.

    Under torchrun (torchrun --nproc-per-node N kdpipe train-student ...) the ranks train one model
    with DistributedDataParallel; --batch-size is per rank.
    """
    config = merge_config(config_file, {**flags, "storage_options": parse_storage_options(flags["storage_options"])})
    trainer = Trainer(config, resume=resume)
    try:
        trainer.setup()
        with Progress("train-student", total=trainer.total_steps, initial=trainer.step, show=trainer.is_main) as bar:
            metrics = trainer.fit(on_step=lambda m: bar.update(1, **training_fields(m, config.loss)))
        manifest = trainer.finish(metrics)
    finally:
        trainer.close()
    if manifest is None:
        return  # not rank 0: rank 0 reports
    final = manifest.get("final_eval_metrics") or {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, float))
    ranks = f" on {trainer.world_size} ranks" if trainer.world_size > 1 else ""
    click.echo(f"wrote {config.out}/model after {trainer.step} steps{ranks}" + (f"; held-out: {summary}" if summary else ""))
