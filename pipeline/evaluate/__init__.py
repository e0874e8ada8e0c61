"""Scoring models against held-out data and the teacher (the formulas are :mod:`kdpipe.pipeline.train.metrics`,
shared with the in-training evaluation).

- :mod:`.run`: ``kdpipe evaluate`` (cross-entropy, KL to the teacher, agreement, accuracy);
- :mod:`.model`, :mod:`.rows`, :mod:`.scores`: the model it loads, the rows it reads, how a batch is scored;
- :mod:`.fidelity`: how faithful a cache is to its teacher (``kdpipe inspect --fidelity``);
- :mod:`.plots`: training curves from ``metrics.jsonl``.
"""
