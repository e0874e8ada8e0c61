"""Opening an object store through fsspec, failing fast, and its errors as one line.

``s3://`` (AWS, or any S3-compatible store such as MinIO or Ceph through an endpoint URL) goes
through s3fs; ``gs://`` and ``az://`` through gcsfs and adlfs where those are installed. Credentials
come from where the store's own library looks (environment, config files, instance roles) or from
the storage options; kdpipe never records, logs or prints either.

For S3 the defaults fail fast: connect timeout of a few seconds, two attempts per request at the
botocore level and a few at s3fs's level (s3fs retries only transient read errors), and the
standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables become the endpoint when the
storage options name none (older botocore releases ignore them). Any option given wins.
"""

from __future__ import annotations

import contextlib
import os

from kdpipe.pipeline.errors import ConfigError, KdpipeError, StorageError
from kdpipe.pipeline.provenance import redact_url

CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 30
BOTOCORE_MAX_ATTEMPTS = 2  # the first try and one retry
S3FS_RETRIES = 3  # s3fs's own loop, for transient read errors (timeouts, cut-off bodies)
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}

_CONNECTION_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientConnectionError", "ConnectionError",
    "TimeoutError", "FSTimeoutError",
}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower()


def s3_options(options: dict) -> dict:
    """The fail-fast defaults and the endpoint from the environment, under what ``options`` gives."""
    options = dict(options)
    client_kwargs = dict(options.get("client_kwargs") or {})
    if not options.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
    config_kwargs = dict(options.get("config_kwargs") or {})
    config_kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    config_kwargs.setdefault("read_timeout", READ_TIMEOUT_S)
    config_kwargs.setdefault("retries", {"max_attempts": BOTOCORE_MAX_ATTEMPTS, "mode": "standard"})
    options |= {"client_kwargs": client_kwargs, "config_kwargs": config_kwargs}
    options.setdefault("use_listings_cache", False)  # other processes write: never trust a stale listing
    return options


def open_filesystem(url: str, storage_options: dict | None):
    """``(filesystem, path of url inside it)`` for an object-store URL."""
    import fsspec

    protocol = protocol_of(url)
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        options = s3_options(options)
    options.setdefault("skip_instance_cache", True)  # one client per cache object, made in its process
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError:
        package = PACKAGES.get(protocol, f"the fsspec package for {protocol}://")
        raise StorageError(f"{redact_url(url)} needs {package}, which is not installed; pip install {package}") from None
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise ConfigError(f"{redact_url(url)}: unknown storage protocol {protocol}://; use a local path, "
                              "s3://, gs:// or az://") from None
        raise ConfigError(f"--storage-options are not accepted for {protocol}:// ({type(exc).__name__}: "
                          f"{_first_line(exc)}); check the option names") from None
    except TypeError as exc:  # an option the filesystem does not take
        raise ConfigError(f"--storage-options are not accepted for {protocol}:// ({_first_line(exc)}); "
                          "check the option names") from None
    if protocol in ("s3", "s3a"):
        fs.retries = S3FS_RETRIES
    return fs, path.rstrip("/")


def endpoint_of(fs) -> str:
    """The endpoint a filesystem talks to, for messages."""
    endpoint = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    if endpoint:
        return redact_url(endpoint)
    return "the default AWS endpoint" if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) else "the store"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return redact_url(text[0] if text else type(exc).__name__)


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def is_missing_bucket(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, FileNotFoundError) and ("bucket" in text and "not exist" in text or "nosuchbucket" in text)


@contextlib.contextmanager
def storage_errors(url: str, endpoint: str, action: str):
    """Turn what a store raises while ``action`` (e.g. "read") ``url`` into a one-line :class:`StorageError`.

    A missing object's ``FileNotFoundError`` passes through (callers say what is missing); a missing
    bucket does not.
    """
    url = redact_url(url)
    try:
        yield
    except KdpipeError:
        raise
    except Exception as exc:
        names = _names(exc)
        if names & _CREDENTIAL_ERRORS:
            raise StorageError(
                f"no credentials found for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                "or run where an instance role applies), or pass --storage-options '{\"anon\": true}' for a public bucket"
            ) from None
        if is_missing_bucket(exc):
            bucket = url.split("://", 1)[-1].split("/", 1)[0]
            raise StorageError(f"bucket {bucket!r} does not exist at {endpoint} ({url}); create it or fix the URL "
                               "(and the endpoint: AWS_ENDPOINT_URL or --storage-options)") from None
        if isinstance(exc, FileNotFoundError):
            raise
        if isinstance(exc, TypeError) and "keyword argument" in str(exc):  # met when the client is made
            raise ConfigError(f"--storage-options are not accepted for {url.split('://')[0]}:// ({_first_line(exc)}); "
                              "check the option names") from None
        if isinstance(exc, PermissionError):
            raise StorageError(
                f"access to {url} at {endpoint} was denied ({_first_line(exc)}); check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials, the instance role or "
                f"--storage-options) and that they may {action} this bucket"
            ) from None
        if names & _CONNECTION_ERRORS:
            raise StorageError(
                f"cannot reach the object store at {endpoint} to {action} {url} ({type(exc).__name__}); check the "
                "endpoint URL (AWS_ENDPOINT_URL or --storage-options '{\"endpoint_url\": ...}') and that the server is up"
            ) from None
        if isinstance(exc, OSError):
            raise StorageError(f"cannot {action} {url} at {endpoint}: {type(exc).__name__}: {_first_line(exc)}") from None
        raise
