"""Shard storage backends (one writer/reader pair per format)."""
