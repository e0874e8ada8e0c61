"""``kdpipe train-student``: train a student from a teacher cache (the teacher is never loaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from kdpipe.pipeline.cache.reader import DEFAULT_READ_AHEAD
from kdpipe.pipeline.cache.storage.location import parse_storage_options
from kdpipe.pipeline.distributed import PeerStopped
from kdpipe.pipeline.evaluate.plots import plot_training_curves
from kdpipe.pipeline.train.config import TrainConfig, merge_config
from kdpipe.pipeline.train.losses import KINDS
from kdpipe.pipeline.train.trainer import Trainer
from kdpipe.stages.display import Progress, training_fields
from kdpipe.stages.options import storage_options_flag, threads_flag, user_errors

_DEFAULTS = TrainConfig()  # each flag's default is the setting's (shown by --help)
_REQUIRED = "  [required unless in --config or restored by --resume]"


def setting(flag: str, help: str, **kwargs):
    """A flag for the TrainConfig field of the same name, with that field's default."""
    name = flag.split("/")[0].removeprefix("--").replace("-", "_")
    default = kwargs.pop("default", getattr(_DEFAULTS, name))
    default = None if default == "" else default  # cache, student, out: no default
    return click.option(flag, name, default=default, show_default=default is not None, help=help, **kwargs)


