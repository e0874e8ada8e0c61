"""Stage two: train a student from a teacher cache, never loading the teacher.

:class:`Trainer` reads top to bottom: ``setup`` (cache, splits, student, optimizer, resume),
``fit`` (the loop: schedule, accumulate, clip, step, log, evaluate, checkpoint), ``finish`` (final
model and run manifest). Outputs in ``out``: ``run.json`` (run manifest), ``metrics.jsonl``,
``checkpoint/`` (for ``--resume``) and ``model/`` (the trained student).

Resuming and extending. ``Trainer(config, resume=True)`` continues the run in ``out`` from its last
checkpoint: model, optimizer, RNG, data order (epoch and batches consumed) and step, so a resumed run
ends where the uninterrupted one would. A larger ``steps`` (or ``epochs``) than the run recorded extends
it, also once finished; what happens to the schedules is fixed by the rule that every schedule is a
function of the step number alone:

- learning rate at step ``s`` (0-based): ``lr * warmup_cosine(s, total=T, warmup, min_lr_ratio)`` with
  ``T`` the run's *current* total of steps. The steps done before the extension keep the rates they
  had; from the step reached ``N`` on, the rate follows the curve of the new total: linear warmup (if
  ``N < warmup``), then cosine from ``lr`` at the end of warmup to ``min_lr_ratio * lr`` at the new last
  step. A finished run of 60 steps extended to 80 thus goes from the floor ``min_lr_ratio * lr`` (its
  step 60) to the 80-step curve's value at step 60, then decays to the floor again at step 80 -- what a
  Hugging Face ``Trainer`` resumed with a larger ``max_steps`` does. Each extension is listed in
  run.json (``extensions``) and every step's rate is in metrics.jsonl (``lr``).
- ``epochs`` extends alike: the total becomes ``ceil(epochs * batches per epoch / grad_accum)``.
- ``--schedule`` phases (T, alpha) start at absolute steps, so an extension does not move them.
- the data continue in the same epoch order: step ``N + 1`` reads the batch that follows the
  checkpoint's.

Under ``torchrun`` every process trains the same model on its share of each global batch
(:mod:`kdpipe.pipeline.train.dataset`), so a step of W ranks x batch b is the step of one process that
accumulates the W per-rank losses (and, when every row has as many target tokens, of one process with
batch W*b). The model is wrapped in ``DistributedDataParallel`` or, with ``--sharding fsdp``, sharded
by FSDP2 (:mod:`kdpipe.pipeline.train.sharding`). Rank 0 alone writes the run directory's files; under
DDP it alone evaluates and checkpoints, under FSDP every rank takes part (its collectives need them
all), each writing its shards of a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdpipe.pipeline import distributed
from kdpipe.pipeline.cache.reader import TeacherCache
from kdpipe.pipeline.data import rows_from_arrays
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.models.devices import resolve_device
from kdpipe.pipeline.models.lora import apply_lora, check_lora_base, unsharded_lora_copy
from kdpipe.pipeline.models.students import Student, load_student, save_student
from kdpipe.pipeline.models.tokenizers import load_tokenizer, tokenizer_fingerprint
from kdpipe.pipeline.train import checkpoint as ckpt
from kdpipe.pipeline.train import metrics, metrics_log, reporting, sharding
from kdpipe.pipeline.train.checkpoint_files import save_checkpoint, save_sharded_checkpoint
from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.pipeline.train.dataset import CacheDataset, split_rows
from kdpipe.pipeline.train.fused_kd import output_head
from kdpipe.pipeline.train.objective import distillation_objective, targets_for, uses_draws
from kdpipe.pipeline.train.schedule import parse_schedule, phase_at, warmup_cosine
from kdpipe.pipeline.train.targets import TeacherTargets, Vocabulary, check_student_vocab, fold_padded_vocab
from kdpipe.pipeline.train.xtok import objective as xtok


class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool = False):
        self.config, self.resume = config, resume
        self.out = Path(config.out)
        self.launch = distributed.launch_from_env()  # rank 0 of 1 unless started by torchrun
        self.is_main, self.world_size = self.launch.rank == 0, self.launch.world_size
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.launch.torchrun:
            self.device = torch.device("cuda", self.launch.local_rank)
        self._closing = contextlib.ExitStack()
        self.reporters = reporting.Reporters([])  # rank 0 opens the --report-to trackers in setup
        self.step = 0  # optimizer steps done
        self.finished_already = False  # a resume of a finished run to its length: nothing to do
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches consumed in the current epoch
        self.xtok = None  # a student with another tokenizer than the cache's: its run (pipeline/train/xtok)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        c = self.config
        reporting.check_installed(reporting.parse_report_to(c.report_to))  # before anything is read or written
        self._closing.enter_context(distributed.process_group(self.launch, self.device))
        self.cache = self._closing.enter_context(TeacherCache(c.cache, verify_hashes=True, **c.storage()))  # or s3://
        self.cache.check_files()  # every shard present at its size; hashes are checked as shards are read
        self.task = self.cache.schema.task
        self.phases = parse_schedule(c.schedule)
        for t in {c.temperature, *(p.temperature for p in self.phases if p.temperature is not None)}:
            self.cache.schema.temperature_index(t)  # each temperature used must have been captured
        self.estimator = uses_draws(self.cache.schema, c.loss)  # a sampled (or mixed) cache's draws
        inputs = rows_from_arrays(c.data).inputs if c.data else None
        if c.eval_cache:
            train_rows, eval_source = None, c.eval_cache
            eval_rows = np.arange(len(TeacherCache(c.eval_cache, **c.storage())))[: c.eval_rows]
        else:
            train_rows, eval_rows = split_rows(len(self.cache), c.eval_fraction)
            eval_source, eval_rows = c.cache, eval_rows[: c.eval_rows]
        self.train_set = CacheDataset(self.cache, batch_size=c.batch_size, rows=train_rows, seed=c.seed,
                                      shuffle_window=c.shuffle_buffer, inputs=inputs,
                                      rank=self.launch.rank, world_size=self.world_size)
        eval_inputs = rows_from_arrays(c.eval_data).inputs if c.eval_data else (None if c.eval_cache else inputs)
        eval_cache = self._closing.enter_context(TeacherCache(eval_source, verify_hashes=True, **c.storage()))
        self.eval_set = CacheDataset(eval_cache, batch_size=c.batch_size, rows=eval_rows, shuffle=False,
                                     inputs=eval_inputs, rank=0, world_size=1)  # rank 0 evaluates alone
        if self.eval_set.cache.schema != self.cache.schema:
            raise ConfigError(f"--eval-cache {c.eval_cache} was captured with other settings than --cache; capture both alike")
        if self.train_set.num_rows == 0:
            raise ConfigError(f"cache {c.cache} has no training rows; lower --eval-fraction or capture more data")
        self.total_steps = c.steps or max(1, math.ceil(c.epochs * self.train_set.batches_per_epoch / c.grad_accum))
        self.student = load_student(c.student, task=self.task, seed=c.seed, tokenizer_path=c.tokenizer)
        if c.lora_r is not None:  # only the adapters train (the optimizer below takes what requires grad)
            apply_lora(self.student, r=c.lora_r, alpha=c.lora_alpha, targets=c.lora_targets, task=self.task)
        if self.student.kind == "hf" and self.student.tokenizer is None:
            self.student.tokenizer = load_tokenizer(_teacher_tokenizer(self.cache), required=False)
        self._check_student()
        self.model = self.student.model.to(self.device)  # the student itself: saved, evaluated
        if c.gradient_checkpointing:
            sharding.enable_gradient_checkpointing(self.model, kind=self.student.kind)
        # The fused loss needs the student's last hidden states and its lm-head (weight, bias).
        fusable = c.fused_loss and self.student.kind == "hf" and self.task == "causal-lm"
        self.head = output_head(self.model) if fusable else None  # not None: the fused loss runs
        # What the training forward runs: the student (in a StudentForward for HF), DDP around it, or FSDP's shards
        self.forward = sharding.StudentForward(self.model) if self.student.kind == "hf" else self.model
        with distributed.peer_failures(self.launch, "while the ranks set up"):
            self.ddp = sharding.wrap(self.forward, model=self.model, sharding=c.sharding, world_size=self.world_size,
                                     device=self.device, cpu_offload=c.cpu_offload)
        self.sharded = sharding.is_sharded(self.ddp)  # FSDP: evaluation, checkpoints and finish need every rank
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=c.lr, weight_decay=c.weight_decay)
        self.identity = ckpt.run_identity(self.cache, c, world_size=self.world_size,
                                          cross_tokenizer=self.xtok is not None)
        if self.resume:
            self._resume()
        else:
            ckpt.check_new_run_dir(self.out)  # on every rank, so a refusal stops them all
            if self.is_main:
                ckpt.start_run_dir(self.out, self.identity, resolved_settings=c.recorded(),
                                   total_steps=self.total_steps, task=self.task, seq_len=self.cache.schema.input_len,
                                   distributed=self.distributed_record(), loss_implementation=self.loss_implementation,
                                   device=ckpt.describe_device(self.device),
                                   teacher_vocab_size=int(self.cache.manifest["capture"]["teacher_vocab_size"]),
                                   lora=self.student.lora,
                                   cross_tokenizer=self.xtok.record(self.train_set) if self.xtok else None)
        if self.is_main and not self.finished_already:  # rank 0 logs
            self.reporters = self._closing.enter_context(reporting.open_reporters(
                reporting.parse_report_to(c.report_to), out=self.out, run_id=ckpt.read_run(self.out)["run_id"],
                settings=c.recorded(), resumed_at=self.step))

    @property
    def loss_implementation(self) -> str:
        """What computes the training loss (recorded in run.json)."""
        if self.xtok is not None:
            return self.xtok.implementation
        schema = self.cache.schema
        if self.estimator:
            head = f"exact top-{schema.top_k} + " if schema.top_k else ""
            draws = f"unbiased estimator: {head}{schema.sample_draws} importance-weighted draws per position"
            if self.head is not None:
                return f"fused: lm-head and loss chunk by chunk (pipeline/train/fused_kd.py), {draws}"
            return f"{draws} (losses.sampled_kd_loss), full student logits"
        targets = "; the cache's draws unused: --loss " + self.config.loss + " takes the top-k + tail bins" \
            if schema.sample_draws else ""
        if self.head is not None:
            return "fused: lm-head and loss chunk by chunk (pipeline/train/fused_kd.py)" + targets
        why = ("--no-fused-loss" if not self.config.fused_loss else
               "the lm-head is a LoRA target (--lora-targets)" if (self.student.lora or {}).get("head_adapted") else
               "the student's output layer is not a plain nn.Linear of a causal LM")
        return f"unfused: full student logits ({why})" + targets

    def targets(self, batch: dict, *, temperature: float) -> TeacherTargets:
        """The batch's teacher targets at ``temperature`` (with the draws when the loss uses them)."""
        return targets_for(self.cache.schema, batch, temperature=temperature, kind=self.config.loss,
                           vocabulary=Vocabulary.of(self.cache))

    def distributed_record(self) -> dict:
        """How the run was spread (recorded in run.json)."""
        c, w = self.config, self.world_size
        return {"world_size": w, "per_rank_batch_size": c.batch_size, "global_batch_size": c.batch_size * w,
                "rows_per_step": c.batch_size * w * c.grad_accum,
                "backend": torch.distributed.get_backend() if w > 1 else None,
                "sharding": sharding.sharding_record(c.sharding, world_size=w)}

    def _check_student(self) -> None:
        self.xtok = xtok.for_student(self.cache, self.student, cache_name=self.config.cache,
                                     loss=self.config.cross_tokenizer_loss,
                                     teacher_tokenizer_path=self.cache.manifest["teacher"].get("path"))
        if self.xtok is not None:  # its batches: the cache's rows re-tokenised, with the aligned pairs
            self.train_set, self.eval_set = self.xtok.dataset(self.train_set), self.xtok.dataset(self.eval_set)
            return
        m = self.cache.manifest
        tokenizer_fp = m.get("tokenizer")
        if self.student.vocab_size:
            check_student_vocab(
                self.student.vocab_size, teacher_vocab=m["capture"]["teacher_vocab_size"],
                tokenizer_vocab=tokenizer_fp["vocab_size"] if tokenizer_fp else None, task=self.task,
            )
        if tokenizer_fp and self.student.tokenizer is not None:
            if tokenizer_fingerprint(self.student.tokenizer)["sha256"] != tokenizer_fp["sha256"]:
                raise ConfigError(
                    "the student's tokenizer differs from the one the cache was made with "
                    "(fingerprints differ); train with the teacher's tokenizer (--tokenizer DIR)"
                )

    def _resume(self) -> None:
        recorded = ckpt.check_resumable(self.out, self.identity)
        check_lora_base(recorded.get("lora"), self.student.lora, out=self.out, student=self.config.student)
        if ckpt.finished_already(self.out, recorded, self.total_steps):  # nothing is loaded or written
            self.finished_already, self.step = True, self.total_steps
            return
        state = ckpt.load_checkpoint(self.out, self.ddp if self.sharded else self.model, self.optimizer,
                                     rank=self.launch.rank)
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        if self.is_main:
            ckpt.resume_run_dir(self.out, self.identity, self.config, step=self.step, total_steps=self.total_steps)

    # ------------------------------------------------------------------ loop
    def batches(self):
        """This rank's micro-batches forever, epoch after epoch, from where a resumed run stopped."""
        while True:
            self.train_set.set_epoch(self.epoch, start_batch=self.batches_in_epoch)  # earlier ones are not read
            for batch in DataLoader(self.train_set, batch_size=None, num_workers=self.config.num_workers,
                                    generator=self._loader_generator()):
                self.batches_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batches_in_epoch = 0

    def _loader_generator(self) -> torch.Generator:
        """A DataLoader draws its workers' base seed from this instead of the global RNG, so that a run
        resumed mid-epoch (one loader more) keeps the RNG stream of the uninterrupted run (dropout)."""
        return torch.Generator().manual_seed(self.config.seed)

    def fit(self, on_step: Callable[[dict], None] | None = None) -> dict:
        """Train to ``total_steps``; ``on_step(metrics)`` after each step. Returns the last step's
        training metrics ({} when no step was left). A rank whose peer failed raises
        :class:`~kdpipe.pipeline.distributed.PeerStopped`."""
        batches = self.batches()
        self.model.train()
        metrics: dict = {}
        self._started, self._tokens = time.perf_counter(), 0
        while self.step < self.total_steps:
            with distributed.peer_failures(self.launch, f"at step {self.step + 1}"):
                metrics = self._train_step(batches)
                self._record(metrics)
            if on_step:
                on_step(metrics)
        return metrics

    def _train_step(self, batches) -> dict:
        """One optimizer step of ``grad_accum`` micro-batches; its training metrics."""
        c = self.config
        temperature, alpha = phase_at(self.step, self.phases, temperature=c.temperature, alpha=c.alpha)
        lr = c.lr * warmup_cosine(self.step, total=self.total_steps, warmup=c.warmup, min_ratio=c.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
        step_tokens = 0
        for micro in range(c.grad_accum):
            batch = next(batches)
            # DDP averages gradients over ranks at the last micro-batch's backward only (FSDP at each one,
            # into its sharded gradients: no micro-batch keeps whole ones)
            last = micro == c.grad_accum - 1 or self.world_size == 1 or self.sharded
            sync = contextlib.nullcontext() if last else self.ddp.no_sync()
            with sync:
                parts = self.loss(batch, temperature=temperature, alpha=alpha)
                (parts["loss"] / c.grad_accum).backward()
            for key in sums:
                sums[key] += float(parts[key].detach()) / c.grad_accum
            step_tokens += int(batch["mask"].sum())
        *means, step_tokens = _sum_over_ranks([*sums.values(), step_tokens])
        sums = {key: value / self.world_size for key, value in zip(sums, means)}
        self._tokens += int(step_tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip) if c.clip > 0 else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - self._started
        return {"step": self.step, "split": "train", **sums, "lr": lr, "temperature": temperature,
                "alpha": alpha, "tokens_per_s": self._tokens / max(elapsed, 1e-9),
                "grad_norm": float(grad_norm) if grad_norm is not None else None}

    def _record(self, metrics: dict) -> None:
        """After a step: log, evaluate and checkpoint when the settings ask for it. Rank 0 alone logs;
        under DDP it alone evaluates and checkpoints (the other ranks go on and wait for it at the next
        gradient exchange), under FSDP every rank does both (FSDP's gathers need them all)."""
        c = self.config
        last = self.step == self.total_steps
        takes_part = self.is_main or self.sharded
        if self.is_main and (self.step % c.log_every == 0 or last):
            self.log(metrics)
        if takes_part and c.eval_every and (self.step % c.eval_every == 0 or last):
            record = {"step": self.step, "split": "eval", **self.evaluate()}
            if self.is_main:
                self.log(record)
        if takes_part and c.checkpoint_every and (self.step % c.checkpoint_every == 0 or last):
            state = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}
            if self.sharded:  # each rank writes its shards (torch.distributed.checkpoint)
                save_sharded_checkpoint(self.out, self.ddp, self.optimizer, state, rank=self.launch.rank)
            else:
                save_checkpoint(self.out, self.model, self.optimizer, state)

    def log(self, record: dict) -> None:
        """Append a metrics record to metrics.jsonl and send it to the ``--report-to`` trackers (rank 0)."""
        metrics_log.append_metrics(self.out, record)
        self.reporters.log(record)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    def student_logits(self, batch: dict, *, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Student logits ``[B, P, V]`` for a batch of cache rows (by ``model``, default the training forward)."""
        model = self.ddp if model is None else model
        with self._autocast():
            if self.student.kind == "hf":  # a StudentForward (DDP or FSDP around it) gives the logits
                out = model(input_ids=batch["input_ids"].to(self.device), attention_mask=self._attention(batch))
                out = getattr(out, "logits", out)  # the student itself gives a model output
            else:
                out = model(batch["inputs"].to(self.device))
        return out if out.ndim == 3 else out[:, None, :]

    def _attention(self, batch: dict) -> torch.Tensor | None:
        """A text cache's mask marks its real tokens; a chat cache's marks targets, and its rows are
        padded on the right only, which a causal model's real positions never attend to."""
        if self.task == "causal-lm" and self.cache.schema.mask_meaning == "real-token":
            return batch["mask"].to(self.device).long()
        return None

    def loss(self, batch: dict, *, temperature: float, alpha: float) -> dict:
        batch = _to(batch, self.device)  # once: targets and the student read the same tensors
        if self.xtok is not None:
            return self.xtok.objective(self.cache.schema, batch, self.student_logits(batch), temperature=temperature,
                                       alpha=alpha, kind=self.config.loss)
        targets = self.targets(batch, temperature=temperature)
        options = dict(alpha=alpha, temperature=temperature, kind=self.config.loss)
        if self.head is not None:  # the student's [B*P, V] logits never exist
            def objective(hidden, weight, bias):  # hidden [B, P, H]; run inside the forward (FSDP: whole head)
                return distillation_objective(targets, hidden=hidden, head_weight=weight, head_bias=bias, **options)

            with self._autocast():
                return self.ddp(batch["input_ids"], self._attention(batch), objective)
        return distillation_objective(targets, student_logits=self.student_logits(batch), **options)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """On the first ``eval_rows`` held-out cache rows (``rows``: how many): KL(teacher || student) at
        T=1 named by what it is (``kl_topk_bins`` on the top-k + tail bins, a lower bound; ``kl_full`` at
        k = V; ``kl_full_estimate`` with the estimator of a sampled cache), CE, top-1 agreement, and
        accuracy for a classification cache."""
        if self.eval_set.num_rows == 0:
            return {}
        self.model.eval()
        kl, agree, ce, correct = metrics.Mean(), metrics.Mean(), metrics.Mean(), metrics.Mean()
        temperature = 1.0 if 1.0 in self.cache.temperatures else self.cache.temperatures[0]
        if self.xtok is not None:  # CE per student token, bits per byte, the aligned KL and share
            batches = (_to(b, self.device) for b in DataLoader(self.eval_set, batch_size=None))
            scores = self.xtok.evaluate(self.cache.schema, batches, lambda b: self.student_logits(
                b, model=self.ddp if self.sharded else self.forward), temperature=temperature)
            self.model.train()
            return {**scores, "rows": self.eval_set.num_rows}
        for batch in DataLoader(self.eval_set, batch_size=None, generator=self._loader_generator()):
            batch = _to(batch, self.device)
            targets = self.targets(batch, temperature=temperature)
            # DDP: rank 0 alone, not through DDP; FSDP: every rank, through its shards
            logits = self.student_logits(batch, model=self.ddp if self.sharded else self.forward)
            logits, targets = fold_padded_vocab(logits.reshape(-1, logits.shape[-1]).float(), targets)
            if self.estimator:  # an unbiased estimate of the full KL
                kl.add(*metrics.sampled_kl_to_teacher(logits, targets.topk_ids, targets.topk_logprobs, targets.sample_ids,
                                                      targets.sample_logprobs, targets.sample_weights, targets.kd_mask,
                                                      temperature=temperature))
            else:
                kl.add(*metrics.sparse_kl_to_teacher(logits, targets.topk_ids, targets.topk_logprobs,
                                                     targets.tail_logprob, targets.kd_mask, temperature=temperature))
            if targets.topk_ids.shape[1]:  # the teacher's best id is known only with a top-k
                agree.add(*metrics.top1_agreement(logits, targets.topk_ids, targets.kd_mask))
            ce.add(*metrics.token_cross_entropy(logits, targets.labels.clamp(min=0), targets.ce_mask))
            correct.add(*metrics.top1_agreement(logits, targets.labels[:, None], targets.ce_mask))  # argmax == label
        self.model.train()
        top1 = {"top1_agreement": agree.value} if agree.count else {}  # unknown without a top-k
        accuracy = {"accuracy": correct.value} if self.task == "classification" else {}
        kl_name = metrics.cache_kl_name(top_k=self.cache.schema.top_k, sampled=bool(self.estimator),
                                        vocab_size=int(self.cache.manifest["capture"]["teacher_vocab_size"]))
        return {kl_name: kl.value, **top1, **accuracy, "ce": ce.value,
                "perplexity": math.exp(min(ce.value, 50)), "temperature": temperature,
                "rows": self.eval_set.num_rows}

    # ------------------------------------------------------------------ finish
    def close(self) -> None:
        """Leave the process group (if any); call once training is over, also after an error."""
        self._closing.close()

    def finish(self, metrics: dict) -> dict | None:
        """Rank 0 writes the model and the run manifest (returned); other ranks return None (under FSDP
        every rank must call it: they send rank 0 their shards). A run that had finished already
        (:attr:`finished_already`) is left as it is: its run.json is returned."""
        if self.finished_already:
            return ckpt.read_run(self.out) if self.is_main else None
        student = self._final_student()  # under FSDP every rank sends its shards to rank 0
        if not self.is_main:
            return None
        save_student(student, self.out / "model")
        final = metrics or metrics_log.last_record(self.out, "train") or {}  # {}: resumed with no step left to run
        return ckpt.write_run_manifest(self.out, self.identity, self.config, final_metrics=final,
                                       eval_metrics=metrics_log.last_record(self.out, "eval"), total_steps=self.total_steps)

    def _final_student(self) -> Student:
        """The student to save: itself, or under FSDP a plain copy of it holding the gathered weights
        (on rank 0; the other ranks only send their shards)."""
        if not self.sharded:
            return self.student
        weights = sharding.full_model_state(self.ddp)
        return self.student if weights is None else \
            dataclasses.replace(self.student, model=(unsharded_lora_copy if self.student.lora else
                                                     sharding.unsharded_copy)(self.model, weights))


def _sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (``values`` itself in one process)."""
    if not torch.distributed.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64,
                          device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _teacher_tokenizer(cache: TeacherCache) -> str | None:
    """The teacher's tokenizer (only the tokenizer) when its path from the manifest is reachable."""
    teacher = cache.manifest["teacher"]
    path = teacher.get("path")
    return path if teacher.get("kind") == "hf" and path and Path(path).is_dir() else None
