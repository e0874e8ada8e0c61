"""Online dense KD: the reference a cached student is measured against.

:class:`OnlineKDTrainer` is the library's :class:`~kdpipe.pipeline.train.trainer.Trainer` with one change:
its loss runs the teacher (held in memory) on each batch's rows and uses the dense forward KL over
the whole vocabulary, ``alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE``. Everything else -- the
cache it reads rows from, their order, the schedule, clipping, initialisation -- is the cached
student's, so the two differ only in the teacher targets. The cache's own top-k values are not used.
Causal LM teachers only (a classification cache with k = V is already dense).
"""

from __future__ import annotations

import torch

from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.pipeline.train.losses import dense_kd_loss, hard_label_ce
from kdpipe.pipeline.train.trainer import Trainer


class OnlineKDTrainer(Trainer):
    """A Trainer whose KD term is the dense KL to ``teacher`` (an HF causal LM in eval mode) on the batch."""

    def __init__(self, config: TrainConfig, teacher: torch.nn.Module):
        if config.loss != "forward-kl" or config.fused_loss:
            raise ValueError("online KD uses the dense forward KL: pass loss='forward-kl' and fused_loss=False")
        super().__init__(config)
        self.teacher = teacher

    def loss(self, batch: dict, *, temperature: float, alpha: float) -> dict:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        targets = self.targets(batch, temperature=temperature)  # masks and labels, exactly as the cached runs
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=self._attention(batch)).logits
        logits = self.student_logits(batch)  # [B, L, V]
        v = logits.shape[-1]
        logits, teacher_logits = logits.reshape(-1, v).float(), teacher_logits.reshape(-1, v).float()  # [N, V]
        kd = dense_kd_loss(logits, teacher_logits, temperature=temperature, mask=targets.kd_mask)
        ce = hard_label_ce(logits, targets.labels, mask=targets.ce_mask)
        return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}

    @property
    def loss_implementation(self) -> str:
        return "online dense KD (teacher in memory)"
