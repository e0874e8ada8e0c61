"""Checks on the shipped demo assets in data/ (corpus, tokenizer, LM teacher, MNIST).

They load exactly what users load, and test quality, not only shapes: the LM teacher
must beat a unigram model on held-out text by a wide margin, and the MNIST teacher
must classify held-out digits.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[1] / "data"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DATA / "teacher")


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DATA / "teacher").eval()


def read_split(split: str) -> list[str]:
    files = sorted((DATA / "shakespeare" / split).glob("*.txt"))
    assert files, f"no {split} texts"
    return [f.read_text(encoding="utf-8") for f in files]


def test_corpus_splits_are_disjoint_utf8_plays():
    train = sorted(p.name for p in (DATA / "shakespeare" / "train").glob("*.txt"))
    held = sorted(p.name for p in (DATA / "shakespeare" / "heldout").glob("*.txt"))
    assert len(train) >= 8 and len(held) == 1
    assert not set(train) & set(held)
    for text in read_split("train") + read_split("heldout"):
        assert "\r" not in text and "Gutenberg" not in text


def test_tokenizer_loads_and_round_trips(tokenizer):
    from transformers import AutoTokenizer

    standalone = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    assert len(tokenizer) == len(standalone) == 2048
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOT
    assert tokenizer.eos_token_id == tokenizer.pad_token_id
    text = read_split("heldout")[0][:2000]
    ids = tokenizer(text)["input_ids"]
    assert ids == standalone(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE: lossless
    assert len(text) / len(ids) > 2.0  # real merges were learnt, not just bytes
    assert tokenizer(f"a{EOT}b")["input_ids"][1] == tokenizer.eos_token_id  # special, not split


def test_teacher_config(teacher, tokenizer):
    cfg = teacher.config
    assert cfg.model_type == "llama"
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.max_position_embeddings >= 128
    assert cfg.eos_token_id == tokenizer.eos_token_id
    n_params = sum(p.numel() for p in teacher.parameters())
    assert 2e6 < n_params < 8e6
    assert (DATA / "teacher" / "model.safetensors").stat().st_size < 25e6


@torch.no_grad()
def test_teacher_beats_unigram_on_heldout(teacher, tokenizer):
    seq_len, n_rows = 128, 8
    held = [tokenizer.eos_token_id] + tokenizer(read_split("heldout")[0])["input_ids"]
    # Rows spread evenly over the held-out play, not only its cast list.
    starts = np.linspace(0, len(held) - seq_len - 1, n_rows).astype(int)
    rows = torch.tensor([held[s:s + seq_len] for s in starts])
    teacher_ce = teacher(input_ids=rows, labels=rows).loss.item()

    # Unigram baseline: add-one smoothed token frequencies of the training split,
    # scored on the same predicted tokens (every position but the first of a row).
    counts = np.ones(len(tokenizer))
    for text in read_split("train"):
        counts += np.bincount(tokenizer(text)["input_ids"], minlength=len(tokenizer))
    logp = np.log(counts / counts.sum())
    unigram_ce = -logp[rows[:, 1:].numpy()].mean()

    print(f"held-out CE: teacher {teacher_ce:.3f}  unigram {unigram_ce:.3f} nats")
    assert math.isfinite(teacher_ce)
    assert teacher_ce < unigram_ce - 1.0  # ~4.0 vs ~6.1 nats for the shipped teacher


def test_teacher_generates(teacher, tokenizer):
    torch.manual_seed(0)
    prompt = tokenizer("HAMLET.\nTo be, or not", return_tensors="pt")
    out = teacher.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def load_mnist_models():
    spec = importlib.util.spec_from_file_location("mnist_models", DATA / "mnist_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mnist_arrays():
    full, train, held = (np.load(DATA / "mnist" / f"{n}.npz") for n in ("mnist_5k", "train", "heldout"))
    assert full["x"].shape == (5000, 1, 28, 28) and full["x"].dtype == np.uint8
    assert train["x"].shape == (4000, 1, 28, 28) and held["x"].shape == (1000, 1, 28, 28)
    assert train["y"].dtype == held["y"].dtype == np.int64
    assert np.bincount(train["y"]).tolist() == [400] * 10
    assert np.bincount(held["y"]).tolist() == [100] * 10
    assert full["x"].max() == 255 and full["x"].min() == 0


def test_mnist_model_factories():
    models = load_mnist_models()
    x = torch.rand(3, 1, 28, 28)
    teacher, student = models.resnet_teacher(), models.cnn_student()
    assert teacher(x).shape == student(x).shape == (3, 10)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert 100_000 <= n_teacher <= 300_000 and 5_000 <= n_student <= 20_000


@torch.no_grad()
def test_mnist_teacher_accuracy():
    from safetensors.torch import load_file

    model = load_mnist_models().resnet_teacher()
    model.load_state_dict(load_file(DATA / "mnist" / "teacher.safetensors"))  # strict
    model.eval()
    held = np.load(DATA / "mnist" / "heldout.npz")
    x = torch.from_numpy(held["x"][:200]).float() / 255.0
    y = torch.from_numpy(held["y"][:200])
    acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"MNIST teacher accuracy on 200 held-out digits: {acc:.3f}")
    assert acc >= 0.90
