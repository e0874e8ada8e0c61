"""LoRA students through ``peft``: only low-rank adapters of a pretrained student train.

``train-student --lora-r R [--lora-alpha A] [--lora-targets NAMES]`` wraps a pretrained Hugging Face
causal LM (``--student DIR`` holding weights) with peft's LoRA: each targeted layer ``W`` (frozen)
computes ``W x + (alpha / r) B A x`` with ``A [r, in]`` (random) and ``B [out, r]`` (zeros), so the run
starts from the pretrained model exactly and only ``A`` and ``B`` get gradients and optimizer state.

- :func:`apply_lora` refuses what LoRA cannot serve (module students, random-init students built from
  a config, classification), target names that match no layer of the student (naming the layers
  there are) and an adapter of a tied lm-head/input embedding (it could not merge); it records the settings, the layers adapted and the trainable parameter count (run.json
  ``lora``) with the sha256 of the base weights, which a resume checks (:func:`check_lora_base`):
  checkpoints hold the adapter alone (:func:`adapter_tensors`), the base is read from ``--student``.
- At the end of a run (under FSDP from :func:`unsharded_lora_copy` of the gathered weights)
  ``adapter/`` holds peft's adapter (:func:`save_adapter`: ``adapter_config.json``
  + ``adapter_model.safetensors``, loads with ``PeftModel.from_pretrained``) and ``model/`` the merged
  model (:func:`merge_adapter`, peft's ``merge_and_unload``), a plain model for ``from_pretrained``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kdpipe.pipeline.errors import ConfigError, IntegrityError
from kdpipe.pipeline.fileio import sha256_files

if TYPE_CHECKING:
    from kdpipe.pipeline.models.students import Student

ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output layer
DEFAULT_TARGETS = [ALL_LINEAR]
ADAPTER_DIR = "adapter"  # next to model/ in a run directory
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def default_alpha(r: int) -> float:
    """``--lora-alpha`` when not given: 2 r, so that the update is 2 B A (the common choice)."""
    return 2.0 * r


def apply_lora(student: Student, *, r: int, alpha: float, targets: list[str], task: str) -> None:
    """Replace ``student.model`` by a peft model with LoRA adapters of rank ``r`` on ``targets``
    (module names, or ``all-linear``) and set ``student.lora`` (what run.json records)."""
    from peft import LoraConfig, get_peft_model

    _check_student(student, task=task)
    _check_targets(student.model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    head = student.model.get_output_embeddings()
    tied = _tied_names(student.model)
    try:
        model = get_peft_model(student.model, config)
    except ValueError as exc:  # e.g. a target that is a norm or a container, not a layer LoRA adapts
        raise ConfigError(f"--lora-targets {','.join(targets)}: {_first_sentence(exc)}; "
                          f"{_available(student.model)}") from None
    adapted = sorted(name for name, module in model.get_base_model().named_modules() if hasattr(module, "lora_A")
                     and module.lora_A)
    if tied & set(adapted):  # merging W + (alpha/r) B A into one of them would change the other too
        raise ConfigError(f"--lora-targets {','.join(targets)}: this student's {' and '.join(sorted(tied))} share "
                          f"one weight (tie_word_embeddings), so an adapter of one cannot merge; leave "
                          f"{' and '.join(n.rsplit('.', 1)[-1] for n in sorted(tied))} out of --lora-targets")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    student.model = model
    student.lora = {
        "r": r, "alpha": alpha, "scaling": alpha / r, "targets": list(targets), "adapted_modules": adapted,
        "head_adapted": model.get_output_embeddings() is not head,  # the lm-head is a LoRA layer now
        "trainable_parameters": trainable, "total_parameters": sum(p.numel() for p in model.parameters()),
        "base_weights_sha256": base_weights_sha256(Path(student.spec)), "adapter_dir": ADAPTER_DIR,
    }


def _check_student(student: Student, *, task: str) -> None:
    if student.kind != "hf":
        raise ConfigError(f"--lora-r needs a pretrained Hugging Face student (a model directory with weights); "
                          f"{student.spec} is a module student: drop --lora-r to train all its weights")
    if not student.pretrained:
        raise ConfigError(f"--lora-r needs a pretrained student, but --student {student.spec} holds no weights "
                          "(a config: random init, where a low-rank update of noise learns little); pass a model "
                          "directory with weights, or drop --lora-r to train every weight")
    if task != "causal-lm":
        raise ConfigError(f"--lora-r trains causal-LM students only; this cache's task is {task}: drop --lora-r")


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every target names a layer of ``model`` as peft matches it (the full name, or its last parts)."""
    if targets == [ALL_LINEAR]:
        return
    if ALL_LINEAR in targets:
        raise ConfigError(f"--lora-targets {','.join(targets)}: {ALL_LINEAR} stands alone; "
                          f"give it, or module names, not both")
    names = [name for name, _ in model.named_modules() if name]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise ConfigError(f"--lora-targets {target} matches no module of the student; {_available(model)}")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """The module names of the input embeddings and the lm-head when they share their weight, else none."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is None or head is None or embeddings.weight is not head.weight:
        return set()
    return {name for name, module in model.named_modules() if module is embeddings or module is head}


def _available(model: torch.nn.Module) -> str:
    """The names LoRA can target in ``model``: its linear and embedding layers, by last name part."""
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    leaves = dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                           if isinstance(module, kinds) or type(module).__name__ == "Conv1D")
    return f"its layers LoRA can adapt: {', '.join(leaves)} (or {ALL_LINEAR}: every linear layer but the lm-head)"


def _first_sentence(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0]
    return text.split(". ")[0].rstrip(".")


def base_weights_sha256(model_dir: Path) -> str:
    """One sha256 over the weight files of a pretrained model directory."""
    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})
    return sha256_files(files, root=model_dir)


def check_lora_base(recorded: dict | None, current: dict | None, *, out: Path, student: str) -> None:
    """A resume's base weights (``current``) must be those the run's adapter trained on (``recorded``)."""
    if recorded and current and recorded.get("base_weights_sha256") != current["base_weights_sha256"]:
        raise IntegrityError(f"--resume refused: the weights in --student {student} differ from those the LoRA "
                             f"adapter of {out} was trained on (run.json lora.base_weights_sha256); restore them, "
                             "or start a new run")


# ------------------------------------------------------------------ checkpoints and the final outputs
def is_lora_model(model: torch.nn.Module) -> bool:
    if "peft" not in sys.modules:  # nothing made a peft model: no need to import it (slow) to know
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) tensors of a LoRA model by parameter name: what its checkpoint holds."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load :func:`adapter_tensors` back; the names must be exactly the model's trainable ones."""
    expected = set(adapter_tensors(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise IntegrityError(f"the checkpoint's adapter does not fit the student's LoRA layers "
                             f"(missing {missing[:3]}, unexpected {extra[:3]}); start a new run")
    model.load_state_dict(tensors, strict=False)


def unsharded_lora_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain copy of the LoRA model ``model`` (whose layers FSDP sharded) holding ``state`` (its whole
    ``state_dict``, gathered), for :func:`save_adapter` and :func:`merge_adapter`; built on the meta
    device, so the only weights in memory are ``state``'s."""
    from peft import get_peft_model

    base = model.get_base_model()
    with torch.device("meta"):
        copy = get_peft_model(type(base)(base.config), model.peft_config["default"])
    copy.load_state_dict(state, assign=True)
    copy.get_base_model().tie_weights()
    if getattr(base, "generation_config", None) is not None:
        copy.get_base_model().generation_config = base.generation_config
    return copy


def save_adapter(model: torch.nn.Module, folder: Path) -> None:
    """peft's adapter files (``adapter_config.json``, ``adapter_model.safetensors``) into ``folder``."""
    # the base embeddings and lm-head are the student's, unchanged: not copied even when adapted
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card template: nothing of this run


def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """The base model with each adapted weight ``W + (alpha / r) B A`` (peft's ``merge_and_unload``,
    in place: the LoRA layers are gone afterwards)."""
    return model.merge_and_unload()
