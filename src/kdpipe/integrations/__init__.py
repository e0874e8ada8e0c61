"""kdpipe inside the trainers people already run (public API; each module imports its trainer package).

- :mod:`kdpipe.integrations.transformers`: ``DistillationTrainer``, a Hugging Face ``transformers.Trainer``
  that trains a student from a kdpipe cache (docs/library.md, "Hugging Face Trainer").
"""
