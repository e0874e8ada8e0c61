"""Bad input, one case at a time, through the real CLI.

Each case must end with exactly one line ``error: ...`` that names the problem and the fix, exit code
2, no traceback (CliRunner runs with ``catch_exceptions=False``, so a bug's exception fails the
test), no manifest written and nothing already in --out changed. Set ``KDPIPE_ERRORS_TABLE=FILE`` to
also write the messages as the markdown table of ``docs/ERRORS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe.pipeline.cache.manifest import manifest_checksum
from kdpipe.stages.cli import main

MODELS = '''
import torch

class Net(torch.nn.Module):
    """8x8 images -> 10 classes; ``mode`` breaks it on purpose."""

    def __init__(self, mode="plain"):
        super().__init__()
        self.mode = mode
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x):  # x: [B, 8, 8]
        logits = self.linear(x.flatten(1))  # [B, 10]
        if self.mode == "wrong_shape":
            return torch.stack([logits, logits], dim=-1)  # [B, 10, 2]
        if self.mode == "nan":  # NaN for the samples whose first pixel is white
            return torch.where(x.flatten(1)[:, :1] > 0.99, torch.nan, logits)
        return logits

def plain():
    return Net()

def wrong_shape():
    return Net("wrong_shape")

def nan():
    return Net("nan")

def broken():
    raise RuntimeError("CUDA driver not found")
'''
NAN_ROW = 13
CHAT_TEACHER = Path(__file__).resolve().parents[1] / "data" / "teacher"  # has a chat template
STUDENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@dataclasses.dataclass
class Inputs:
    root: Path
    lm: Path
    text: Path
    cache: Path  # a finished cache of the tiny LM
    module: str  # models.py path (append ":factory")
    weights: Path
    digits: Path


def _capture(teacher, data, out, *extra) -> Path:
    result = run_cli("cache-teacher", "--teacher", teacher, "--data", data, "--out", out, "--top-k", 8,
                     "--seq-len", 32, "--temperature", 1, "--temperature", 2, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def inputs(tiny_lm_dir, text_dir, tmp_path_factory) -> Inputs:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "models.py").write_text(MODELS)
    namespace: dict = {}
    exec(MODELS, namespace)
    torch.manual_seed(0)
    save_file(namespace["plain"]().state_dict(), str(root / "net.safetensors"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, size=(24, 8, 8), dtype=np.uint8)
    x[NAN_ROW, 0, 0] = 255
    np.savez(root / "digits.npz", x=x, y=np.arange(24) % 10)
    cache = _capture(tiny_lm_dir, text_dir, root / "cache", "--limit-rows", 16, "--shard-size-mb", 0.01)
    return Inputs(root, tiny_lm_dir, text_dir, cache, str(root / "models.py"), root / "net.safetensors",
                  root / "digits.npz")


# ----------------------------------------------------------------------------- making bad inputs
def _file(root: Path, name: str, content: bytes) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _parquet_without_text(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "no_text.parquet"
    pq.write_table(pa.table({"body": ["Hello there.", "General Kenobi."]}), path)
    return path


def _jsonl(root: Path, name: str, records: list) -> Path:
    return _file(root, name, "".join(json.dumps(r) + "\n" for r in records).encode())


def _chat(inputs: Inputs, out: Path, name: str, messages) -> list:
    """Capture args for one conversation ``messages`` with a teacher that has a chat template."""
    data = _jsonl(inputs.root, name, [{"messages": messages}])
    return _lm(inputs, out, data=data, teacher=CHAT_TEACHER)


def _truncated_gzip(root: Path) -> Path:
    records = "".join(json.dumps({"text": f"line {i} of a corpus"}) + "\n" for i in range(200))
    whole = gzip.compress(records.encode())
    return _file(root, "truncated.jsonl.gz", whole[: len(whole) // 2])


def _folder_with_csv(root: Path) -> Path:
    _file(root, "mixed/a.txt", b"Hello there.")
    return _file(root, "mixed/b.csv", b"text\nGeneral Kenobi.\n").parent


def _dataset_dict(root: Path) -> Path:
    import datasets

    path = root / "dataset_dict"
    if not path.is_dir():
        split = datasets.Dataset.from_dict({"text": ["Hello there.", "General Kenobi."]})
        datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(path))
    return path


def _object_npz(root: Path) -> Path:
    path = root / "objects.npz"
    np.savez(path, x=np.array([{"pixels": [0, 1]}, None], dtype=object), y=np.array([0, 1]))
    return path


def _pickled_weights(root: Path) -> Path:
    path = root / "pickled.pt"
    torch.save({"linear.weight": torch.zeros(10, 64), "config": argparse.Namespace(lr=0.1)}, path)
    return path


def _edited_cache(inputs: Inputs, edit, *, rehash: bool) -> Path:
    """A copy of the finished cache whose manifest went through ``edit`` (checksum redone or not)."""
    out = inputs.root / f"edited_{len(list(inputs.root.glob('edited_*')))}"
    shutil.copytree(inputs.cache, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    if rehash:
        manifest["checksum"] = manifest_checksum(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def _cache_missing_a_shard(inputs: Inputs) -> Path:
    out = _edited_cache(inputs, lambda m: None, rehash=False)
    (out / json.loads((out / "manifest.json").read_text())["shards"][1]["name"]).unlink()
    return out


def _tokenizer_with_other_rules(inputs: Inputs) -> Path:
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inputs.lm)
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()  # same vocabulary, other text
    out = inputs.root / "lowercase_tokenizer"
    tokenizer.save_pretrained(out)
    return out


def _json(root: Path, name: str, obj) -> Path:
    return _file(root, name, json.dumps(obj).encode())


def _toml(inputs: Inputs, name: str, extra: str) -> Path:
    body = f'cache = "{inputs.cache}"\nstudent = "{inputs.root / "student.json"}"\nout = "{inputs.root / "run_toml"}"\n'
    _json(inputs.root, "student.json", STUDENT)
    return _file(inputs.root, name, (body + extra).encode())


def _other_run(inputs: Inputs) -> Path:
    """A finished 2-step training run in its own --out."""
    out = inputs.root / "run_a"
    if not (out / "run.json").is_file():
        result = run_cli(*_train(inputs, out), "--steps", 2)
        assert result.exit_code == 0, result.output
    return out


def _train(inputs: Inputs, out: Path, *, student: dict = STUDENT, cache: Path | None = None) -> list:
    config = _json(inputs.root, f"student_{student['vocab_size']}.json", student)
    return ["train-student", "--cache", cache or inputs.cache, "--student", config, "--out", out,
            "--batch-size", 4, "--eval-every", 0, "--checkpoint-every", 1, "--device", "cpu"]


def _lm(inputs: Inputs, out: Path, *, data=None, teacher=None, extra=()) -> list:
    return ["cache-teacher", "--teacher", teacher or inputs.lm, "--data", data or inputs.text,
            "--out", out, "--seq-len", 32, "--top-k", 8, *extra]


def _module(inputs: Inputs, out: Path, factory: str, *, data=None, weights=None) -> list:
    return ["cache-teacher", "--teacher", f"{inputs.module}:{factory}", "--weights", weights or inputs.weights,
            "--data", data or inputs.digits, "--out", out, "--top-k", 3]


# ----------------------------------------------------------------------------- the cases
# (id, what the user did, args builder (inputs, out) -> CLI args, words the message must hold,
#  where --out points: "finished" = a copy of a finished cache that must stay untouched, "new" = a
#  fresh path that must not get a manifest)
CASES = [
    ("empty-file", "--data is an empty .txt",
     lambda i, o: _lm(i, o, data=_file(i.root, "empty.txt", b"")), "holds no text", "finished"),
    ("empty-folder", "--data is an empty folder",
     lambda i, o: _lm(i, o, data=_file(i.root, "empty_dir/.keep", b"").parent), "is empty", "finished"),
    ("jsonl-no-text", ".jsonl lines without a 'text' field",
     lambda i, o: _lm(i, o, data=_file(i.root, "no_text.jsonl", b'{"content": "hi"}\n')), "has neither a 'text' nor a 'messages' field (it has: content)", "finished"),
    ("parquet-no-text", ".parquet without a 'text' column",
     lambda i, o: _lm(i, o, data=_parquet_without_text(i.root)), "has neither a 'text' nor a 'messages' field (it has: body)", "finished"),
    ("not-utf8", "text that is not UTF-8 (Latin-1)",
     lambda i, o: _lm(i, o, data=_file(i.root, "latin1/a.txt", "Wherefore art thou, Désirée?".encode("latin-1")).parent),
     "is not valid UTF-8", "finished"),
    ("unknown-text-field", "--text-field body on records without a 'body' field",
     lambda i, o: _lm(i, o, data=_jsonl(i.root, "has_text.jsonl", [{"text": "hi"}]), extra=["--text-field", "body"]),
     "has neither a 'body' nor a 'messages' field (it has: text)", "finished"),
    ("messages-not-a-list", "'messages' is a string, not a list",
     lambda i, o: _chat(i, o, "messages_string.jsonl", "Hello there."), "'messages' must be a non-empty list", "new"),
    ("message-without-content", "a message with a role and no content",
     lambda i, o: _chat(i, o, "no_content.jsonl", [{"role": "user"}]), "message 0 has no string 'content'", "new"),
    ("unknown-role", "a message with role 'narrator'",
     lambda i, o: _chat(i, o, "narrator.jsonl", [{"role": "narrator", "content": "Once upon a time"}, {"role": "assistant", "content": "yes"}]),
     "unknown role 'narrator'", "new"),
    ("no-assistant-turn", "a conversation with no assistant turn",
     lambda i, o: _chat(i, o, "no_assistant.jsonl", [{"role": "user", "content": "Hello?"}]), "has no assistant turn", "new"),
    ("chat-without-template", "chat data, teacher tokenizer without a chat template",
     lambda i, o: _lm(i, o, data=_jsonl(i.root, "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])),
     "has no chat template", "finished"),
    ("truncated-gzip", "a .jsonl.gz cut off halfway",
     lambda i, o: _lm(i, o, data=_truncated_gzip(i.root)), "check that it is a complete gzip file", "new"),
    ("garbage-zstd", "a .jsonl.zst that is not zstd data",
     lambda i, o: _lm(i, o, data=_file(i.root, "garbage.jsonl.zst", b"not zstd at all\n" * 8)),
     "check that it is a complete zstd file", "finished"),
    ("glob-matches-nothing", "--data glob that matches no file",
     lambda i, o: _lm(i, o, data=f"{i.root}/nothing_here_*.jsonl"), "matches no files", "finished"),
    ("folder-with-csv", "--data folder holding a .csv next to a .txt",
     lambda i, o: _lm(i, o, data=_folder_with_csv(i.root)),
     "cannot read as text data (b.csv)", "finished"),
    ("dataset-dict", "--data a DatasetDict save_to_disk folder",
     lambda i, o: _lm(i, o, data=_dataset_dict(i.root)), "holds a DatasetDict with splits ['test', 'train']", "finished"),
    ("hf-unknown-dataset", "--data hf:ORG/NAME not cached, hub offline (HF_HUB_OFFLINE=1)",
     lambda i, o: _lm(i, o, data="hf:nonexistent-org-kdpipe/xyz"), "cannot load dataset 'nonexistent-org-kdpipe/xyz'", "finished"),
    ("max-tokens-0", "--max-tokens 0",
     lambda i, o: _lm(i, o, extra=["--max-tokens", 0]), "--max-tokens 0 must be positive", "finished"),
    ("num-workers-negative", "--num-workers -1",
     lambda i, o: _lm(i, o, extra=["--num-workers", -1]), "--num-workers -1 must be 0", "finished"),
    ("top-k-0", "--top-k 0",
     lambda i, o: _lm(i, o, extra=["--top-k", 0]), "--top-k 0 must be at least 1", "finished"),
    ("top-k-above-vocab", "--top-k larger than the vocabulary (300)",
     lambda i, o: _lm(i, o, extra=["--top-k", 301]), "exceeds the teacher's 300 outputs", "finished"),
    ("temperature-0", "--temperature 0",
     lambda i, o: _lm(i, o, extra=["--temperature", 0]), "must all be finite and > 0", "finished"),
    ("temperature-negative", "--temperature -1",
     lambda i, o: _lm(i, o, extra=["--temperature", -1]), "must all be finite and > 0", "finished"),
    ("seq-len-above-context", "--seq-len 256 for a teacher with 128 positions",
     lambda i, o: _lm(i, o, extra=["--seq-len", 256]), "exceeds the teacher's context of 128", "finished"),
    ("teacher-missing-path", "--teacher is a path that does not exist",
     lambda i, o: _lm(i, o, teacher=i.root / "no_such_model"), "does not exist", "finished"),
    ("teacher-missing-hub-id", "--teacher is an org/name hub id that cannot be fetched",
     lambda i, o: _lm(i, o, teacher="nonexistent-org-kdpipe/xyz"), "does not exist locally", "finished"),
    ("teacher-not-a-model", "--teacher is a folder without config.json",
     lambda i, o: _lm(i, o, teacher=i.text), "is not a Hugging Face model directory", "finished"),
    ("out-is-a-file", "--out is an existing file",
     lambda i, o: _lm(i, _file(i.root, "notes.txt", b"keep me")), "is a file", "finished"),
    ("factory-raises", "module teacher whose factory raises",
     lambda i, o: _module(i, o, "broken"), "failed (RuntimeError: CUDA driver not found)", "new"),
    ("wrong-output-shape", "module teacher returning [B, 10, 2]",
     lambda i, o: _module(i, o, "wrong_shape"), "expected [batch, classes]", "new"),
    ("nan-logits", "module teacher producing NaN for one sample",
     lambda i, o: _module(i, o, "nan"), f"NaN or infinite in row {NAN_ROW}", "new"),
    ("npz-object-array", ".npz holding an object array (needs pickle)",
     lambda i, o: _module(i, o, "plain", data=_object_npz(i.root)), "refuses to load", "finished"),
    ("weights-pickled-object", "--weights .pt holding a pickled non-tensor object",
     lambda i, o: _module(i, o, "plain", weights=_pickled_weights(i.root)), "weights_only=True", "new"),
    ("manifest-version", "manifest of an unknown format version",
     lambda i, o: ["inspect", _edited_cache(i, lambda m: m.update(format_version=99), rehash=True)],
     "format version 99, but this kdpipe reads versions 1, 2", None),
    ("manifest-shard-path", "manifest naming shard ../x",
     lambda i, o: ["inspect", _edited_cache(i, lambda m: m["shards"][0].update(name="../x"), rehash=True)],
     "outside the cache's shards/ folder", None),
    ("manifest-hand-edited", "manifest edited by hand (rows changed)",
     lambda i, o: ["inspect", _edited_cache(i, lambda m: m["totals"].update(rows=999), rehash=False)],
     "does not match its checksum", None),
    ("missing-shard-inspect", "a shard file deleted: kdpipe inspect",
     lambda i, o: ["inspect", _cache_missing_a_shard(i)], "b0000000-p001.zarr.zip is missing", None),
    ("missing-shard-train", "a shard file deleted: kdpipe train-student",
     lambda i, o: _train(i, o, cache=_cache_missing_a_shard(i)) + ["--steps", 2],
     "b0000000-p001.zarr.zip is missing", None),
    ("manifest-version-train", "manifest of an unknown format version: kdpipe train-student",
     lambda i, o: _train(i, o, cache=_edited_cache(i, lambda m: m.update(format_version=99), rehash=True)) + ["--steps", 2],
     "format version 99", None),
    ("student-vocab-too-small", "student vocab_size 200 for a 300-token tokenizer",
     lambda i, o: _train(i, o, student={**STUDENT, "vocab_size": 200}) + ["--steps", 2],
     "does not cover the 300 tokens", None),
    ("tokenizer-differs", "--tokenizer whose fingerprint differs from the cache's",
     lambda i, o: _train(i, o) + ["--steps", 2, "--tokenizer", _tokenizer_with_other_rules(i)],
     "tokenizer differs from the one the cache was made with", None),
    ("config-unknown-key", "config file with a misspelt key (alhpa)",
     lambda i, o: ["train-student", "--config", _toml(i, "unknown.toml", "steps = 2\nalhpa = 0.7\n")],
     "unknown config key 'alhpa'", None),
    ("config-wrong-type", 'config file with steps = "ten"',
     lambda i, o: ["train-student", "--config", _toml(i, "wrong.toml", 'steps = "ten"\n')],
     "'steps' must be int", None),
    ("resume-other-run", "--resume on another run's --out (other --lr)",
     lambda i, o: _train(i, _other_run(i)) + ["--steps", 2, "--resume", "--lr", 0.01],
     "is another run: settings.lr", None),
    ("resume-no-run", "--resume on a folder with no run",
     lambda i, o: _train(i, o) + ["--steps", 2, "--resume"], "holds no kdpipe training run", None),
    ("evaluate-other-teacher", "evaluate --teacher with a model other than the cache's teacher",
     lambda i, o: ["evaluate", "--model", _other_run(i) / "model", "--cache", i.cache, "--teacher", _other_run(i) / "model",
                   "--max-rows", 2],
     "is not the teacher cache", None),
]


def _snapshot(folder: Path) -> dict:
    if folder.is_file():
        return {folder: hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hub_offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1 for this test, also for huggingface_hub and datasets imported before it."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_changes_nothing(case, inputs, tmp_path, monkeypatch):
    name, what, make_args, words, out_kind = case
    out = tmp_path / "out"
    if out_kind == "finished":
        shutil.copytree(inputs.cache, out)
    args = make_args(inputs, out)
    if any(str(a).startswith("hf:") for a in args):  # hub datasets: never the network in tests
        _hub_offline(monkeypatch)
    if "--out" in args:
        out = Path(args[args.index("--out") + 1])
    before = _snapshot(out) if out.exists() else {}
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    message = result.stderr[result.stderr.index("error: "):]
    assert message.count("\n") == 1, f"the error is not one line: {message!r}"  # nothing after it
    assert words in errors[0], errors[0]
    if out_kind == "finished":
        assert _snapshot(out) == before, "an existing cache in --out was changed"
    elif out_kind == "new":
        assert not (out / "manifest.json").exists()
    _record(name, what, errors[0], inputs, out)


def _record(name: str, what: str, line: str, inputs: Inputs, out: Path) -> None:
    table = os.environ.get("KDPIPE_ERRORS_TABLE")
    if not table:
        return
    paths = ((out, "OUT"), (inputs.root, "DIR"), (Path(inputs.lm), "TEACHER"), (Path(inputs.text), "TEXT"))
    for path, short in paths:
        line = line.replace(str(path), short)
    with open(table, "a") as f:
        f.write(f"| `{name}` | {what} | `{line.removeprefix('error: ')}` |\n")


def test_verify_names_a_missing_shard(inputs):
    result = run_cli("verify", _cache_missing_a_shard(inputs))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "FAIL shard shards/b0000000-p001.zarr.zip: missing" in result.stderr
