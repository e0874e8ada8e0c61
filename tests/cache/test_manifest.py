"""Manifest validation: versions, shard paths that escape the cache."""

import json

import pytest

from kdpipe.pipeline.errors import CacheFormatError
from kdpipe.pipeline.cache.manifest import load_manifest, resolve_shard_path, shard_block, shard_name


def test_shard_names_are_zero_padded_and_do_not_name_the_rank():
    assert shard_name(block=12, part=1, suffix=".parquet") == "shards/b0000012-p001.parquet"


@pytest.mark.parametrize("name, block", [
    ("b0000012-p001.parquet", 12), ("shards/b0000012-p001.zarr.zip.4242.tmp", 12),
    ("r00003-b0000007-p000.zarr.zip.1.tmp", 7),  # a cache from before names lost the rank
    ("manifest.json.12.tmp", None), ("notes.txt", None),
])
def test_shard_block_reads_the_block_of_a_name(name, block):
    assert shard_block(name) == block


@pytest.mark.parametrize("name", ["../evil.zarr.zip", "/etc/passwd", "shards/../../x", "shards/a/b", "other/x", "shards\\..\\x"])
def test_escaping_shard_paths_are_refused(tmp_path, name):
    with pytest.raises(CacheFormatError, match="outside the cache"):
        resolve_shard_path(tmp_path, name)


def write_manifest(root, **fields):
    manifest = {"format": "kdpipe-cache", "format_version": 1, "schema": {
        "task": "causal-lm", "positions": 4, "top_k": 2, "temperatures": [1.0], "id_dtype": "uint16",
        "value_dtype": "float16", "input_len": 4, "has_label": False},
        "shards": [], "capture": {"format": "zarr"}, "totals": {"rows": 0}}
    manifest.update(fields)
    from kdpipe.pipeline.cache.manifest import manifest_checksum

    manifest["checksum"] = manifest_checksum(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_unknown_format_version_is_refused(tmp_path):
    write_manifest(tmp_path, format_version=99)
    with pytest.raises(CacheFormatError, match="format version 99"):
        load_manifest(tmp_path)


def test_manifest_with_escaping_shard_is_refused_before_opening(tmp_path):
    write_manifest(tmp_path, shards=[{"name": "../../etc/passwd", "rows": 1}])
    with pytest.raises(CacheFormatError, match="outside the cache"):
        load_manifest(tmp_path)


def test_missing_manifest_says_capture_unfinished(tmp_path):
    with pytest.raises(CacheFormatError, match="has not finished"):
        load_manifest(tmp_path)


def test_hand_edited_manifest_is_refused(tmp_path):
    write_manifest(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["totals"]["rows"] = 5
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheFormatError, match="edited or damaged"):
        load_manifest(tmp_path)


def test_manifests_record_the_commit_of_the_checkout_they_ran_from():
    """``software.kdpipe_git_commit`` is this checkout's HEAD (it was always null once manifest.py moved into cache/)."""
    import subprocess
    from pathlib import Path

    from kdpipe.pipeline.cache.manifest import git_commit

    checkout = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist)")
    assert git_commit() == head.stdout.strip()
