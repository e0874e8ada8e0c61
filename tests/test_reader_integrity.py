"""Every reader of a cache checks a shard's bytes before it uses its rows (issue 27, item 1).

Real captures of the tiny teacher, then real damage to one copy at a time: a shard overwritten with
another shard's bytes, two shards swapped, one flipped byte, a truncated shard. ``evaluate``,
``inspect`` and ``inspect --fidelity`` (through the CLI, exceptions not caught) and the library's
``open_cache`` refuse each with one ``error:`` line naming the shard and ``kdpipe verify``, exit 2,
no traceback; none of them scores a damaged cache. Following the message's advice repairs the cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import kdpipe
from kdpipe.pipeline.errors import IntegrityError
from kdpipe.stages.cli import main

SHARD_OPTIONS = ("--seq-len", 32, "--limit-rows", 8, "--batch-size", 8, "--top-k", 8, "--temperature", 1.0,
                 "--shard-size-mb", 0.004)  # 8 rows spread over several shards of equal row counts


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def capture_args(teacher, data, out, *extra) -> list:
    return ["cache-teacher", "--teacher", teacher, "--data", data, "--out", out, "--device", "cpu", *SHARD_OPTIONS,
            *extra]


@pytest.fixture(scope="module")
def pristine(tiny_lm_dir, text_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "cache"
    result = run_cli(*capture_args(tiny_lm_dir, text_dir, out))
    assert result.exit_code == 0, result.output
    shards = kdpipe.open_cache(out).shards
    assert len(shards) >= 2 and shards[0]["rows"] == shards[1]["rows"]  # a swap keeps every row count
    assert shards[0]["sha256"] != shards[1]["sha256"]
    return out


# ----------------------------------------------------------------------------- the damage
def overwrite_with_another(cache: Path) -> str:
    """Shard 1 holds shard 0's bytes (a copy gone wrong): same row count, valid file, wrong rows."""
    first, second = shard_files(cache)[:2]
    second.write_bytes(first.read_bytes())
    return second.relative_to(cache).as_posix()


def swap_two(cache: Path) -> str:
    """Shards 0 and 1 exchanged: both valid files of the right row count, in the wrong place."""
    first, second = shard_files(cache)[:2]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    return first.relative_to(cache).as_posix()  # read first


