"""Stage one as a library: plan a capture (:mod:`.plan`), then run it (:mod:`.run`)."""

from kdpipe.pipeline.capture.plan import (
    CaptureSettings, CapturePlan, auto_workers, finished_capture, load_teacher, plan_capture,
    with_teacher_weights,
)
from kdpipe.pipeline.capture.run import manifest_header, run_capture

__all__ = [
    "CapturePlan", "CaptureSettings", "auto_workers", "finished_capture", "load_teacher",
    "manifest_header", "plan_capture", "run_capture", "with_teacher_weights",
]
