"""Teachers: a Hugging Face model (local directory or hub id) or a plain PyTorch module.

A :class:`Teacher` turns a batch of model inputs into logits ``[B, P, V]`` (``P = L`` positions for
a causal LM, ``P = 1`` for a classifier) and describes itself for the manifest (fingerprint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
from pathlib import Path

import torch

from kdpipe.pipeline.errors import ConfigError, TeacherError
from kdpipe.pipeline.fileio import sha256_files
from kdpipe.pipeline.modules import load_module

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Teacher:
    kind: str  # "hf" or "module"
    task: str  # "causal-lm" or "classification"
    vocab_size: int  # size of the logits' last axis
    max_positions: int | None
    fingerprint: dict
    tokenizer: object | None = None
    tokenizer_fingerprint: dict | None = None
    model: torch.nn.Module | None = None  # None when only the config was loaded (dry run)
    device: torch.device = torch.device("cpu")

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, P, V]`` in the teacher's dtype for inputs on ``self.device``."""
        if self.kind == "hf":
            out = self.model(input_ids=inputs, attention_mask=attention_mask).logits
        else:
            out = self.model(inputs)
        if self.task == "classification":
            if out.ndim != 2 or out.shape[1] != self.vocab_size:
                raise TeacherError(
                    f"teacher output has shape {tuple(out.shape)}, expected [batch, classes] = "
                    f"[{out.shape[0]}, {self.vocab_size}]; a classification teacher must return logits "
                    f"[B, C] with C = the number of classes in --data (largest label + 1 = {self.vocab_size})"
                )
            out = out[:, None, :]
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 (or fp16 without bf16 support) on CUDA, fp32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise ConfigError(f"unknown --dtype {name!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def tokenizer_fingerprint(tokenizer) -> dict:
    """Hash of the tokenizer's full definition plus its vocabulary size and special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:  # slow tokenizer: its vocabulary is its definition
        definition = repr(sorted(tokenizer.get_vocab().items()))
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    return {
        "sha256": hashlib.sha256(definition.encode()).hexdigest(),
        "vocab_size": len(tokenizer),
        "special_ids": special,
        "class": type(tokenizer).__name__,
    }


def _hf_task(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    return "causal-lm"


def load_hf_teacher(
    path: str, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
    load_weights: bool = True, task: str | None = None, device_map: str | None = None,
    max_memory: dict | None = None,
) -> Teacher:
    """Load an HF teacher on ``device``; with ``device_map="auto"``, spread over the GPUs by
    accelerate (within ``max_memory`` when given; all on the CPU without GPUs), inputs going to the
    device of its embedding layer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise TeacherError(
            f"teacher {path} is not a Hugging Face model directory (no config.json); "
            "point --teacher at a directory saved with save_pretrained, or use module:factory"
        )
    if not local.exists():
        check_hub_teacher(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeacherError(
            f"cannot load teacher {path!r}: {first} (is it a local model directory or a reachable "
            "hub id? a model with custom code needs --trust-remote-code)"
        ) from None
    task = task or _hf_task(config)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    vocab_size = config.num_labels if task == "classification" else config.vocab_size
    weights = sorted(p for p in local.glob("*") if p.suffix in _WEIGHT_SUFFIXES) if local.is_dir() else []
    fingerprint = {
        "kind": "hf",
        "path": str(path),
        "class": (getattr(config, "architectures", None) or [auto.__name__])[0],
        "config": config.to_diff_dict(),
        "weights_sha256": sha256_files(weights, root=local) if weights else getattr(config, "_commit_hash", None),
        "dtype": str(dtype).removeprefix("torch."),
    }
    model = None
    if load_weights:
        placement = {}
        if device_map is not None:
            if importlib.util.find_spec("accelerate") is None:
                raise ConfigError("--device-map auto needs accelerate; pip install 'accelerate>=0.26'")
            placement = {"device_map": device_map, "max_memory": max_memory}
        try:
            model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **placement)
        except (OSError, ValueError) as exc:
            raise TeacherError(f"cannot load teacher weights from {path!r}: {exc}") from None
        if device_map is None:
            model.to(device)
        else:
            device = model.get_input_embeddings().weight.device
            device = torch.device("cpu") if device.type == "meta" else device  # offloaded: accelerate moves it
        model.eval()
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return Teacher(
        kind="hf", task=task, vocab_size=int(vocab_size), max_positions=max_positions,
        fingerprint=fingerprint, tokenizer=tokenizer,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), model=model, device=device,
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` (or a legacy bare ``name``): no leading ``/``, ``.`` or ``~``, no ``..``."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and len(name) <= 96


def check_hub_teacher(name: str, *, timeout: float = 10.0) -> None:
    """Fail fast, naming the fix, when a teacher that is not a local path cannot come from the hub.

    Without this, an unreachable hub costs about half a minute of retries before a vague error.
    A model already in the local Hugging Face cache needs no network; otherwise one request, no
    retries, asks the hub whether the model exists.
    """
    if not looks_like_hub_id(name):
        raise TeacherError(
            f"teacher {name} does not exist; give a local model directory, a hub id (org/name) "
            "or package.module:factory"
        )
    import huggingface_hub
    from huggingface_hub import constants

    from kdpipe.pipeline.hub import MISSING, ask_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise TeacherError(
            f"teacher {name!r} does not exist locally and is not in the Hugging Face cache "
            "(HF_HUB_OFFLINE is set); check the path, or download the model first"
        )
    problem = ask_hub(lambda: huggingface_hub.model_info(name, timeout=timeout))
    if problem == MISSING:
        raise TeacherError(
            f"teacher {name!r} does not exist locally and the Hugging Face hub has no model of that name "
            "(or it is private: log in with `hf auth login`); check --teacher"
        )
    if problem:
        raise TeacherError(
            f"teacher {name!r} does not exist locally and the Hugging Face hub cannot be reached to fetch it "
            f"({problem}); check the path, or download the model and give its directory"
        )


def load_module_teacher(
    spec: str, *, weights: str | None, device: torch.device, dtype: torch.dtype,
    num_classes: int, load_weights: bool = True,
) -> Teacher:
    from kdpipe.pipeline.fileio import sha256_file

    if weights is None:
        raise ConfigError(f"module teacher {spec!r} needs its trained weights: pass --weights FILE.safetensors")
    model = load_module(spec, weights).to(device=device, dtype=dtype).eval() if load_weights else None
    fingerprint = {
        "kind": "module",
        "factory": spec,
        "weights_sha256": sha256_file(weights) if Path(weights).is_file() else None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return Teacher(
        kind="module", task="classification", vocab_size=num_classes, max_positions=None,
        fingerprint=fingerprint, model=model, device=device,
    )


def is_module_spec(spec: str) -> bool:
    """``package.module:factory`` or ``file.py:factory`` (a path never has a ':' on POSIX here)."""
    return ":" in spec and not Path(spec).exists()
