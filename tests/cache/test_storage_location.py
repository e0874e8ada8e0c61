"""Cache locations (local folder or s3:// URL), local shard copies and read-ahead, against a real S3
API on localhost (moto's server, see ``tests/s3_server.py``)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time

import pytest

from kdpipe.pipeline.errors import ConfigError, IntegrityError, StorageError
from kdpipe.pipeline.cache.storage.local_copies import LocalCopies
from kdpipe.pipeline.cache.storage.location import CacheLocation, is_url, parse_storage_options
from kdpipe.pipeline.cache.storage.object_store import s3_options
from kdpipe.pipeline.provenance import redact_url
from kdpipe.pipeline.cache.storage.read_ahead import ShardReadAhead


# ---------------------------------------------------------------------------- URLs and options
def test_urls_and_local_paths_are_told_apart():
    assert is_url("s3://bucket/prefix") and is_url("gs://b/p") and is_url("az://c/p")
    assert not is_url("/tmp/cache") and not is_url("relative/cache") and not is_url("file:///tmp/cache")
    assert CacheLocation("file:///tmp/cache").path.as_posix() == "/tmp/cache"


def test_user_info_in_urls_is_redacted():
    assert redact_url("s3://AKIA:s3cr3t@bucket/p") == "s3://***@bucket/p"
    assert redact_url("error at http://user:pw@minio:9000/x, see s3://b/k") == "error at http://***@minio:9000/x, see s3://b/k"
    location = CacheLocation("s3://key:hunter2@bucket/cache/", {"secret": "hunter2"})
    assert "hunter2" not in str(location) + repr(location) + location.record()


def test_storage_options_json():
    assert parse_storage_options(None) is None
    assert parse_storage_options('{"endpoint_url": "http://x:9000", "anon": true}') == {"endpoint_url": "http://x:9000", "anon": True}
    with pytest.raises(ConfigError, match="not valid JSON") as bad:
        parse_storage_options('{"secret": "hunter2",}')
    assert "hunter2" not in str(bad.value)
    with pytest.raises(ConfigError, match="must be a JSON object"):
        parse_storage_options('["a"]')


def test_aws_endpoint_url_is_honoured_and_options_win(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert s3_options({})["client_kwargs"]["endpoint_url"] == "http://from-env:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:9000")
    assert s3_options({})["client_kwargs"]["endpoint_url"] == "http://s3-specific:9000"
    assert "endpoint_url" not in s3_options({"endpoint_url": "http://given:1"})["client_kwargs"]
    options = s3_options({"config_kwargs": {"connect_timeout": 10}})["config_kwargs"]
    assert options["connect_timeout"] == 10 and options["read_timeout"] == 20
    # botocore tries once whatever was asked: kdpipe makes retries.max_attempts attempts itself, reporting stalls
    given = s3_options({"config_kwargs": {"retries": {"max_attempts": 5, "mode": "adaptive"}}})["config_kwargs"]
    assert given["retries"]["max_attempts"] == 1


# ---------------------------------------------------------------------------- one API, two places
@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return CacheLocation(tmp_path / "cache")
    request.getfixturevalue("s3_server")
    return CacheLocation(request.getfixturevalue("s3_url"))


def test_write_read_list_upload_download_remove(location, tmp_path):
    assert location.is_empty() and location.info("manifest.json") is None
    with pytest.raises(FileNotFoundError):
        location.read_bytes("manifest.json")
    location.write_json("_progress/r00000.json", {"a": 1})
    assert json.loads(location.read_bytes("_progress/r00000.json")) == {"a": 1}
    payload = os.urandom(3 << 20)
    (tmp_path / "shard.bin").write_bytes(payload)
    info = location.upload(tmp_path / "shard.bin", "shards/b0000000-p000.zarr.zip")
    assert info.size == len(payload) and (info.etag is not None) == location.is_remote
    assert set(location.listing("shards")) == {"shards/b0000000-p000.zarr.zip"}
    assert location.listing("nothing_here") == {}
    sha = location.download("shards/b0000000-p000.zarr.zip", tmp_path / "copy.bin")
    assert sha == hashlib.sha256(payload).hexdigest() and (tmp_path / "copy.bin").read_bytes() == payload
    assert not location.is_empty() and location.exists("shards/b0000000-p000.zarr.zip")
    location.remove_folder("shards")
    location.remove("_progress/r00000.json")
    location.remove("never-written")
    assert location.listing("shards") == location.listing("_progress") == {}
    assert not list(tmp_path.rglob("*.tmp"))


def test_remote_write_is_one_whole_object(s3_server, s3_url):
    location = CacheLocation(s3_url)
    puts = s3_server.count("PUT")
    location.write_bytes("manifest.json", b"{}" * 1000)
    assert s3_server.count("PUT") == puts + 1  # no temporary object, no copy


# ---------------------------------------------------------------------------- one-line errors, fast
def _fails_fast(location, match):
    started = time.monotonic()
    with pytest.raises(StorageError, match=match) as err:
        location.read_bytes("manifest.json")
    elapsed = time.monotonic() - started
    message = str(err.value)
    assert elapsed < 8, f"took {elapsed:.1f} s"
    assert "\n" not in message and "hunter2" not in message
    return message


def test_missing_bucket_unreachable_endpoint_and_bad_credentials(s3_server):
    message = _fails_fast(CacheLocation("s3://no-such-bucket-kdpipe/cache", {"secret": "hunter2", "key": "k"}),
                          "bucket 'no-such-bucket-kdpipe' does not exist")
    assert s3_server.endpoint in message
    _fails_fast(CacheLocation("s3://kdpipe-test/cache", {"endpoint_url": "http://127.0.0.1:9"}),
                "cannot reach the object store at http://127.0.0.1:9")
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():  # the server now checks keys: ours are unknown to it
        _fails_fast(CacheLocation("s3://kdpipe-test/cache", {"key": "AKIAFAKE", "secret": "hunter2"}),
                    "was denied .*check the credentials")


def test_unknown_protocol_and_bad_option_names(s3_server):
    with pytest.raises(ConfigError, match="unknown storage protocol"):
        CacheLocation("nosuchproto://b/p").read_bytes("x")
    with pytest.raises(ConfigError, match="--storage-options"):
        CacheLocation("s3://kdpipe-test/p", {"no_such_option": 1}).read_bytes("x")


# ---------------------------------------------------------------------------- local copies
@pytest.fixture()
def remote_shards(s3_url, tmp_path):
    """Four 1 MB objects under shards/ and their manifest-like entries."""
    location = CacheLocation(s3_url)
    entries = []
    for i in range(4):
        data = os.urandom(1 << 20)
        (tmp_path / f"s{i}").write_bytes(data)
        name = f"shards/b{i:07d}-p000.zarr.zip"
        location.upload(tmp_path / f"s{i}", name)
        entries.append({"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    return location, entries


def _fetch(copies, location, entry):
    return copies.fetch(location, entry["name"], sha256=entry["sha256"], size=entry["bytes"], suffix=".zarr.zip")


def test_copies_are_named_by_content_and_checked(remote_shards, tmp_path):
    location, entries = remote_shards
    copies = LocalCopies(tmp_path / "copies")
    pin = _fetch(copies, location, entries[0])
    assert pin.path.name == entries[0]["sha256"] + ".zarr.zip" and copies.downloads == 1
    pin.release()
    _fetch(copies, location, entries[0]).release()
    assert copies.downloads == 1 and copies.hits == 1
    wrong = {**entries[1], "sha256": "0" * 64}
    with pytest.raises(IntegrityError, match=r"Checksum failure: shard shards/b0000001-p000.zarr.zip of s3://.*not used"):
        _fetch(copies, location, wrong)
    assert sorted(p.name for p in (tmp_path / "copies").iterdir() if not p.name.endswith(".lock")) == [pin.path.name]


def test_least_recently_used_unpinned_copies_go_beyond_the_limit(remote_shards, tmp_path):
    location, entries = remote_shards
    copies = LocalCopies(tmp_path / "copies", limit_bytes=int(2.5 * (1 << 20)))
    pins = [_fetch(copies, location, e) for e in entries]  # all pinned: the limit cannot be kept
    assert copies.size_bytes() == 4 << 20
    for pin in pins:
        pin.release()
        time.sleep(0.01)  # distinct mtimes
    copies.evict()
    kept = {p.name.split(".")[0] for p in (tmp_path / "copies").iterdir() if not p.name.endswith(".lock")}
    assert kept == {entries[2]["sha256"], entries[3]["sha256"]}


def test_private_folder_keeps_only_pinned_copies_and_goes_at_exit(remote_shards):
    location, entries = remote_shards
    copies = LocalCopies()
    pin = _fetch(copies, location, entries[0])
    _fetch(copies, location, entries[1]).release()
    copies.evict()
    assert [p.name for p in copies.folder.iterdir() if not p.name.endswith(".lock")] == [pin.path.name]
    folder = copies.folder
    pin.release()
    del copies
    assert not folder.exists()


def _fetch_in_process(folder, url, entry, queue):
    copies = LocalCopies(folder)
    _fetch(copies, CacheLocation(url), entry).release()
    queue.put(copies.downloads)


def test_processes_sharing_a_folder_download_each_copy_once(remote_shards, s3_url, tmp_path):
    location, entries = remote_shards
    queue = multiprocessing.get_context("fork").Queue()
    procs = [multiprocessing.get_context("fork").Process(target=_fetch_in_process,
                                                         args=(tmp_path / "shared", s3_url, entries[0], queue))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(queue.get(timeout=5) for _ in procs) == [0, 0, 1]


# ---------------------------------------------------------------------------- read-ahead
def test_read_ahead_fetches_the_scheduled_shards_ahead_of_the_reader(remote_shards, s3_server):
    location, entries = remote_shards
    ahead = ShardReadAhead(location, entries, LocalCopies(), suffix=".zarr.zip", read_ahead=2)
    ahead.schedule([3, 1, 0, 2])
    deadline = time.monotonic() + 10
    while ahead.copies.downloads < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ahead.copies.downloads == 2  # 3 and 1, before anything is read
    assert ahead.get(3).read_bytes()[:0] == b""
    deadline = time.monotonic() + 10
    while ahead.copies.downloads < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ahead.copies.downloads == 3  # 0 joined the window once 3 was taken
    ahead.release(3)
    on_disk = {p.name.split(".")[0] for p in ahead.copies.folder.iterdir() if not p.name.endswith(".lock")}
    assert on_disk == {entries[1]["sha256"], entries[0]["sha256"]}  # 3 released, 1 and 0 ahead
    ahead.schedule([0, 1, 2, 3])  # a new epoch: cheap, replaces the order
    for i in (0, 1, 2, 3):
        ahead.get(i)
        ahead.release(i)
    assert ahead.copies.downloads == 5  # 2 is new; 3 had been evicted from the private folder
    ahead.close()
