"""Scoring models against held-out data and the teacher.

- :mod:`.run`: ``kdpipe evaluate`` (cross-entropy, KL to the teacher, agreement, accuracy);
- :mod:`.metrics`: the KL and agreement formulas on a cache's sparse view;
- :mod:`.fidelity`: how faithful a cache is to its teacher (``kdpipe inspect --fidelity``);
- :mod:`.plots`: training curves from ``metrics.jsonl``.
"""
