"""Stage one as a library: plan a capture (:mod:`.plan`), then run it (:mod:`.run`), in one
process or several (:mod:`kdpipe.pipeline.distributed`: torchrun, or ranks started by a scheduler)."""

from kdpipe.pipeline.capture.plan import (
    CapturePlan,
    CaptureSettings,
    auto_workers,
    finished_capture,
    load_teacher,
    plan_capture,
    with_teacher_weights,
)
from kdpipe.pipeline.capture.run import manifest_header, run_capture
from kdpipe.pipeline.distributed import Launch, launch_from_env, process_group

__all__ = [
    "CapturePlan", "CaptureSettings", "Launch", "auto_workers", "finished_capture", "load_teacher",
    "launch_from_env", "manifest_header", "plan_capture", "process_group", "run_capture",
    "with_teacher_weights",
]
