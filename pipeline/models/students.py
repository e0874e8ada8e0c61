"""Students: a Hugging Face config (random init), a pretrained HF model dir (continued training), or
a ``package.module:factory`` module (classification). Saved models load back with ``from_pretrained``
(HF) or :func:`load_saved_module` (module dirs hold ``kdpipe_module.json`` + ``model.safetensors``).
A pretrained HF student may train LoRA adapters instead (:mod:`kdpipe.pipeline.models.lora`): its
checkpoints hold the adapter, its final ``model/`` the merged model and ``adapter/`` the adapter.
Folders land whole (:func:`landed_folder`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.fileio import atomic_path, atomic_write_json, fsync_dir
from kdpipe.pipeline.models.lora import ADAPTER_DIR, adapter_tensors, is_lora_model, load_adapter_tensors, \
    merge_adapter, save_adapter
from kdpipe.pipeline.models.modules import build_module, is_module_spec, load_module
from kdpipe.pipeline.models.tokenizers import load_tokenizer

MODULE_META = "kdpipe_module.json"  # a saved module student: {"factory": "package.module:factory"}
MODULE_WEIGHTS = "model.safetensors"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


@dataclasses.dataclass
class Student:
    kind: str  # "hf" or "module"
    model: torch.nn.Module
    vocab_size: int  # size of the logits' last axis
    spec: str
    tokenizer: object | None = None
    pretrained: bool = False
    lora: dict | None = None  # the LoRA settings and counts once adapters are added (run.json ``lora``)


def load_student(spec: str, *, task: str, seed: int, tokenizer_path: str | None = None) -> Student:
    """Build the student named by ``spec`` (initialised under ``seed`` when not pretrained)."""
    torch.manual_seed(seed)
    if is_module_spec(spec) or (Path(spec) / MODULE_META).is_file():
        model = load_saved_module(spec) if (Path(spec) / MODULE_META).is_file() else build_module(spec)
        probe_classes = getattr(model, "num_classes", None)
        return Student("module", model, probe_classes or 0, spec)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"student {spec} does not exist; pass an HF config.json, a model directory or module:factory")
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    config_path = path if path.is_file() else path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"student {spec} has no config.json; pass an HF config file or model directory")
    try:
        config = AutoConfig.from_pretrained(str(config_path))
        pretrained = path.is_dir() and any((path / w).is_file() for w in _WEIGHT_FILES)
        model = auto.from_pretrained(str(path)) if pretrained else auto.from_config(config)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot build student from {spec}: {str(exc).splitlines()[0]}") from None
    vocab = config.num_labels if task == "classification" else model.get_output_embeddings().weight.shape[0]
    tokenizer = load_tokenizer(tokenizer_path, required=True) if tokenizer_path else \
        load_tokenizer(str(path) if path.is_dir() else None, required=False)
    return Student("hf", model, int(vocab), spec, tokenizer, pretrained)


def load_saved_module(model_dir: str | Path) -> torch.nn.Module:
    """A module dir as :func:`save_student` writes it: its factory (a ``.py`` file named there is looked
    up next to the weights first) with its weights loaded."""
    root = Path(model_dir)
    try:
        spec = json.loads((root / MODULE_META).read_text())["factory"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{root / MODULE_META} must be JSON like "
                          '{"factory": "package.module:factory"}') from None
    module_name, _, factory = spec.rpartition(":")
    if module_name.endswith(".py") and (root / module_name).is_file():  # a file next to the weights
        spec = f"{(root / module_name).resolve()}:{factory}"
    if not (root / MODULE_WEIGHTS).is_file():
        raise ConfigError(f"module dir {root} has no {MODULE_WEIGHTS}; it must hold the trained weights")
    return load_module(spec, root / MODULE_WEIGHTS)


def save_student(student: Student, out_dir: Path, *, adapter_dir: Path | None = None) -> None:
    """Final model: ``save_pretrained`` (+ tokenizer) for HF, safetensors + factory for modules. A LoRA
    student writes its adapter to ``adapter_dir`` (default: ``adapter/`` next to ``out_dir``) first, then
    its merged model (``student.model`` becomes the merged model)."""
    if is_lora_model(student.model):
        with landed_folder(adapter_dir or out_dir.parent / ADAPTER_DIR) as tmp:
            save_adapter(student.model, tmp)
        student.model = merge_adapter(student.model)
    with landed_folder(out_dir) as tmp:
        if student.kind == "hf":
            student.model.save_pretrained(tmp, safe_serialization=True)
            if student.tokenizer is not None:
                student.tokenizer.save_pretrained(tmp)
            return
        save_state_dict(student.model, tmp / MODULE_WEIGHTS)
        atomic_write_json(tmp / MODULE_META, {"factory": student.spec})


@contextlib.contextmanager
def landed_folder(final: Path):
    """Yield an empty temporary folder next to ``final`` to write into; once written (files fsynced) it
    replaces ``final`` whole, so a failed write leaves ``final`` as it was and no half folder."""
    final = Path(final)
    tmp, old = (final.with_name(f"{final.name}.{os.getpid()}.{suffix}") for suffix in ("tmp", "old"))
    for stale in final.parent.glob(f"{final.name}.*.tmp"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_state_dict(model: torch.nn.Module, path: Path) -> None:
    """Weights as safetensors, atomically; tied tensors are stored once. A LoRA model's are its adapter
    tensors alone (the frozen base is the student's files, whose sha256 run.json records)."""
    from safetensors.torch import save_file, save_model

    with atomic_path(path) as tmp:
        if is_lora_model(model):
            save_file(adapter_tensors(model), str(tmp))
        else:
            save_model(model, str(tmp))


def load_state_dict_into(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file, load_model

    if is_lora_model(model):
        load_adapter_tensors(model, load_file(str(path)))
    else:
        load_model(model, str(path))
