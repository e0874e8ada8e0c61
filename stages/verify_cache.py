"""``kdpipe verify CACHE``: recompute every shard's hash and check rows and schema."""

from __future__ import annotations

import sys

import click

from kdpipe.pipeline.cache.storage.location import parse_storage_options
from kdpipe.pipeline.cache.verify import verify_cache as verify
from kdpipe.pipeline.provenance import redact_url
from kdpipe.stages.options import NOTHING_WRITTEN, storage_options_flag, user_errors


@click.command("verify")
@click.argument("cache", type=click.Path())
@storage_options_flag
@user_errors(on_interrupt=NOTHING_WRITTEN)
def verify_cache(cache, storage_options):
    """Check CACHE (a folder or an s3:// URL) against its manifest; exit 1 naming every bad shard."""
    problems = verify(cache, storage_options=parse_storage_options(storage_options))
    for problem in problems:
        click.echo(f"FAIL {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"OK {redact_url(cache)}: every shard matches its manifest entry")
