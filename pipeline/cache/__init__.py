"""The cache format, at the bottom of the library: what a cache holds and how it is read.

- :mod:`.schema`: the arrays of a row and their dtypes, encoding and decoding rows;
- :mod:`.encoding`: format 2's bit-packed ids and quantized values;
- :mod:`.sampling`: sampled teacher targets (draws from the tail) and their importance weights;
- :mod:`.manifest`: ``manifest.json``, shard names, software versions, the manifest's checksum;
- :mod:`.reader`: :class:`~kdpipe.pipeline.cache.reader.TeacherCache`, a finished cache read row by row;
- :mod:`.verify` and :mod:`.inspect`: checking a cache's bytes against its manifest, and summarising it;
- :mod:`.storage`: shards as files, one writer/reader pair per format (Zarr, Parquet), on local disk or
  an object store.
"""
