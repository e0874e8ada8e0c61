"""What ``--data`` names and its records (kdpipe.pipeline.data.sources, .documents): every record of
every readable file is read, in path order, hashed as it is read, and a real capture holds exactly
the documents' tokens."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kdpipe import open_cache
from kdpipe.pipeline.data import Fields, ReadState, iter_records, resolve_source
from kdpipe.pipeline.errors import DataError
from kdpipe.stages.cli import main

PLAY = Path(__file__).resolve().parents[2] / "data" / "shakespeare" / "heldout" / "twelfth_night.txt"
# The mixed folder's files in reading order (sorted relative paths), with their number of records.
MIXED = [("a.txt", 1), ("b.jsonl", 3), ("d.jsonl.gz", 3), ("e.jsonl.zst", 3), ("sub/c.parquet", 3)]
HIDDEN = [".DS_Store", ".git/config", "sub/.notes.csv"]  # unreadable types, but hidden: ignored


def passages(n: int, size: int = 300, start: int = 0) -> list[str]:
    """``n`` consecutive passages of real text (Twelfth Night, from its start again when it ends)."""
    text = PLAY.read_text()
    text = text * (1 + (start + n * size) // len(text))
    return [text[start + i * size : start + (i + 1) * size] for i in range(n)]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def text_lines(texts: list[str]) -> bytes:
    """JSON Lines of ``{"text": ...}`` records."""
    return jsonl([{"text": t} for t in texts])


def write_parquet(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


def zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder of every readable type (plus hidden files), and its documents' texts in reading order.

    The .gz and .zst files are each two compressed members/frames concatenated, as appending makes."""
    folder = tmp_path_factory.mktemp("mixed")
    texts = passages(sum(n for _, n in MIXED))
    (folder / "sub").mkdir()
    (folder / "a.txt").write_text(texts[0])
    (folder / "b.jsonl").write_bytes(text_lines(texts[1:4]))
    (folder / "d.jsonl.gz").write_bytes(gzip.compress(text_lines(texts[4:6])) + gzip.compress(text_lines(texts[6:7])))
    (folder / "e.jsonl.zst").write_bytes(zstd(text_lines(texts[7:8])) + zstd(text_lines(texts[8:10])))
    write_parquet(folder / "sub" / "c.parquet", [{"text": t} for t in texts[10:13]])
    for name in HIDDEN:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("not data")
    return folder, texts


def read_texts(spec, fields: Fields = Fields()) -> list[tuple[str, str]]:
    """``(where, text)`` of every document of ``--data spec``."""
    return [(where, fields.document(where, record).text) for where, record in iter_records(resolve_source(str(spec)))]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def captured_tokens(teacher, data, out, *extra) -> tuple[np.ndarray, dict]:
    """The real tokens of a capture (every row's masked input_ids, in row order) and its manifest."""
    result = run_cli("cache-teacher", "--teacher", teacher, "--data", data, "--out", out, "--seq-len", 32,
                     "--top-k", 4, "--num-workers", 0, *extra)
    assert result.exit_code == 0, result.output
    cache = open_cache(out)
    rows = [cache.read(i) for i in range(len(cache))]
    return np.concatenate([r["input_ids"][r["mask"]] for r in rows]), cache.manifest


