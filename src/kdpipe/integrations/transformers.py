"""``DistillationTrainer``: a Hugging Face ``transformers.Trainer`` that trains a causal-LM student from a
kdpipe cache (the code is in :mod:`kdpipe.pipeline.integrations.transformers`; docs/library.md)."""

from kdpipe.pipeline.integrations.transformers import DistillationTrainer, position_counts

__all__ = ["DistillationTrainer", "position_counts"]
