"""Opening an object store through fsspec, failing fast, and its errors as one line.

``s3://`` (AWS, or any S3-compatible store such as MinIO or Ceph through an endpoint URL) goes
through s3fs; ``gs://`` and ``az://`` through gcsfs and adlfs where those are installed. Credentials
come from where the store's own library looks (environment, config files, instance roles) or from
the storage options; kdpipe never records, logs or prints either.

For S3 the defaults fail fast: a connect timeout of a few seconds, and the standard
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables become the endpoint when the storage options
name none (older botocore releases ignore them). Any option given wins.

**Stalls.** A store that stops answering (paused, overloaded, a dropped connection) is not silent:
each storage operation waits at most ``read_timeout`` seconds for a reply (``config_kwargs``,
default :data:`READ_TIMEOUT_S`), and kdpipe makes the attempts itself (:func:`retrying`), logging a
warning on each stall (shown on stderr) before the next attempt, up to ``retries.max_attempts``
attempts (default :data:`ATTEMPTS`), then raises a one-line :class:`StorageError`. botocore and s3fs
are told to try once, so no silent retry multiplies the wait: a dead store costs at most about
``attempts x read_timeout`` seconds. Other transient failures (a cut-off body, SlowDown, 5xx) are
retried the same way; a refused connection or a denied request is not retried. Knobs:
``--storage-options '{"config_kwargs": {"read_timeout": 60, "connect_timeout": 10,
"retries": {"max_attempts": 5}}}'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Callable, TypeVar

from kdpipe.pipeline.errors import ConfigError, KdpipeError, StorageError
from kdpipe.pipeline.provenance import redact_url

CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 20  # the longest wait for a reply before the attempt counts as stalled
ATTEMPTS = 3  # attempts of one storage operation (kdpipe's own; botocore and s3fs try once)
BACKOFF_S = (0.5, 2.0, 5.0)  # pause before the 2nd, 3rd, 4th+ attempt
log = logging.getLogger(__name__)
T = TypeVar("T")
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}

_CONNECTION_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientConnectionError", "ConnectionError",
    "TimeoutError", "FSTimeoutError",
}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_STALL_ERRORS = {"ReadTimeoutError", "ConnectTimeoutError", "TimeoutError", "FSTimeoutError", "ServerTimeoutError",
                 "timeout"}
_TRANSIENT_ERRORS = {"IncompleteRead", "ResponseParserError", "ClientPayloadError", "ConnectionClosedError",
                     "ServerDisconnectedError"}
_TRANSIENT_TEXT = ("SlowDown", "reduce your request rate", "ServiceUnavailable", "InternalError", "RequestTimeout")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long one attempt may wait for a reply, and how many attempts an operation gets."""

    attempts: int = ATTEMPTS
    read_timeout_s: float | None = None  # None: the store library's own (not an S3 store)


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
    # botocore tries once: kdpipe makes the attempts (retries.max_attempts of them), reporting stalls
    config_kwargs["retries"] = {**dict(config_kwargs.get("retries") or {}), "max_attempts": 1, "mode": "standard"}
    options |= {"client_kwargs": client_kwargs, "config_kwargs": config_kwargs}
    options.setdefault("use_listings_cache", False)  # other processes write: never trust a stale listing
    return options


def retry_policy(protocol: str, storage_options: dict | None) -> RetryPolicy:
    """The attempts and reply timeout that ``storage_options`` ask for (defaults above); a bad value is a ConfigError."""
    config_kwargs = dict((storage_options or {}).get("config_kwargs") or {})
    attempts = dict(config_kwargs.get("retries") or {}).get("max_attempts", ATTEMPTS)
    timeout = config_kwargs.get("read_timeout", READ_TIMEOUT_S) if protocol in ("s3", "s3a") else None
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ConfigError(f"--storage-options config_kwargs.retries.max_attempts must be a whole number >= 1, got {attempts!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(f"--storage-options config_kwargs.read_timeout must be a number of seconds > 0, got {timeout!r}")
    return RetryPolicy(attempts, timeout)


def open_filesystem(url: str, storage_options: dict | None):
    """``(filesystem, path of url inside it, RetryPolicy)`` for an object-store URL."""
    import fsspec

    protocol = protocol_of(url)
    options = dict(storage_options or {})
    policy = retry_policy(protocol, options)
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
        fs.retries = 1  # s3fs tries once too (its loop would retry stalls silently)
    return fs, path.rstrip("/"), policy


def retrying(fn: Callable[[], T], *, url: str, endpoint: str, action: str, policy: RetryPolicy) -> T:
    """``fn()``, attempted again after a stall or a transient failure (each logged as a warning), up to
    ``policy.attempts`` times; the last failure, or any other, as :func:`storage_errors` says."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            stalled = is_stall(exc)
            if attempt == policy.attempts or not (stalled or is_transient(exc)):
                with storage_errors(url, endpoint, action, policy=policy, attempts_made=attempt):
                    raise
            pause = BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
            what = (f"did not answer within {_seconds(policy)} to {action} {redact_url(url)}" if stalled
                    else f"failed to {action} {redact_url(url)} ({type(exc).__name__}: {_first_line(exc)})")
            log.warning("the object store at %s %s (attempt %d of %d); trying again in %g s", endpoint, what,
                        attempt, policy.attempts, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")  # the last attempt returns or raises


def is_stall(exc: BaseException) -> bool:
    return bool(_names(exc) & _STALL_ERRORS)


def is_transient(exc: BaseException) -> bool:
    return bool(_names(exc) & _TRANSIENT_ERRORS) or any(text in str(exc) for text in _TRANSIENT_TEXT)


def _seconds(policy: RetryPolicy) -> str:
    return f"{policy.read_timeout_s:g} s" if policy.read_timeout_s is not None else "the store library's timeout"


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
def storage_errors(url: str, endpoint: str, action: str, *, policy: RetryPolicy | None = None, attempts_made: int = 1):
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
        if policy is not None and is_stall(exc):
            raise StorageError(
                f"the object store at {endpoint} stopped answering: no reply within {_seconds(policy)} to {action} "
                f"{url} ({attempts_made} attempt{'s' if attempts_made > 1 else ''}); check that the server is up and "
                "reachable, or wait longer: --storage-options '{\"config_kwargs\": {\"read_timeout\": 60, "
                "\"retries\": {\"max_attempts\": 5}}}'"
            ) from None
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
