"""What a command shows while it works: one progress display per phase, and the level that silences it.

On a terminal a phase is a tqdm bar, redrawn once per update at most (tqdm throttles it to ~10 per
second). Anywhere else (a log file, a pipe, a CI job) a phase is plain lines without ``\\r``: one when
it starts, one at each tenth of a phase of known length, one a minute at least while it runs, and one
when it ends; never two within 5 s but the last. A phase of known length under a minute writes at
most 11 lines, whatever its number of steps.

``kdpipe --log-level``: ``debug`` also shows the progress bars and logs of transformers,
huggingface_hub and datasets (silenced otherwise); ``info`` (the default) shows kdpipe's progress;
``warning`` shows no progress, only results, logged warnings and errors; ``error`` (``kdpipe -q``)
only results and errors.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings

import click
from tqdm import tqdm

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
QUIET_LEVEL = "error"  # kdpipe -q
_META_KEY = "kdpipe.log_level"
TENTHS = 10  # plain lines per phase of known length
MIN_LINE_INTERVAL_S = 5.0  # no two plain lines closer than this (but the last)
HEARTBEAT_S = 60.0  # a plain line at least this often
_now = time.perf_counter  # the clock (tests replace it)
# Environment read by datasets and transformers when they are imported.
_THIRD_PARTY_QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


# ----------------------------------------------------------------------------- the level
def configure(level: str) -> None:
    """Set this invocation's level (``--log-level``, or ``-q``) and silence third-party output below debug."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_META_KEY] = LEVELS[level]
    verbose = LEVELS[level] <= logging.DEBUG
    root = logging.getLogger()
    root.setLevel(max(LEVELS[level], logging.WARNING) if not verbose else logging.DEBUG)  # info: no library info logs
    if verbose and not root.handlers:
        root.addHandler(_Stderr())
    _third_party(verbose=verbose)


def level() -> int:
    """This invocation's level (info when no ``kdpipe`` group set it, e.g. a command invoked on its own)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_META_KEY, logging.INFO) if ctx is not None else logging.INFO


def shows_progress() -> bool:
    return level() <= logging.INFO


def note(message: str) -> None:
    """A line on stderr about what is going on (not a result): hidden by ``-q``."""
    if shows_progress():
        click.echo(message, err=True)


class _Stderr(logging.StreamHandler):
    """Log records on whatever ``sys.stderr`` is when they are written (click's test runner swaps it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _third_party(*, verbose: bool) -> None:
    """transformers' "Loading weights" and "Writing model shards" bars, huggingface_hub's download bars,
    datasets' bars, and their info logs: shown at debug only. A library not imported yet reads the
    setting when it is (transformers takes huggingface_hub's); one imported already is told."""
    import huggingface_hub.utils as hub  # a light import

    if verbose:
        hub.enable_progress_bars()
        for name in _THIRD_PARTY_QUIET_ENV:
            os.environ.pop(name, None)
    else:
        hub.disable_progress_bars()
        os.environ.update(_THIRD_PARTY_QUIET_ENV)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar() if verbose else hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_info() if verbose else hf_logging.set_verbosity_error()
    if "datasets" in sys.modules:
        import datasets

        with warnings.catch_warnings():  # its environment setting, read at import, has priority: fine
            warnings.simplefilter("ignore")
            datasets.enable_progress_bars() if verbose else datasets.disable_progress_bars()
        datasets.logging.set_verbosity_info() if verbose else datasets.logging.set_verbosity_error()


# ----------------------------------------------------------------------------- a phase's progress
class Progress:
    """One phase's progress (``desc``): a tqdm bar on a terminal, plain lines elsewhere, nothing below info.

    Use it as a context manager; ``update(n, **fields)`` advances it by ``n`` units and shows
    ``fields`` (numbers or strings: ``loss=3.2``). ``unit="B"`` counts bytes (shown in kB/MB/GB).
    ``terminal``: force one of the two displays (default: whether stderr is a terminal).
    """

    def __init__(self, desc: str, *, total: int | None = None, unit: str = "step", initial: int = 0,
                 show: bool = True, terminal: bool | None = None):
        self.desc, self.total, self.unit = desc, total or None, unit
        self.n, self.initial, self.fields = initial, initial, ""
        self.show = show and shows_progress()
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar, self.begun = None, False  # shown from the first update: an error before it prints alone
        self.started = self.last_line_at = _now()
        self.last_line_n, self.last_tenth = None, self._tenth()

    def update(self, n: int = 1, *, total: int | None = None, **fields) -> None:
        """Advance by ``n`` (``total``: the phase's length, once known)."""
        if total and total != self.total:
            self.total, self.last_tenth = total, TENTHS * self.n // total
            if self.bar is not None:
                self.bar.total = total
        if self.show and not self.begun:
            self._begin()
        self.n += n
        if fields:
            self.fields = ", ".join(f"{key} {_value(value)}" for key, value in fields.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.fields, refresh=False)
            self.bar.update(n)  # the one redraw of this update (at most ~10 a second)
        elif self.show and self._line_due():
            self._line()

    def _begin(self) -> None:
        self.begun = True
        if self.terminal:
            self.bar = tqdm(total=self.total, initial=self.n, desc=self.desc, unit=self.unit,
                            unit_scale=self.unit == "B", dynamic_ncols=True, file=sys.stderr)
        else:
            self._line()  # the phase has started

    def start_at(self, n: int) -> None:
        """The phase resumes with ``n`` units done before (they do not count in the rate)."""
        if not self.begun:
            self.n = self.initial = n
            self.last_tenth = self._tenth()

    def set(self, n: int, **fields) -> None:
        """Move to position ``n`` (e.g. the bytes read so far)."""
        self.update(n - self.n, **fields)

    def elapsed(self) -> float:
        return _now() - self.started

    def write(self, message: str) -> None:
        """A line on stderr that does not break the bar."""
        if not self.show:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            click.echo(message, err=True)

    def close(self, *, failed: bool = False) -> None:
        """End the phase: the bar stays, or a last plain line says where it ended (not when it ``failed``)."""
        if self.show and not self.begun and not failed:
            self._begin()  # a phase with nothing to count still shows that it ran
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.show and self.begun and not failed and self.last_line_n != self.n:
            self._line()
        self.show = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)

    # -------------------------------------------------------------- plain lines
    def _tenth(self) -> int:
        return TENTHS * self.n // self.total if self.total else 0

    def _line_due(self) -> bool:
        since = _now() - self.last_line_at
        if since < MIN_LINE_INTERVAL_S:
            return False
        return self._tenth() > self.last_tenth or since >= HEARTBEAT_S

    def _line(self) -> None:
        self.last_line_at, self.last_line_n, self.last_tenth = _now(), self.n, self._tenth()
        click.echo(plain_line(self.desc, self.n, self.total, self.unit, self.fields,
                              elapsed=self.last_line_at - self.started, done_here=self.n - self.initial), err=True)


