"""kdpipe inside the trainers people already run (public API; each module imports its trainer package).

- :mod:`kdpipe.integrations.transformers`: ``DistillationTrainer``, a Hugging Face ``transformers.Trainer``
  that trains a student from a kdpipe cache (docs/library.md, Example 2);
- :mod:`kdpipe.integrations.lightning`: a PyTorch Lightning data module and module for the same
  (docs/library.md, "PyTorch Lightning").
"""
