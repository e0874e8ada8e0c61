"""Shared fixtures: a tiny random-init HF causal LM with a BPE tokenizer trained on real text,
and a tiny module teacher on real digits. Everything is built locally (no hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "shakespeare" / "heldout"
VOCAB = 300


def _corpus_text(max_chars: int = 60_000) -> str:
    text = "".join(p.read_text() for p in sorted(CORPUS.glob("*.txt")))
    return text[:max_chars]


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A folder of three real text documents (Shakespeare)."""
    text = _corpus_text(30_000)
    folder = tmp_path_factory.mktemp("text")
    for i, part in enumerate(np.array_split(np.array(list(text)), 3)):
        (folder / f"doc{i}.txt").write_text("".join(part))
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A random-init Llama causal LM (vocab 300) saved with save_pretrained plus its BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator([_corpus_text()], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a sharper random teacher: non-trivial top-k and tails
        model.lm_head.weight.mul_(20.0)
    out = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


TINY_CNN = '''
import torch

def tiny_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 13 * 13, 10),
    )
'''


@pytest.fixture(scope="session")
def module_teacher(tmp_path_factory) -> dict:
    """A module teacher (``file.py:tiny_cnn``), its safetensors weights and 40 real MNIST digits."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("module_teacher")
    (folder / "tiny_models.py").write_text(TINY_CNN)
    namespace: dict = {}
    exec(TINY_CNN, namespace)
    torch.manual_seed(0)
    save_file(namespace["tiny_cnn"]().state_dict(), str(folder / "tiny.safetensors"))
    with np.load(REPO / "data" / "mnist" / "heldout.npz") as digits:
        np.savez(folder / "digits.npz", x=digits["x"][:40], y=digits["y"][:40])
    return {
        "spec": f"{folder / 'tiny_models.py'}:tiny_cnn",
        "build": namespace["tiny_cnn"],
        "weights": folder / "tiny.safetensors",
        "data": folder / "digits.npz",
    }


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on localhost; dummy credentials and ``AWS_ENDPOINT_URL`` point
    this process and its subprocesses at it. Bucket ``kdpipe-test`` exists; use a fresh prefix per test."""
    from s3_server import S3Server, s3_environment

    server = S3Server()
    server.start()
    with s3_environment(server.endpoint):
        server.create_bucket("kdpipe-test")
        yield server
    server.stop()


@pytest.fixture()
def s3_url(s3_server, request) -> str:
    """A fresh ``s3://kdpipe-test/<test name>`` prefix."""
    import re

    return f"s3://kdpipe-test/{re.sub(r'[^A-Za-z0-9_-]+', '-', request.node.name)[:80]}"


@pytest.fixture(scope="session")
def module_cache(module_teacher, tmp_path_factory) -> Path:
    """The module teacher's top-3 cache of its 40 digits at T = 2 (its rows' inputs are in the .npz)."""
    from click.testing import CliRunner

    from kdpipe.stages.cli import main

    out = tmp_path_factory.mktemp("module_cache") / "cache"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", module_teacher["spec"], "--weights", str(module_teacher["weights"]),
        "--data", str(module_teacher["data"]), "--out", str(out), "--top-k", "3", "--temperature", "2"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out
