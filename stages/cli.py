"""The ``kdpipe`` command: one subcommand per stage.

Library errors (:class:`KdpipeError`) become a one-line ``error: ...`` on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys

import click

from kdpipe import __version__
from kdpipe.pipeline.errors import KdpipeError


STORAGE_OPTIONS_HELP = (
    "JSON object of fsspec options for an s3:// (gs://, az://) cache, e.g. "
    "'{\"endpoint_url\": \"http://minio:9000\"}'; credentials otherwise come from the environment, "
    "config files or the instance role. Never recorded."
)


def storage_options_flag(command):
    """``--storage-options JSON`` (parse it with :func:`kdpipe.pipeline.storage.location.parse_storage_options`)."""
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


def package_version() -> str:
    """kdpipe's version from the installed package's metadata, else ``kdpipe.__version__`` (a source tree run
    without installing)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdpipe")
    except PackageNotFoundError:
        return __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_version(), "--version", prog_name="kdpipe", message="%(prog)s %(version)s",
                      help="Print kdpipe's version and exit.")
def main():
    """kdpipe: offline knowledge distillation.

    Run the teacher once (cache-teacher), train students from its cache anywhere (train-student).
    """


def _register():
    from kdpipe.stages.cache_teacher import cache_teacher
    from kdpipe.stages.inspect_cache import inspect_cache
    from kdpipe.stages.verify_cache import verify_cache

    for command in (cache_teacher, inspect_cache, verify_cache):
        main.add_command(command)
    try:
        from kdpipe.stages.train_student import train_student

        main.add_command(train_student)
    except ImportError:  # pragma: no cover - stage two not installed yet
        pass
    try:
        from kdpipe.stages.evaluate import evaluate, plot

        main.add_command(evaluate)
        main.add_command(plot)
    except ImportError:  # pragma: no cover
        pass
    from kdpipe.stages.demo import demo

    main.add_command(demo)


_register()