def expected_tokens(teacher, texts: list[str]) -> np.ndarray:
    """Each document tokenised on its own, followed by EOS, concatenated (computed independently)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- folders
def test_folder_yields_every_record_of_every_file_in_path_order(mixed):
    folder, texts = mixed
    source = resolve_source(str(folder))
    assert [source.relative(f) for f in source.files] == [name for name, _ in MIXED]
    docs = read_texts(folder)
    assert [text for _, text in docs] == texts
    files = [where.split(":")[0].split(" row ")[0] for where, _ in docs]
    assert files == [str(folder / name) for name, n in MIXED for _ in range(n)]


def test_capture_of_a_mixed_folder_holds_every_token(mixed, tiny_lm_dir, tmp_path):
    folder, texts = mixed
    tokens, manifest = captured_tokens(tiny_lm_dir, folder, tmp_path / "cache")
    np.testing.assert_array_equal(tokens, expected_tokens(tiny_lm_dir, texts))
    assert manifest["totals"]["tokens"] == len(tokens)
    assert manifest["data"]["sha256_by_file"] == {name: sha256(folder / name) for name, _ in MIXED}


def test_hidden_files_are_ignored(mixed):
    folder, _ = mixed
    assert all((folder / name).is_file() for name in HIDDEN)
    assert [f.relative_to(folder).as_posix() for f in resolve_source(str(folder)).files] == [n for n, _ in MIXED]


def test_folder_with_an_unreadable_file_is_refused_naming_it(tmp_path):
    (tmp_path / "a.txt").write_text("Hello there.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.csv").write_text("text\nGeneral Kenobi.\n")
    with pytest.raises(DataError, match=r"holds 1 file\(s\) kdpipe cannot read as text data \(notes\.csv\)"):
        resolve_source(str(tmp_path))


# ----------------------------------------------------------------------------- globs
def test_glob_selects_exactly_the_matching_files(tmp_path):
    texts = passages(5)
    (tmp_path / "sub").mkdir()
    (tmp_path / "x1.jsonl").write_bytes(text_lines(texts[0:1]))
    (tmp_path / "sub" / "x2.jsonl").write_bytes(text_lines(texts[1:3]))
    (tmp_path / "sub" / "x3.jsonl.zst").write_bytes(zstd(text_lines(texts[3:4])))  # not *.jsonl
    (tmp_path / "y.jsonl").write_bytes(text_lines(texts[4:5]))
    (tmp_path / "x.csv").write_text("not data")  # not matched, so not refused
    source = resolve_source(f"{tmp_path}/**/x*.jsonl")
    assert [source.relative(f) for f in source.files] == ["sub/x2.jsonl", "x1.jsonl"]
    assert [text for _, text in read_texts(f"{tmp_path}/**/x*.jsonl")] == [texts[1], texts[2], texts[0]]
    assert [text for _, text in read_texts(f"{tmp_path}/sub/x*")] == texts[1:4]


# ----------------------------------------------------------------------------- datasets folders, hub ids
RECORDS = [{"text": t, "label": i % 3} for i, t in enumerate(passages(9, size=120))]


def documents_of(spec) -> list[tuple[str | None, int | None]]:
    source = resolve_source(str(spec))
    return [(d.text, d.label) for d in (Fields().document(w, r) for w, r in iter_records(source))]


def test_saved_dataset_and_its_arrow_files_read_like_the_jsonl(tmp_path):
    import datasets

    (tmp_path / "data.jsonl").write_bytes(jsonl(RECORDS))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(saved), num_shards=2)
    expected = documents_of(tmp_path / "data.jsonl")
    assert expected == [(r["text"], r["label"]) for r in RECORDS]
    assert resolve_source(str(saved)).kind == "saved-dataset"
    assert documents_of(saved) == expected
    first, second = sorted(saved.glob("*.arrow"))
    assert documents_of(first) + documents_of(second) == expected
    assert documents_of(f"{saved}/*.arrow") == expected


def test_arrow_ipc_file_format_is_read(tmp_path):
    import pyarrow as pa

    table = pa.Table.from_pylist(RECORDS)
    with pa.ipc.new_file(tmp_path / "data.arrow", table.schema) as writer:  # random-access format
        for batch in table.to_batches(max_chunksize=4):
            writer.write_batch(batch)
    assert documents_of(tmp_path / "data.arrow") == [(r["text"], r["label"]) for r in RECORDS]


def offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1, also for huggingface_hub and datasets imported before this test."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_hf_local_folder_goes_through_load_dataset(kind, tmp_path, monkeypatch):
    offline(monkeypatch)
    folder = tmp_path / "local_dataset"
    folder.mkdir()
    if kind == "jsonl":
        (folder / "part-0.jsonl").write_bytes(jsonl(RECORDS[:5]))
        (folder / "part-1.jsonl").write_bytes(jsonl(RECORDS[5:]))
    else:
        write_parquet(folder / "part-0.parquet", RECORDS[:5])
        write_parquet(folder / "part-1.parquet", RECORDS[5:])
    source = resolve_source(f"hf:{folder}")
    assert (source.kind, source.split) == ("hub", "train")
    assert [record for _, record in iter_records(source)] == RECORDS


def test_dataset_dict_folder_is_refused_naming_a_split(tmp_path):
    import datasets

    split = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="holds a DatasetDict") as error:
        resolve_source(str(tmp_path / "dd"))
    assert str(tmp_path / "dd" / "train") in str(error.value)  # a folder --data can name instead
    assert documents_of(tmp_path / "dd" / "train") == [(r["text"], r["label"]) for r in RECORDS]


# ----------------------------------------------------------------------------- hashes while reading
LINES = 5_000  # records of each .jsonl file in ``hashed``


@pytest.fixture(scope="module")
def hashed(tmp_path_factory) -> Path:
    """A .txt, then plain, .gz and .zst JSON Lines of ~1.6 MB each (many reads of the hashing reader;
    the .zst has a second frame of three records)."""
    folder = tmp_path_factory.mktemp("hashed")
    texts = passages(LINES)
    (folder / "a.txt").write_text(passages(1, size=5_000)[0])
    (folder / "b.jsonl").write_bytes(text_lines(texts))
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(text_lines(texts)))
    (folder / "d.jsonl.zst").write_bytes(zstd(text_lines(texts)) + zstd(text_lines(texts[:3])))
    return folder


def test_hashes_from_a_full_streaming_read_equal_the_file_bytes(hashed):
    source = resolve_source(str(hashed))
    state = ReadState(source)
    assert sum(1 for _ in iter_records(source, state)) == 1 + 3 * LINES + 3
    files = sorted(p.name for p in hashed.iterdir())
    assert state.sha256 == {name: sha256(hashed / name) for name in files}
    assert state.bytes_done == sum((hashed / name).stat().st_size for name in files)


# stopped at a.txt's record, then inside b.jsonl, c.jsonl.gz, d.jsonl.zst and d's second frame
@pytest.mark.parametrize("stop_after", [1, 2, LINES + 3, 2 * LINES + 2, 3 * LINES + 2])
def test_a_stream_stopped_early_still_gets_correct_hashes(hashed, stop_after):
    source = resolve_source(str(hashed))
    state = ReadState(source)
    records = iter_records(source, state)
    for _ in range(stop_after):
        next(records)
    records.close()
    files = sorted(p.name for p in hashed.iterdir())
    assert state.complete_hashes() == {name: sha256(hashed / name) for name in files}


# ----------------------------------------------------------------------------- fields
def test_text_field_names_the_field_read(tmp_path, tiny_lm_dir):
    bodies, titles = passages(4), passages(4, size=40, start=50_000)
    data = tmp_path / "articles.jsonl"
    data.write_bytes(jsonl([{"title": t, "body": b, "text": "not this"} for t, b in zip(titles, bodies)]))
    assert [text for _, text in read_texts(data, Fields(text="body"))] == bodies
    tokens, _ = captured_tokens(tiny_lm_dir, data, tmp_path / "cache", "--text-field", "body")
    np.testing.assert_array_equal(tokens, expected_tokens(tiny_lm_dir, bodies))


def test_unreachable_hub_dataset_fails_fast_with_one_clear_error(monkeypatch):
    """No network here: one request, no retries, and a message naming the fix."""
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    started = time.perf_counter()
    with pytest.raises(DataError, match="nonexistent-org-kdpipe/xyz") as info:
        resolve_source("hf:nonexistent-org-kdpipe/xyz")
    assert time.perf_counter() - started < 15
    assert "Hub cannot be reached" in str(info.value) or "has no dataset of that name" in str(info.value)
