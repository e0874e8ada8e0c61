"""kdpipe: offline knowledge distillation.

Library code lives in :mod:`kdpipe.pipeline`; the command-line stages in :mod:`kdpipe.stages`.
"""

__version__ = "0.1.0"


def open_cache(path, **kwargs):
    """Open a teacher cache (a directory, or an ``s3://`` / ``gs://`` / ``az://`` URL) for reading;
    see :func:`kdpipe.pipeline.cache.open_cache`."""
    from kdpipe.pipeline.cache import open_cache as _open_cache

    return _open_cache(path, **kwargs)


__all__ = ["__version__", "open_cache"]
