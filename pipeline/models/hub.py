"""One question to the Hugging Face Hub, answered fast: does this repository exist, can it be asked?

Without it, an unreachable Hub costs about half a minute of retries before a vague error.
"""

from __future__ import annotations

from typing import Callable

MISSING = "missing"


def ask_hub(lookup: Callable[[], object]) -> str | None:
    """Run ``lookup`` (one ``huggingface_hub`` info call, with a timeout and no retries).

    Returns None when the Hub answered, :data:`MISSING` when it has no such repository (or it is
    private), else the first line of why the Hub could not be asked (no network, proxy, timeout).
    """
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        lookup()
    except RepositoryNotFoundError:
        return MISSING
    except Exception as exc:  # noqa: BLE001 - no network, proxy, timeout, server error
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None
