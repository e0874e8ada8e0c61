"""The model ``kdpipe evaluate`` scores: a Hugging Face model dir or a kdpipe module dir, in fp32, and
the row length its text data is packed to."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.models.students import MODULE_META, load_saved_module

DEFAULT_SEQ_LEN = 256  # as cache-teacher; capped at the model's context (see data_seq_len)


@dataclasses.dataclass
class EvalModel:
    kind: str  # "hf" or "module"
    task: str  # "causal-lm" or "classification"
    module: torch.nn.Module
    device: torch.device
    tokenizer: object | None = None
    max_positions: int | None = None
    num_outputs: int | None = None  # size of the logits' last axis; None for a module until it runs
    # the teacher's vocabulary V_t when the model has more outputs (a padded head): the logits are cut to
    # their first V_t columns before any softmax, as training does (pipeline/train/targets.py's policy)
    vocab_in_use: int | None = None

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[B, P, V]`` (``P = L`` for a causal LM, 1 for a classifier) for inputs on ``device``."""
        if self.kind == "hf":
            out = self.module(input_ids=inputs, attention_mask=attention_mask).logits
        else:
            out = self.module(inputs)
        if self.vocab_in_use is not None and out.shape[-1] > self.vocab_in_use:
            out = out[..., : self.vocab_in_use]
        if self.task == "classification":
            if out.ndim != 2:
                raise ConfigError(f"the model returns shape {tuple(out.shape)}; a classifier must return logits [batch, classes]")
            out = out[:, None, :]
        return out


def load_model(model_dir: str | Path, *, device: torch.device) -> EvalModel:
    """A Hugging Face model dir (config.json) or a kdpipe module dir (kdpipe_module.json), in fp32.

    A train-student run dir stands for its final model, ``model/``. A module dir's factory may name a
    ``.py`` file relative to the dir itself.
    """
    root = Path(model_dir)
    if not (root / MODULE_META).is_file() and not (root / "config.json").is_file() and (root / "model").is_dir():
        root = root / "model"  # a train-student run dir: its final model
    if (root / MODULE_META).is_file():
        return _load_module_dir(root, device)
    if (root / "config.json").is_file():
        return _load_hf_dir(root, device)
    raise ConfigError(
        f"--model {model_dir} holds neither config.json (Hugging Face) nor {MODULE_META} (module); "
        "point it at a train-student output dir or a model dir saved with save_pretrained"
    )


def _load_hf_dir(root: Path, device: torch.device) -> EvalModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(root, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
        archs = getattr(config, "architectures", None) or []
        task = "classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal-lm"
        auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
        model = auto.from_pretrained(root, dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot load model {root}: {first} "
                          "(it needs config.json, weights and tokenizer files)") from None
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    num_outputs = config.num_labels if task == "classification" else model.get_output_embeddings().weight.shape[0]
    return EvalModel("hf", task, model.to(device).eval(), device, tokenizer, max_positions, int(num_outputs))


def _load_module_dir(root: Path, device: torch.device) -> EvalModel:
    module = load_saved_module(root).to(device=device, dtype=torch.float32)
    return EvalModel("module", "classification", module.eval(), device)


def model_dir_name(model: EvalModel) -> str:
    return getattr(model.module, "name_or_path", None) or "(given)"


def data_seq_len(model: EvalModel, model_dir, seq_len: int | None) -> tuple[int, str]:
    """Tokens per row for text ``data`` without a cache, and where that number comes from: ``seq_len``
    when given; else the seq_len of the cache a train-student model was trained on (its run dir's
    ``run.json`` names the cache), so the model is scored on rows like those it learnt from; else
    :data:`DEFAULT_SEQ_LEN`, capped at the model's context."""
    if seq_len is not None:
        return seq_len, "--seq-len"
    trained = _training_cache_seq_len(Path(model_dir))
    if trained is not None:
        return trained
    if model.max_positions is not None and model.max_positions < DEFAULT_SEQ_LEN:
        return model.max_positions, f"the model's context (default {DEFAULT_SEQ_LEN}, capped at it; --seq-len sets it)"
    return DEFAULT_SEQ_LEN, f"default {DEFAULT_SEQ_LEN} (--seq-len sets it)"


def training_teacher_vocab(model_dir) -> int | None:
    """The teacher's vocabulary size V_t that a train-student run dir (``model_dir`` or its parent)
    trained against, as its ``run.json`` records it; None otherwise (or for runs of earlier versions)."""
    from kdpipe.pipeline.train.checkpoint import RUN_MANIFEST

    root = Path(model_dir)
    run = next((d / RUN_MANIFEST for d in (root, root.parent) if (d / RUN_MANIFEST).is_file()), None)
    try:
        vocab = json.loads(run.read_text()).get("teacher_vocab_size") if run is not None else None
    except (OSError, ValueError, AttributeError):
        return None
    return int(vocab) if isinstance(vocab, int) else None


def _training_cache_seq_len(model_dir: Path) -> tuple[int, str] | None:
    """The row length a train-student run dir (``model_dir`` or its parent) trained on: recorded in its
    ``run.json``, or (runs of earlier versions) read from the manifest of the cache it names, when that
    cache is a folder here; None otherwise."""
    from kdpipe.pipeline.cache.manifest import MANIFEST_NAME
    from kdpipe.pipeline.train.checkpoint import RUN_MANIFEST

    run = next((d / RUN_MANIFEST for d in (model_dir, model_dir.parent) if (d / RUN_MANIFEST).is_file()), None)
    if run is None:
        return None
    try:
        record = json.loads(run.read_text())
        cache = record.get("cache_path") or ""
        if record.get("seq_len"):  # recorded by the run itself (wherever its cache is now)
            return int(record["seq_len"]), f"the training run {run.parent} (its cache's rows)"
        manifest = Path(cache) / MANIFEST_NAME
        seq_len = json.loads(manifest.read_text())["schema"]["input_len"] if manifest.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (int(seq_len), f"the training cache {cache}") if seq_len else None
