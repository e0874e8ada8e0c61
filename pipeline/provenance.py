"""What a cache manifest and a run's ``run.json`` record about how they were made, beyond settings.

- ``command``: the ``kdpipe`` command line that made them (:func:`set_command`, called by the CLI),
  with the working directory; secrets are never recorded (:func:`redact_args`).
- the installed package set: a sha256 in ``software.packages_sha256``, the full ``name==version``
  list in a side file, ``packages.txt``, next to the manifest (:func:`packages_text`);
- inside the kdpipe image, the build identity the image recorded (:func:`image_identity`):
  base image, lock file and its sha256, read from the JSON file named by ``$KDPIPE_IMAGE_INFO``.

``kdpipe reproduce`` (:mod:`kdpipe.pipeline.reproduce`) reads them back; :func:`first_difference` names
where a recorded identity and the current one part. :func:`redact_url` is how kdpipe shows or records
any URL: without the credentials it may carry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
from importlib import metadata

PACKAGES_FILE = "packages.txt"
IMAGE_INFO_ENV = "KDPIPE_IMAGE_INFO"
NOT_RECORDED = "<not recorded>"
# Options whose value may hold credentials: recorded as NOT_RECORDED.
SECRET_OPTIONS = ("--storage-options",)
_URL_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_WORDS = re.compile(r"(secret|token|password|passwd|credential|api[_-]?key|access[_-]?key)", re.I)

_command: list[str] | None = None


def set_command(args: list[str] | None) -> None:
    """Record ``args`` (what followed ``kdpipe`` on the command line) as the running command (None: none)."""
    global _command
    _command = None if args is None else list(args)


def command_record() -> dict | None:
    """``{"program": "kdpipe", "args": [...], "cwd": ...}`` of this process's kdpipe command, secrets
    left out; None when kdpipe runs as a library (no command line to re-run)."""
    if _command is None:
        return None
    return {"program": "kdpipe", "args": redact_args(_command), "cwd": os.getcwd()}


def redact_args(args: list[str]) -> list[str]:
    """``args`` with the values of options that may hold secrets replaced by NOT_RECORDED and the user
    info of URLs (``s3://user:secret@host``) by ``***``."""
    out, hide_next = [], False
    for arg in args:
        name = arg.split("=", 1)[0]
        if hide_next:
            out.append(NOT_RECORDED)
            hide_next = False
        elif arg.startswith("--") and (name in SECRET_OPTIONS or _SECRET_WORDS.search(name)):
            out.append(f"{name}={NOT_RECORDED}" if "=" in arg else arg)
            hide_next = "=" not in arg
        else:
            out.append(redact_url(arg))
    return out


def redact_url(text: str) -> str:
    """``text`` with the user info of every URL in it (``scheme://user:secret@host``) replaced by ``***``."""
    return _URL_USERINFO.sub(r"\1***@", str(text))


@functools.lru_cache(maxsize=1)
def installed_packages() -> tuple[str, ...]:
    """Every installed distribution as ``name==version`` (normalised name; the first found on
    ``sys.path`` when one is installed twice), sorted."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name") if dist.metadata else None
        if name:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
    return tuple(f"{name}=={version}" for name, version in sorted(found.items()))


def packages_text(packages: tuple[str, ...] | None = None) -> str:
    """The content of ``packages.txt``: one ``name==version`` a line."""
    return "".join(f"{line}\n" for line in (installed_packages() if packages is None else packages))


def packages_sha256() -> str:
    return hashlib.sha256(packages_text().encode()).hexdigest()


def parse_packages(text: str) -> dict[str, str]:
    """``packages.txt`` back to ``{name: version}``."""
    pairs = (line.split("==", 1) for line in text.splitlines() if "==" in line)
    return {name: version for name, version in pairs}


def image_identity() -> dict | None:
    """The build identity of the kdpipe image this runs in (the JSON ``$KDPIPE_IMAGE_INFO`` names, with
    its sha256), the tag alone for an image built before it recorded more, or None outside one."""
    path, tag = os.environ.get(IMAGE_INFO_ENV), os.environ.get("KDPIPE_IMAGE")
    if not path:
        return {"image_tag": tag} if tag else None
    try:
        data = open(path, "rb").read()
        info = json.loads(data)
    except (OSError, ValueError) as exc:
        return {"image_tag": tag, "error": f"{path}: {exc}"}
    return {**info, "info_sha256": hashlib.sha256(data).hexdigest()}


def machine_record() -> dict:
    """What, besides the packages, decides the bits on a CPU: the machine and torch's thread count in
    effect (``--threads``, else torch's default; :func:`kdpipe.pipeline.models.devices.set_cpu_threads`)."""
    import torch

    return {"machine": platform.machine(), "system": platform.system(), "torch_threads": torch.get_num_threads(),
            "torch_cuda": torch.version.cuda}


def first_difference(old, new, path: str = "") -> str | None:
    """Dotted path of the first differing entry of two JSON-like values, or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if old == new else f"{path} (was {_short(old)}, now {_short(new)})"


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
