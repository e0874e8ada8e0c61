"""``metrics.jsonl``: one JSON record a line, ``{"step": int, "split": "train" | "eval", ...}``.

Records are appended as training goes. A process killed in the middle of an append can leave a torn
last line: reading drops it (a resume then logs that step again). A line that is not a record anywhere
else is damage no crash makes, and is refused in one line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdpipe.pipeline.errors import IntegrityError, WriteError
from kdpipe.pipeline.fileio import atomic_write_bytes, describe_os_error, fix_for_os_error

METRICS = "metrics.jsonl"


def append_metrics(out: Path, record: dict) -> None:
    """Append ``record`` to ``out/metrics.jsonl`` (a failed write is a one-line :class:`WriteError`)."""
    try:
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise _write_error(out, exc) from exc


def _write_error(out: Path, exc: OSError) -> WriteError:
    return WriteError(f"cannot write {METRICS} to --out {out}: {describe_os_error(exc)}; "
                      f"{fix_for_os_error(exc)} and resume: train-student --out {out} --resume")


def read_metrics(out: Path) -> list[dict]:
    """The records of ``out/metrics.jsonl`` ([] when there is none), a torn last line dropped."""
    path = out / METRICS
    if not path.is_file():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        record = _parse(line)
        if record is None and position == len(lines) - 1:
            break  # the append a crash cut short
        if record is None:
            raise IntegrityError(
                f"{path} line {number} is not a metrics record (damaged, and not by a crash, which can only "
                "cut the last line); repair or delete that line, then resume again")
        records.append(record)
    return records


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    ok = isinstance(record, dict) and type(record.get("step")) is int and record.get("split") in ("train", "eval")
    return record if ok else None


def truncate_metrics(out: Path, step: int) -> None:
    """Keep the records up to ``step``: a run resuming from its checkpoint of ``step`` logs the later
    steps again."""
    kept = [r for r in read_metrics(out) if r["step"] <= step]
    try:
        atomic_write_bytes(out / METRICS, "".join(json.dumps(r) + "\n" for r in kept).encode())
    except OSError as exc:
        raise _write_error(out, exc) from exc


def last_record(out: Path, split: str) -> dict | None:
    """The last record of ``split`` ("train" or "eval") in the run's metrics.jsonl."""
    records = [r for r in read_metrics(out) if r.get("split") == split]
    return records[-1] if records else None
