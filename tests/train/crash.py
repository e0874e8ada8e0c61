"""Train through the real Trainer, optionally "crashing" right after a step (for resume tests)."""

from __future__ import annotations

from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.pipeline.train.trainer import Trainer


def train(config: TrainConfig, *, resume: bool = False, stop_after: int | None = None) -> Trainer:
    """Run ``config`` (``--resume`` when ``resume``); with ``stop_after``, stop as a crash would right after
    that step (its checkpoint, if one falls there, is written; nothing after it)."""
    trainer = Trainer(config, resume=resume)
    trainer.setup()

    def on_step(metrics):
        if metrics["step"] == stop_after:
            raise KeyboardInterrupt  # a crash right after that step's checkpoint

    try:
        trainer.fit(on_step=on_step)
    except KeyboardInterrupt:
        trainer.close()
        return trainer
    trainer.finish({})
    trainer.close()
    return trainer
