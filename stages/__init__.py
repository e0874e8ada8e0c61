"""Command-line entry points of kdpipe (thin wrappers over kdpipe.pipeline)."""
