"""The library inside trainers people already run (the top floor: it uses train/ and the trainers' packages).

- :mod:`.transformers`: :class:`~kdpipe.pipeline.integrations.transformers.DistillationTrainer`, a Hugging Face
  ``transformers.Trainer`` that trains a student from a kdpipe cache;
- :mod:`.lightning`: a PyTorch Lightning data module and module for the same.

Each module imports its trainer package itself, so ``import kdpipe`` never needs them.
"""