def flip_a_byte(cache: Path) -> str:
    """One bit of shard 1's middle byte flipped (bit rot): same size."""
    shard = shard_files(cache)[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard.relative_to(cache).as_posix()


def truncate(cache: Path) -> str:
    """Shard 1 cut to half its bytes (an interrupted copy)."""
    shard = shard_files(cache)[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.relative_to(cache).as_posix()


ATTACKS = {"overwritten": overwrite_with_another, "swapped": swap_two, "flipped-byte": flip_a_byte,
           "truncated": truncate}


def shard_files(cache: Path) -> list[Path]:
    return [cache / entry["name"] for entry in kdpipe.open_cache(cache).shards]


@pytest.fixture(params=list(ATTACKS))
def damaged(request, pristine, tmp_path) -> tuple[Path, str]:
    """A damaged copy of the pristine cache and the name of the first damaged shard a reader meets."""
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    return cache, ATTACKS[request.param](cache)


def assert_one_line_refusal(result, shard: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert shard in lines[0] and "kdpipe verify" in lines[0] and "rows were not used" in lines[0], lines[0]
    assert "ce:" not in result.stdout and "mean tail mass" not in result.stdout  # nothing was scored
    return lines[0]


# ----------------------------------------------------------------------------- the readers
def test_evaluate_refuses_a_damaged_shard(damaged, tiny_lm_dir):
    cache, shard = damaged
    assert_one_line_refusal(run_cli("evaluate", "--model", tiny_lm_dir, "--cache", cache, "--device", "cpu"), shard)


def test_inspect_refuses_a_damaged_shard(damaged):
    cache, shard = damaged
    assert_one_line_refusal(run_cli("inspect", cache), shard)


def test_inspect_fidelity_refuses_a_damaged_shard(damaged):
    cache, shard = damaged  # --sample-rows 0: only the fidelity probe reads rows
    result = run_cli("inspect", cache, "--fidelity", "--sample-rows", 0, "--rows", 8, "--device", "cpu")
    assert_one_line_refusal(result, shard)


def test_open_cache_refuses_a_damaged_shard(damaged):
    cache, shard = damaged
    with kdpipe.open_cache(cache) as opened, pytest.raises(IntegrityError) as refused:
        for i in range(len(opened)):
            opened.read(i)
    assert shard in str(refused.value) and "kdpipe verify" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_same_readers_accept_the_pristine_cache(pristine, tiny_lm_dir):
    evaluated = run_cli("evaluate", "--model", tiny_lm_dir, "--cache", pristine, "--device", "cpu")
    assert evaluated.exit_code == 0 and "top1_agreement:" in evaluated.stdout, evaluated.output
    inspected = run_cli("inspect", pristine, "--fidelity", "--rows", 8, "--device", "cpu")
    assert inspected.exit_code == 0 and "kl_bins" in inspected.stdout, inspected.output


# ----------------------------------------------------------------------------- undecodable bytes
@pytest.mark.parametrize("shard_format, damage", [
    ("zarr", lambda data: data[:-22] + bytes([data[-22] ^ 0xFF]) + data[-21:]),  # the zip's end record
    ("parquet", lambda data: data[:-4] + b"PAR0"),  # the footer's magic
])
def test_bytes_that_do_not_decode_are_an_integrity_error(shard_format, damage, tiny_lm_dir, text_dir, tmp_path):
    """With the hash skipped on purpose (verify_hashes=False), a shard that does not decode is still a
    one-line IntegrityError naming it and ``kdpipe verify``, not zipfile's or pyarrow's exception."""
    cache = tmp_path / shard_format
    result = run_cli(*capture_args(tiny_lm_dir, text_dir, cache, "--format", shard_format))
    assert result.exit_code == 0, result.output
    shard = shard_files(cache)[0]
    shard.write_bytes(damage(shard.read_bytes()))
    name = shard.relative_to(cache).as_posix()
    with kdpipe.open_cache(cache, verify_hashes=False) as opened, pytest.raises(IntegrityError) as refused:
        opened.read(0)
    message = str(refused.value)
    assert name in message and "cannot be decoded" in message and "kdpipe verify" in message and "\n" not in message
    with kdpipe.open_cache(cache) as opened, pytest.raises(IntegrityError, match=f"Checksum failure: shard {name}"):
        opened.read(0)  # the default checks the hash first


def test_skipping_the_hash_still_refuses_a_truncated_shard(pristine, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    name = truncate(cache)
    with kdpipe.open_cache(cache, verify_hashes=False) as opened, pytest.raises(IntegrityError) as refused:
        for i in range(len(opened)):
            opened.read(i)
    assert f"shard {name} of {cache} has" in str(refused.value) and "truncated" in str(refused.value)


def test_inspect_skips_the_hash_only_when_asked(pristine, tmp_path):
    """--skip-hash-check (for a big cache just verified) hashes nothing: a flipped byte is then found
    only by the zip's own CRC as the shard is decoded, and a truncated shard by its size -- each still
    one line naming the shard and kdpipe verify."""
    flipped, truncated = tmp_path / "flipped", tmp_path / "truncated"
    for cache in (flipped, truncated):
        shutil.copytree(pristine, cache)
    name = flip_a_byte(flipped)
    hashed = assert_one_line_refusal(run_cli("inspect", flipped), name)
    assert "Checksum failure" in hashed
    skipped = run_cli("inspect", flipped, "--skip-hash-check")
    assert skipped.exit_code == 2 and "Traceback" not in skipped.output
    line = skipped.stderr.strip()
    assert "\n" not in line and f"shard {name} of {flipped} cannot be decoded (BadZipFile: " in line, line
    assert "kdpipe verify" in line and "Checksum failure" not in line
    name = truncate(truncated)
    assert "truncated" in assert_one_line_refusal(run_cli("inspect", truncated, "--skip-hash-check"), name)


# ----------------------------------------------------------------------------- the advice works
def test_following_the_message_repairs_the_cache(pristine, tiny_lm_dir, text_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    flip_a_byte(cache)
    refusal = assert_one_line_refusal(run_cli("inspect", cache), shard_files(cache)[1].relative_to(cache).as_posix())
    assert f"kdpipe verify {cache}" in refusal and f"{cache}/manifest.json" in refusal
    listed = run_cli("verify", cache)
    assert listed.exit_code == 1 and listed.stderr.count("FAIL shard") == 1, listed.output
    assert "delete it and manifest.json and re-run the same cache-teacher command" in listed.stderr
    shard_files(cache)[1].unlink()  # the bad shard, then the manifest, as the message says
    (cache / "manifest.json").unlink()
    redone = run_cli(*capture_args(tiny_lm_dir, text_dir, cache))
    assert redone.exit_code == 0, redone.output
    assert run_cli("verify", cache).exit_code == 0
    hashes = [[s["sha256"] for s in kdpipe.open_cache(c).shards] for c in (cache, pristine)]
    assert hashes[0] == hashes[1]  # the same shards as before the damage
    assert run_cli("inspect", cache).exit_code == 0


def test_a_shard_changed_after_it_was_hashed_is_hashed_again(pristine, tmp_path):
    """A shard is hashed once while its file stays the same; a change between two opens is still caught."""
    from kdpipe.pipeline.cache.reader import release_shard

    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    with kdpipe.open_cache(cache) as opened:
        index, _ = opened.locate(len(opened) - 1)
        opened.read(len(opened) - 1)  # opens (and hashes) the last shard
        release_shard(opened, index)
        flipped = bytearray(shard_files(cache)[index].read_bytes())
        flipped[len(flipped) // 2] ^= 0x01
        shard_files(cache)[index].write_bytes(bytes(flipped))
        with pytest.raises(IntegrityError, match="Checksum failure"):
            opened.read(len(opened) - 1)
