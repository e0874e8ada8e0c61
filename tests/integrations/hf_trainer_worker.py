"""One process of tests/integrations/test_hf_trainer.py's multi-process check: ``DistillationTrainer`` under
``torchrun`` (CPU, gloo), one SGD step without clipping.

Usage: ``hf_trainer_worker.py CACHE OUT_DIR --batch-size B --accumulation A --seed S``. Each process writes
``OUT_DIR/rank{r}.json``: its rank and world size and the rows (``sample_index``) of every micro-batch it
trained on; process 0 also writes ``OUT_DIR/grads.safetensors``, the gradients the optimizer's first step
sees (after DistributedDataParallel averaged them), and the first log line (``loss``, ``kd``, ``ce``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback, TrainingArguments

import kdpipe
from kdpipe.integrations.transformers import DistillationTrainer

STUDENT = Path(__file__).resolve().parents[2] / "data" / "students" / "lm-student.json"
LOSS = dict(alpha=0.7, temperature=2.0)


class Recorder(DistillationTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[list[int]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.steps.append(inputs["sample_index"].tolist())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class GradientsBeforeStep(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {name: p.grad.detach().clone().contiguous() for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--accumulation", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    options = parser.parse_args()
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(STUDENT))
    args = TrainingArguments(output_dir=str(options.out / "run"), per_device_train_batch_size=options.batch_size,
                             gradient_accumulation_steps=options.accumulation, max_steps=1, optim="sgd",
                             max_grad_norm=0.0, learning_rate=1e-3, seed=options.seed, logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    grads = GradientsBeforeStep()
    trainer = Recorder(model=student, args=args, cache=options.cache, loss=kdpipe.DistillationLoss(**LOSS),
                       callbacks=[grads])
    trainer.train()
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    record = {"rank": rank, "world_size": world, "steps": trainer.steps}
    if rank == 0:
        save_file(grads.grads, str(options.out / "grads.safetensors"))
        record["log"] = next(line for line in trainer.state.log_history if "loss" in line)
    (options.out / f"rank{rank}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():  # gloo's threads stopped before exit (else a rare abort at exit)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
