"""Run the library's Trainer under torchrun, stopping after a given step (a crash right after its
checkpoint): ``torchrun ... tests/ddp_train.py CONFIG.json [--resume] [--stop-after N]``.

Used by tests/train/test_train_distributed.py, which reads what rank 0 wrote in the run directory.
"""

from __future__ import annotations

import argparse
import json

from kdpipe.pipeline.train.trainer import Trainer
from kdpipe.pipeline.train.config import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None)
    args = parser.parse_args()
    config = TrainConfig(**json.loads(open(args.config).read()))
    config.validate()
    trainer = Trainer(config, resume=args.resume)
    try:
        trainer.setup()

        def on_step(metrics):
            if metrics["step"] == args.stop_after:
                raise KeyboardInterrupt

        try:
            metrics = trainer.fit(on_step=on_step)
        except KeyboardInterrupt:
            return
        trainer.finish(metrics)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