@click.command("train-student")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="TOML file of settings (keys: the flag names); flags override it.")
@setting("--cache", "Teacher cache (from cache-teacher): a directory or an s3:// (gs://, az://) URL." + _REQUIRED)
@setting("--student", "HF config.json (random init), HF model dir, or module:factory." + _REQUIRED)
@setting("--out", "Run directory (model/, checkpoint/, metrics.jsonl, run.json, curves.png).  [required unless in --config]")
@setting("--loss", "Distillation loss: " + ", ".join(KINDS) + ".")
@setting("--alpha", "Weight of the KD term; 1 - alpha weighs hard-label CE.", type=float)
@setting("--temperature", "Distillation temperature; must be captured in the cache.", type=float)
@setting("--schedule", 'Phases from a step on, e.g. "0:T=4,alpha=0.9;600:T=1,alpha=0.5".  [default: none]')
@setting("--steps", "Optimizer steps; with --resume, a larger value extends the run." + "  [this or --epochs required unless in --config or restored by --resume]", type=int)
@setting("--epochs", "Passes over the training rows; with --resume, a larger value extends the run.", type=float)
@setting("--batch-size", "Rows per micro-batch of each rank.", type=int)
@setting("--grad-accum", "Micro-batches per optimizer step.", type=int)
@setting("--lr", "Peak learning rate (AdamW).", type=float)
@setting("--warmup", "Linear warmup steps before the cosine decay.", type=int)
@setting("--min-lr-ratio", "The cosine decay ends at lr x this at the last step.", type=float)
@setting("--weight-decay", "AdamW weight decay.", type=float)
@setting("--clip", "Clip the gradient norm to this (0: no clipping).", type=float)
@setting("--seed", "Seed of the student's initialisation and of the row order.", type=int)
@setting("--device", "auto, cpu, cuda or cuda:N.")
@setting("--data", "The capture's .npz (module/classification caches).")
@setting("--tokenizer", "Tokenizer dir.  [default: the student's, else the teacher's from the manifest]")
@setting("--eval-cache", "Cache of held-out data to evaluate on.  [default: --eval-fraction of --cache]")
@setting("--eval-data", "The .npz that --eval-cache was captured from (module caches).")
@setting("--eval-fraction", "Held-out fraction of cache rows (when no --eval-cache).", type=float)
@setting("--eval-every", "Evaluate every N steps and at the last (0: never).", type=int)
@setting("--eval-rows", "Held-out rows each evaluation uses (the first N).", type=int)
@setting("--checkpoint-every", "Checkpoint every N steps and at the last (0: never; the run cannot be resumed).", type=int)
@setting("--log-every", "Write the training metrics every N steps.", type=int)
@setting("--shuffle-buffer", "Rows shuffled together within each shard's order (1: none).", type=int)
@setting("--num-workers", "DataLoader worker processes.", type=int)
@setting("--fused-loss/--no-fused-loss", "Compute the lm-head and the loss together, chunk by chunk, so the student's [tokens, vocab] logits never exist (only where the student's output layer allows it; run.json says which ran).")
@setting("--cross-tokenizer-loss", "For a student whose tokenizer differs from the cache's (--tokenizer DIR; the cache must record text): exact-map (the teacher's top-k mapped onto student tokens with the same bytes, the rest in one bin; --loss applies), uld (L1 between the sorted probabilities), exact-map+uld (their sum), prefix-map (exact-map's bins with each teacher token mapped onto the longest student token its bytes begin with), prefix-groups (both vocabularies cut into groups of tokens that begin one another, e.g. ' king', ' kingdom', ' kings'; the KL between the two sides' group masses; the default: the best measured) or first-byte (the KL between the two models' next-byte distributions). KD counts where both tokenizations end at the same byte; CE at every student position.")
@setting("--sharding", "How torchrun's ranks hold the student: ddp (a whole copy each; fits while the student + gradients + AdamW state, ~16 bytes a parameter, fit one device) or fsdp (FSDP2: each rank a 1/N shard of every layer, gathered layer by layer; for students beyond that). One process trains the plain student either way.", type=click.Choice(["ddp", "fsdp"]))
@setting("--cpu-offload/--no-cpu-offload", "With --sharding fsdp under torchrun on GPUs: keep the parameter, gradient and optimizer shards in CPU memory (slower; for students whose shards do not fit the GPUs).")
@setting("--gradient-checkpointing/--no-gradient-checkpointing", "Recompute each decoder layer's activations in the backward pass (Hugging Face students): less activation memory, about one more forward per step, the same gradients.")
@setting("--lora-r", "Train LoRA adapters of this rank (peft) instead of every weight; needs a pretrained --student DIR. model/ gets the merged model, adapter/ the adapter.  [default: off]", type=int)
@setting("--lora-alpha", "LoRA scaling: each adapted layer adds (alpha / r) B A to its frozen weight.  [default: 2 x --lora-r]", type=float)
@setting("--lora-targets", "Layers given adapters, by module name (q_proj,v_proj; repeat or comma-separate), or all-linear: every linear layer but the lm-head.  [default: all-linear]", multiple=True, default=None)
@setting("--report-to", "Also send the metrics to: none, tensorboard (RUN_DIR/tensorboard), wandb, mlflow; repeat or comma-separate for several.", multiple=True, default=("none",))
@storage_options_flag
@setting("--local-cache", "Folder keeping shards downloaded from an s3:// (gs://, az://) cache, shared by the processes of this machine and kept between runs.  [default: a temporary folder holding only the shards in use and read ahead]")
@setting("--local-cache-gb", "Size limit of --local-cache in GB (10^9 bytes); least recently used shards go first.  [default: no limit]", type=float)
@setting("--read-ahead", f"Shards of a remote cache downloaded ahead of training.  [default: {DEFAULT_READ_AHEAD}]", type=int)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint, with the settings its run.json records (flags given must match them, except a larger --steps/--epochs, which extends the run).")
@threads_flag
@user_errors(on_interrupt="the run in --out is kept up to its last checkpoint; re-run the same command with --resume to continue from there")
def train_student(config_file, resume, **flags):
    """Train a student on CACHE with alpha*T^2*KL(p_T||q_T) + (1-alpha)*CE.

    Under torchrun (torchrun --nproc-per-node N kdpipe train-student ...) the ranks train one model
    with DistributedDataParallel, or sharded by FSDP2 with --sharding fsdp; --batch-size is per rank.
    """
    config = merge_config(config_file, given_flags(flags), resume=resume)
    trainer = Trainer(config, resume=resume)
    try:
        trainer.setup()
        if trainer.finished_already:
            if trainer.is_main:
                click.echo(f"{config.out} already holds this finished run ({trainer.step} steps); nothing to do "
                           "(a larger --steps or --epochs extends it)")
            return
        with Progress("train-student", total=trainer.total_steps, initial=trainer.step, show=trainer.is_main) as bar:
            metrics = trainer.fit(on_step=lambda m: bar.update(1, **training_fields(m, config.loss)))
        manifest = trainer.finish(metrics)
    except PeerStopped as exc:  # another rank failed and printed its error: line; this one says it stopped
        click.echo(str(exc), err=True)
        sys.exit(1)
    finally:
        trainer.close()
    if manifest is None:
        return  # not rank 0: rank 0 reports
    out = Path(config.out)
    plot_training_curves({out.name: out / "metrics.jsonl"}, out / "curves.png")
    final = manifest.get("final_eval_metrics") or {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, float))
    ranks = f" on {trainer.world_size} ranks" if trainer.world_size > 1 else ""
    click.echo(f"wrote {config.out}/model after {trainer.step} steps{ranks}" + (f"; held-out: {summary}" if summary else ""))


def given_flags(flags: dict) -> dict:
    """The flags given on the command line (the others are left to --config, the resumed run or the
    defaults), ``--storage-options`` parsed."""
    ctx = click.get_current_context()
    given = {name: value for name, value in flags.items()
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    if given.get("storage_options") is not None:
        given["storage_options"] = parse_storage_options(given["storage_options"])
    return given
