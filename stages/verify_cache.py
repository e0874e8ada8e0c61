"""``kdpipe verify CACHE``: recompute every shard's hash and check rows and schema."""

from __future__ import annotations

import sys

import click

from kdpipe.pipeline.verify import verify_cache as verify
from kdpipe.stages.cli import user_errors


@click.command("verify")
@click.argument("cache", type=click.Path())
@user_errors
def verify_cache(cache):
    """Check CACHE against its manifest; exit 1 naming every bad shard."""
    problems = verify(cache)
    for problem in problems:
        click.echo(f"FAIL {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"OK {cache}: every shard matches its manifest entry")
