"""What finished shards were made from: hashes of the data bytes read up to each finished block.

A progress record compares the data's file sizes at a resume (cheap), but an in-place edit keeps
the size. So as a rank records a finished block it also records what of the data the block's rows
were made from -- the byte position the data stream had reached (``Block.bytes_read``) -- as the
sha256 of each file's bytes up to that position: :class:`DataRead`. A resume hashes the same bytes
again and refuses, naming the file, when they differ (:meth:`DataRead.check`).

How much of a file a position covers depends on how it is read:

- JSON Lines (plain, ``.gz``, ``.zst``): the stream counts the bytes (lines, or compressed bytes the
  decompressor took) it has read, so the position covers exactly a prefix of the file -- a little
  more for compressed files, whose decompressor reads ahead;
- ``.txt`` (one document per file), Parquet and Arrow files (whose position the stream estimates
  from row counts): the whole file the position falls in (or starts at);
- ``.npz`` arrays and ``save_to_disk`` folders: every file, from the first block on;
- Hub datasets: nothing (no local files to hash).

Covering more than the block used is safe: an edit there refuses a resume that could have gone on.
Hashing runs on the shard writer's thread and reads each covered byte once per run.
"""

from __future__ import annotations

import hashlib

from kdpipe.pipeline.data.sources import Source, suffix_of
from kdpipe.pipeline.errors import ConfigError

_PREFIX_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")  # the stream's position is exact within them
_HASH_BLOCK = 1 << 20


class DataRead:
    """The hashes of the data read up to a byte position of ``source``'s stream (see module doc).

    :meth:`advance` moves forward only and hashes each byte once; :meth:`record` is what a progress
    record keeps: ``{"position": bytes, "files": {relative path: {"bytes": n, "sha256": hex}}}``.
    """

    def __init__(self, source: Source):
        self.source = source
        self.files = list(source.files)
        self.sizes = [f.stat().st_size for f in self.files]
        self.position = 0
        self._covered: dict[str, dict] = {}  # files hashed so far (whole, or a prefix)
        self._digests: dict[int, tuple[int, "hashlib._Hash"]] = {}  # file index -> (bytes hashed, running sha256)

    def record(self) -> dict:
        return {"position": self.position, "files": {name: dict(v) for name, v in self._covered.items()}}

    def advance(self, position: int) -> None:
        """Cover the data read up to ``position`` (bytes of the stream; see ``Block.bytes_read``)."""
        if position <= self.position and self._covered:
            return
        self.position = max(position, self.position)
        for index, want in self._wanted(self.position).items():
            self._hash(index, want)

    def check(self, recorded: dict, out) -> None:
        """Hash the data a record says its blocks were made from; refuse when any of it changed."""
        self.advance(int(recorded.get("position", 0)))
        for name, was in recorded.get("files", {}).items():
            now = self._covered.get(name)
            if now != was:
                what = "its sha256" if was.get("bytes") == self._size_of(name) else f"the sha256 of its first {was.get('bytes')} bytes"
                raise ConfigError(
                    f"data file {name} changed since shards in {out} were made from it ({what} differs, the size "
                    "does not); restore it, or pass --overwrite to capture the data as it is now (or use a new --out)"
                )

    def _size_of(self, name: str) -> int | None:
        for path, size in zip(self.files, self.sizes):
            if self.source.relative(path) == name:
                return size
        return None

    def _wanted(self, position: int) -> dict[int, int]:
        """File index -> bytes of it that ``position`` covers."""
        if not self.files or self.source.kind == "hub":
            return {}
        if self.source.kind != "files":  # arrays, save_to_disk: read through a library, as a whole
            return dict(enumerate(self.sizes))
        wanted, start = {}, 0
        for index, (path, size) in enumerate(zip(self.files, self.sizes)):
            end = start + size
            if end <= position:
                wanted[index] = size
            elif start <= position:
                exact = suffix_of(path) in _PREFIX_SUFFIXES
                if not exact:
                    wanted[index] = size
                elif position > start:
                    wanted[index] = position - start
                break
            start = end
        return wanted

    def _hash(self, index: int, want: int) -> None:
        done, digest = self._digests.get(index, (0, hashlib.sha256()))
        if want > done:
            with open(self.files[index], "rb") as f:
                f.seek(done)
                while done < want:
                    chunk = f.read(min(_HASH_BLOCK, want - done))
                    if not chunk:  # the file shrank: what is hashed no longer matches the size recorded
                        break
                    digest.update(chunk)
                    done += len(chunk)
            self._digests[index] = (done, digest)
        name = self.source.relative(self.files[index])
        self._covered[name] = {"bytes": done, "sha256": digest.copy().hexdigest()}

