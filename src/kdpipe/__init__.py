"""kdpipe: offline knowledge distillation.

The public library API (stable under the cache format's versioning; everything else is internal):

- :func:`open_cache` / :class:`TeacherCache`: a finished teacher cache, local or on an object store;
- :class:`CacheDataset`: a ``torch.utils.data`` dataset of whole batches of its rows, split by
  DataLoader workers and by ranks, shuffled deterministically per epoch, shards verified;
- :class:`TargetCollator`: its ``collate_fn``: the student's inputs and the teacher targets at one
  captured temperature, causal shift done, as per-row tensors (the loss flattens them to
  :class:`TeacherTargets`);
- :func:`distillation_loss` / :class:`DistillationLoss`: ``alpha * T**2 * D + (1 - alpha) * CE`` on
  those targets (:data:`LOSS_KINDS`), from the student's logits or fused with its lm-head
  (:func:`output_head`, :func:`body_and_head`).

See ``docs/library.md``. The command-line stages are in :mod:`kdpipe.stages`; the internals in
:mod:`kdpipe.pipeline`.
"""

__version__ = "0.1.0"

from kdpipe.pipeline.cache.reader import TeacherCache, open_cache  # noqa: E402
from kdpipe.pipeline.train.dataset import CacheDataset  # noqa: E402
from kdpipe.pipeline.train.fused_kd import body_and_head, output_head  # noqa: E402
from kdpipe.pipeline.train.losses import KINDS as LOSS_KINDS  # noqa: E402
from kdpipe.pipeline.train.objective import DistillationLoss, TargetCollator, distillation_loss  # noqa: E402
from kdpipe.pipeline.train.targets import TeacherTargets  # noqa: E402

__all__ = [
    "CacheDataset", "DistillationLoss", "LOSS_KINDS", "TargetCollator", "TeacherCache", "TeacherTargets",
    "__version__", "body_and_head", "distillation_loss", "open_cache", "output_head",
]
