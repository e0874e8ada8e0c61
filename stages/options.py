"""What every stage command shares: library errors and Ctrl-C as one line, ``--storage-options`` and ``--threads``."""

from __future__ import annotations

import functools
import sys

import click
import torch

from kdpipe.pipeline.errors import ConfigError, KdpipeError
from kdpipe.pipeline.models.devices import set_cpu_threads

STORAGE_OPTIONS_HELP = (
    "JSON object of fsspec options for an s3:// (gs://, az://) cache, e.g. "
    "'{\"endpoint_url\": \"http://minio:9000\"}'; credentials otherwise come from the environment, "
    "config files or the instance role. Never recorded."
)


def storage_options_flag(command):
    """``--storage-options JSON`` (parse it with :func:`kdpipe.pipeline.cache.storage.location.parse_storage_options`)."""
    return click.option("--storage-options", "storage_options", default=None, metavar="JSON", help=STORAGE_OPTIONS_HELP)(command)


THREADS_HELP = (
    "Threads torch runs CPU work on. On a machine whose cores are busy with other jobs, fewer (even 1) is "
    "often several times faster; recorded in the manifest / run.json (software.torch_threads).  "
    f"[default: torch's, {torch.get_num_threads()} here; OMP_NUM_THREADS sets it, and torchrun sets that to 1]"
)
# What Ctrl-C leaves of a command that writes nothing before it ends.
NOTHING_WRITTEN = "nothing was written; re-run the same command"


def threads_flag(command):
    """``--threads N``: applied (:func:`kdpipe.pipeline.models.devices.set_cpu_threads`) as soon as the
    command line is parsed, before the command loads or computes anything."""

    def apply(ctx, _param, value):
        if value is None or ctx.resilient_parsing:
            return value
        try:
            return set_cpu_threads(value)
        except ConfigError as exc:
            raise click.UsageError(str(exc), ctx) from None

    return click.option("--threads", type=int, default=None, metavar="N", callback=apply, expose_value=False,
                        help=THREADS_HELP)(command)


def user_errors(command=None, *, on_interrupt: str | None = None):
    """Turn library errors into one line on stderr and exit 2, without a traceback; Ctrl-C into
    ``interrupted: <on_interrupt>`` and exit 130. ``on_interrupt`` says what the interrupted command
    leaves and the command that continues it (train-student's needs ``--resume``); default
    :data:`NOTHING_WRITTEN`. Use as ``@user_errors`` or ``@user_errors(on_interrupt="...")``."""
    if command is None:
        return functools.partial(user_errors, on_interrupt=on_interrupt)
    interrupted = f"interrupted: {on_interrupt or NOTHING_WRITTEN}"

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KdpipeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(interrupted, err=True)
            sys.exit(130)

    wrapper.on_interrupt = on_interrupt  # None: the command said nothing (tests/test_cli_conventions.py)
    return wrapper
