"""Cross-tokenizer distillation: a student with its own tokenizer trained from a cache that records text.

- :mod:`.vocab_map`: teacher id -> student id with the same decoded bytes (or the longest it begins with),
  and the groups both vocabularies are cut into;
- :mod:`.align`: a cache row in the student's tokens, and the positions where both tokenizations end
  at the same byte;
- :mod:`.losses`: the divergences on mapped or grouped bins, and ULD, on the cached top-k + tail;
- :mod:`.batches`: the training batches (a :class:`~kdpipe.pipeline.train.dataset.CacheDataset` that
  re-tokenises), :mod:`.objective`: what the Trainer calls for the loss and the evaluation.
"""
