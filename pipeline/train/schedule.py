"""Learning-rate and distillation schedules.

A distillation schedule is a list of phases ``start_step: T=..., alpha=...``; from its start step on,
a phase overrides the run's base temperature and alpha. Written as a string:
``"0:T=4,alpha=0.9;600:T=1,alpha=0.5"`` (the two-stage schedule of docs/THEORY.md section 1).
"""

from __future__ import annotations

import dataclasses
import math

from kdpipe.pipeline.errors import ConfigError

_KEYS = {"T": "temperature", "temperature": "temperature", "alpha": "alpha"}


@dataclasses.dataclass(frozen=True)
class Phase:
    start: int
    temperature: float | None = None
    alpha: float | None = None


def parse_schedule(text: str | None) -> list[Phase]:
    """Parse ``"STEP:T=..,alpha=..;STEP:..."``; phases sorted by start step."""
    if not text:
        return []
    phases = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        start, _, body = part.partition(":")
        try:
            values = {}
            for item in filter(None, (i.strip() for i in body.split(","))):
                key, _, value = item.partition("=")
                if key.strip() not in _KEYS:
                    raise ConfigError(f"schedule key {key.strip()!r} is unknown; use T and alpha")
                values[_KEYS[key.strip()]] = float(value)
            phases.append(Phase(int(start), **values))
        except ValueError:
            raise ConfigError(
                f"cannot parse schedule phase {part!r}; write it as STEP:T=4,alpha=0.9 "
                "(phases separated by ';')"
            ) from None
    return sorted(phases, key=lambda p: p.start)


def phase_at(step: int, phases: list[Phase], *, temperature: float, alpha: float) -> tuple[float, float]:
    """(temperature, alpha) in force at ``step``."""
    for phase in phases:
        if phase.start <= step:
            temperature = phase.temperature if phase.temperature is not None else temperature
            alpha = phase.alpha if phase.alpha is not None else alpha
    return temperature, alpha


def warmup_cosine(step: int, *, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
