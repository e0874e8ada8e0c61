"""Stage one's input: what ``--data`` names, read as a stream of documents, packed into row blocks.

- :mod:`.sources`: files, folders, globs, ``datasets`` folders and Hub ids;
- :mod:`.readers`: a source read record by record, its files hashed on the way;
- :mod:`.documents`: a record as plain text or a chat conversation (``--text-field``, ``--messages-field``);
- :mod:`.chat`: a conversation rendered with the teacher's chat template, with its assistant-token mask;
- :mod:`.packing`: documents to fixed-size rows and the mask of positions that are targets;
- :mod:`.stream`: blocks of rows, tokenised by worker processes, split between ranks;
- :mod:`.arrays`: ``.npz`` arrays for module teachers.
"""

from kdpipe.pipeline.data.arrays import input_hash, rows_from_arrays
from kdpipe.pipeline.data.documents import Document, Fields, documents
from kdpipe.pipeline.data.packing import PackingSpec, Rows, pack
from kdpipe.pipeline.data.readers import ReadState, iter_records, jsonl_records
from kdpipe.pipeline.data.sources import Source, resolve_source
from kdpipe.pipeline.data.stream import Block, BlockStream


def data_documents(source: Source, fields: Fields):
    """Every document of ``source``, in order (a stream: nothing is read ahead)."""
    return documents(iter_records(source), fields)


__all__ = [
    "Block", "BlockStream", "Document", "Fields", "PackingSpec", "ReadState", "Rows", "Source",
    "data_documents", "input_hash", "jsonl_records", "pack", "resolve_source", "rows_from_arrays",
]