def plain_line(desc: str, n: int, total: int | None, unit: str, fields: str, *, elapsed: float, done_here: int) -> str:
    """``train-student: 30/60 steps (50%) | loss 3.21, kl 0.45 | 5.2 steps/s, 00:05 elapsed, ETA 00:05``."""
    count = f"{_number(n, unit)}/{_amount(total, unit)} ({100 * n // total}%)" if total else _amount(n, unit)
    rate = done_here / elapsed if elapsed > 0 else 0.0
    timing = f"{_amount(rate, unit, plural=True)}/s, {tqdm.format_interval(elapsed)} elapsed"
    if total and rate > 0:
        timing += f", ETA {tqdm.format_interval((total - n) / rate)}"
    return " | ".join(part for part in (f"{desc}: {count}", fields, timing) if part)


def _amount(value: float, unit: str, *, plural: bool = False) -> str:
    """``12 rows``, ``1 step``, ``1.23MB``."""
    if unit == "B":
        return _number(value, unit)
    return f"{_number(value, unit)} {unit if value == 1 and not plural else unit + 's'}"


def _number(value: float, unit: str) -> str:
    if unit == "B":
        return tqdm.format_sizeof(value, "B", 1000) if value else "0B"
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.2g}"


def _value(value) -> str:
    """A field's value: floats with 4 significant digits (and no ``-0``), ints with thousands separators."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return "0" if text in ("-0", "0") else text


# ----------------------------------------------------------------------------- each phase's fields
def training_fields(metrics: dict, loss_kind: str) -> dict:
    """A training step's fields: the objective, its distillation term (forward-kl: the KL at the step's
    temperature, ``kd / T**2``) and the throughput."""
    t = metrics.get("temperature") or 1.0
    divergence = {"kl": metrics["kd"] / t**2} if loss_kind == "forward-kl" else {loss_kind: metrics["kd"] / t**2}
    return {"loss": metrics["loss"], **divergence, "tok/s": round(metrics["tokens_per_s"])}


def capture_progress(plan) -> dict:
    """What a capture's progress counts (``Progress`` arguments): rows when their number is known or
    cheap to know first (``--limit-rows``; data of one block, arrays or text, whose rows the plan's
    estimate counts exactly by tokenising it once more); else the bytes of data read, block by block;
    else rows without a total (``--max-tokens``). With several ranks the totals are the whole capture's
    (stages/cache_teacher.py counts every rank's rows)."""
    s, source = plan.settings, plan.source
    if s.max_tokens is None:
        one_block = source.kind == "arrays" or (source.total_bytes or math.inf) <= s.block_chars
        if one_block:
            return {"total": plan.estimate()["rows"], "unit": "row"}
        if s.limit_rows is not None:
            return {"total": s.limit_rows, "unit": "row"}
    if s.limit_rows is None and s.max_tokens is None and source.kind != "arrays" and source.total_bytes:
        return {"total": source.total_bytes, "unit": "B"}
    return {"total": None, "unit": "row"}


def capture_fields(rows: int, tokens: int, seconds: float, *, unit: str) -> dict:
    """A capture's fields: the rows (unless they are what the display counts) and tokens written so
    far, and the tokens per second."""
    rows = {} if unit == "row" else {"rows": rows}
    return {**rows, "tokens": tokens, "tok/s": round(tokens / max(seconds, 1e-9))}


def plural(count: int, noun: str) -> str:
    """``1 shard``, ``3 shards``, ``1,024 rows``."""
    return f"{count:,} {noun if count == 1 else noun + 's'}"
