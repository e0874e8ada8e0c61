"""The cache manifest: ``manifest.json`` at the cache root, versioned JSON, written last.

A cache without a manifest is unfinished. Readers check ``format`` and ``format_version`` first and
validate every shard path before any shard file is opened.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path, PurePosixPath

from kdpipe.pipeline.cache.schema import CacheSchema
from kdpipe.pipeline.errors import CacheFormatError

FORMAT_NAME = "kdpipe-cache"
FORMAT_VERSION = 2  # what this kdpipe writes: packed ids, optionally quantized values, samples
READABLE_VERSIONS = (1, 2)  # 1: ids as unsigned arrays, float values (see kdpipe.pipeline.cache.schema)
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"


def shard_name(*, block: int, part: int, suffix: str) -> str:
    """Deterministic, zero-padded shard name: part ``part`` of data block ``block``. A block belongs
    to exactly one rank, so writers never collide, and the name does not depend on how many ranks
    wrote the cache (a cache of N ranks equals the cache of one process)."""
    return f"{SHARD_DIR}/b{block:07d}-p{part:03d}{suffix}"


_BLOCK_IN_NAME = re.compile(r"(?:^|-)b(\d+)-p\d+")


def shard_block(name: str) -> int | None:
    """The data block of a shard file name (or of its ``<name>.<pid>.tmp``), None for other names.
    Also reads the names of caches written before shard names lost their ``r<rank>-`` prefix."""
    found = _BLOCK_IN_NAME.search(PurePosixPath(name).name)
    return int(found.group(1)) if found else None


def resolve_shard_path(root: Path, name: str) -> Path:
    """``root / name``, refusing names that are absolute or leave ``root/shards``."""
    pure = PurePosixPath(name)
    if (
        not isinstance(name, str)
        or pure.is_absolute()
        or "\\" in name
        or ".." in pure.parts
        or len(pure.parts) != 2
        or pure.parts[0] != SHARD_DIR
    ):
        raise CacheFormatError(
            f"manifest names shard {name!r}, which is outside the cache's {SHARD_DIR}/ folder; "
            "the manifest was edited or is not from kdpipe -- re-create the cache"
        )
    return root / pure


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the kdpipe checkout this code runs from, when it is a git checkout (an installed
    copy inside some other repository, e.g. a venv in a project folder, records none)."""
    root = Path(__file__).resolve().parents[2]  # the checkout: this file is pipeline/cache/manifest.py
    try:
        top, head = (subprocess.run(["git", "-C", str(root), "rev-parse", arg], capture_output=True, text=True,
                                    timeout=5, check=True).stdout.strip() for arg in ("--show-toplevel", "HEAD"))
    except (OSError, subprocess.SubprocessError):
        return None
    return head if top and Path(top).resolve() == root else None


def software_versions() -> dict:
    """Versions of what computed the outputs; with the sha256 of the whole installed package set
    (listed in the side file ``packages.txt``) and, inside the kdpipe image, the image's build identity."""
    import numpy
    import pyarrow
    import torch
    import zarr

    import kdpipe
    from kdpipe.pipeline import provenance

    versions = {
        "kdpipe": kdpipe.__version__,
        "kdpipe_git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
        "pyarrow": pyarrow.__version__,
        "docker_image": os.environ.get("KDPIPE_IMAGE"),
        "image": provenance.image_identity(),
        "packages_sha256": provenance.packages_sha256(),
        "packages_file": provenance.PACKAGES_FILE,
        **provenance.machine_record(),
    }
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        versions["transformers"] = None
    return versions


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``checksum`` entry."""
    import hashlib

    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_manifest(root: str | os.PathLike) -> dict:
    """Read and validate ``root/manifest.json``; raises :class:`CacheFormatError` naming the fix.

    ``root`` is a local folder; a cache on an object store is read by
    :func:`kdpipe.pipeline.cache.reader.read_manifest`, which validates with :func:`parse_manifest`.
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise CacheFormatError(f"cache directory {root} does not exist; check the --cache path")
    if not path.is_file():
        raise CacheFormatError(
            f"{root} has no {MANIFEST_NAME}: it is not a kdpipe cache or its capture has not "
            "finished (re-run the same cache-teacher command to finish it)"
        )
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, where: str) -> dict:
    """Validate the bytes of a manifest read from ``where`` (named in the errors)."""
    try:
        manifest = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheFormatError(f"{where} is not valid JSON ({exc}); re-create the cache") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{where} is not a kdpipe cache manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CacheFormatError(
            f"{where} has cache format version {version!r}, but this kdpipe reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; use the kdpipe version that wrote it or re-create the cache"
        )
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise CacheFormatError(
            f"{where} does not match its checksum: it was edited or damaged after the capture; "
            "restore it or re-create the cache"
        )
    for key in ("schema", "shards", "capture", "totals"):
        if key not in manifest:
            raise CacheFormatError(f"{where} lacks the {key!r} section; re-create the cache")
    schema = CacheSchema.from_dict(manifest["schema"])
    if schema.packed != (version >= 2):
        raise CacheFormatError(f"{where}: format version {version} does not match its schema; re-create the cache")
    for shard in manifest["shards"]:
        resolve_shard_path(Path(), shard.get("name", ""))
    return manifest
