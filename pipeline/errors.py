"""Exceptions that describe a problem the user can fix.

Every message names the problem and the fix in one line; the CLI prints it and exits non-zero
without a traceback. Anything else that escapes is a bug in kdpipe.
"""


class KdpipeError(Exception):
    """Base class for user-facing errors (bad input, bad settings, damaged cache)."""


class ConfigError(KdpipeError, ValueError):
    """A setting or option value is invalid."""


class DataError(KdpipeError):
    """Input data cannot be read or tokenised."""


class TeacherError(KdpipeError):
    """The teacher cannot be loaded or produces unusable output."""


class CacheFormatError(KdpipeError):
    """A cache directory or manifest is malformed or of an unknown version."""


class IntegrityError(KdpipeError):
    """A shard's bytes, hash, row count or schema disagree with the manifest."""


class WriteError(KdpipeError):
    """A file could not be written (disk full, read-only or unwritable folder, ...)."""


class DistributedError(KdpipeError):
    """Another process of a multi-process run (torchrun) failed or stopped answering."""


class StorageError(KdpipeError):
    """An object store cannot be reached or refuses access (bad credentials, missing bucket, ...)."""
