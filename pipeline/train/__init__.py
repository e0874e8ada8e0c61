"""Stage two as a library: train a student from a cache, never loading the teacher.

- :mod:`.config`: :class:`~kdpipe.pipeline.train.config.TrainConfig`, every setting of a run;
- :mod:`.trainer`: :class:`~kdpipe.pipeline.train.trainer.Trainer` (setup, the loop, the run directory);
- :mod:`.dataset`: cache rows as batches, shuffled and split between ranks;
- :mod:`.targets` and :mod:`.objective`: a batch's teacher targets and the loss train-student takes;
- :mod:`.losses` and :mod:`.fused_kd`: sparse distillation losses, and the fused lm-head + loss;
- :mod:`.schedule`: learning-rate and (T, alpha) schedules;
- :mod:`.checkpoint`: ``run.json`` and resuming; :mod:`.checkpoint_files`: checkpoints written whole and
  verified against their ``checkpoint.json``; :mod:`.metrics_log`: ``metrics.jsonl`` (a torn last line dropped);
- :mod:`.metrics`: KL to the teacher (full, (k+1)-bin lower bound, sampled estimate) and agreement;
- :mod:`.reporting`: metrics to TensorBoard, Weights & Biases or MLflow;
- :mod:`.online_kd`: the online dense-KD reference (teacher in memory), for comparisons.
"""
