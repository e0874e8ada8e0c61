"""What every stage command shares: library errors as one line, and ``--storage-options``."""

from __future__ import annotations

import functools
import sys

import click

from kdpipe.pipeline.errors import KdpipeError

STORAGE_OPTIONS_HELP = (
    "JSON object of fsspec options for an s3:// (gs://, az://) cache, e.g. "
    "'{\"endpoint_url\": \"http://minio:9000\"}'; credentials otherwise come from the environment, "
    "config files or the instance role. Never recorded."
)


def storage_options_flag(command):
    """``--storage-options JSON`` (parse it with :func:`kdpipe.pipeline.cache.storage.location.parse_storage_options`)."""
    return click.option("--storage-options", "storage_options", default=None, metavar="JSON", help=STORAGE_OPTIONS_HELP)(command)


def user_errors(command):
    """Turn library errors into one line on stderr and a non-zero exit, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KdpipeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished shards are kept; re-run the same command to resume", err=True)
            sys.exit(130)

    return wrapper
