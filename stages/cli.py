"""The ``kdpipe`` command: one subcommand per stage.

Library errors (:class:`KdpipeError`, turned into one line by each command's ``user_errors``, see
:mod:`options`) and click's usage errors (a missing option, a bad value) become a one-line ``error: ...``
on stderr and exit code 2; anything else is a bug and keeps its traceback.
``kdpipe -q`` / ``--log-level`` set what is shown besides results and errors (see :mod:`display`).
"""

from __future__ import annotations

import contextlib

import click

from kdpipe import __version__
from kdpipe.pipeline import provenance
from kdpipe.stages import display


def package_version() -> str:
    """kdpipe's version from the installed package's metadata, else ``kdpipe.__version__`` (a source tree run
    without installing)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdpipe")
    except PackageNotFoundError:
        return __version__


class OneLineUsageError(click.ClickException):
    """A click error (missing option, bad value, unknown command) shown as kdpipe shows its own errors."""

    def __init__(self, error: click.ClickException):
        super().__init__(one_line(error))
        self.exit_code = error.exit_code  # 2 for usage errors, as click has it

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def one_line(error: click.ClickException) -> str:
    """``Missing option '--out'.`` -> ``missing option '--out'; see 'kdpipe demo --help'``."""
    message = " ".join(error.format_message().split()).rstrip(".")
    if message[:1].isupper() and not message[1:2].isupper():
        message = message[0].lower() + message[1:]
    ctx = getattr(error, "ctx", None)
    return f"{message}; see '{ctx.command_path} --help'" if ctx is not None else message


class KdpipeGroup(click.Group):
    """A group whose usage errors, and those of its commands, read ``error: ...`` on one line."""

    def make_context(self, info_name, args, parent=None, **extra):
        provenance.set_command(args)  # what manifests and run.json record, and ``kdpipe reproduce`` re-runs
        with _one_line_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        try:
            with _one_line_errors():
                return super().invoke(ctx)
        finally:
            provenance.set_command(None)  # the command is over: later library calls in this process record none


@contextlib.contextmanager
def _one_line_errors():
    try:
        yield
    except (OneLineUsageError, click.exceptions.NoArgsIsHelpError):
        raise  # already one line; or the help text shown for a bare ``kdpipe``
    except click.ClickException as exc:
        raise OneLineUsageError(exc) from None


@click.group(cls=KdpipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_version(), "--version", prog_name="kdpipe", message="%(prog)s %(version)s",
                      help="Print kdpipe's version and exit.")
@click.option("-q", "--quiet", is_flag=True, help="No progress: print only results and errors (--log-level error).")
@click.option("--log-level", type=click.Choice(list(display.LEVELS)), default="info", show_default=True,
              help="debug: also third-party progress bars and logs (transformers, huggingface_hub, datasets); "
                   "info: kdpipe's progress; warning: no progress; error: only results and errors.")
def main(quiet, log_level):
    """kdpipe: offline knowledge distillation.

    Run the teacher once (cache-teacher), train students from its cache anywhere (train-student).
    Progress goes to stderr (a bar on a terminal, a line per tenth of a phase elsewhere), results to stdout.
    """
    display.configure(display.QUIET_LEVEL if quiet else log_level)


def _register():
    from kdpipe.stages.cache_teacher import cache_teacher
    from kdpipe.stages.demo import demo
    from kdpipe.stages.evaluate import evaluate, plot
    from kdpipe.stages.inspect_cache import inspect_cache
    from kdpipe.stages.reproduce import reproduce
    from kdpipe.stages.train_student import train_student
    from kdpipe.stages.verify_cache import verify_cache

    for command in (cache_teacher, inspect_cache, verify_cache, train_student, evaluate, plot, demo, reproduce):
        main.add_command(command)


_register()
