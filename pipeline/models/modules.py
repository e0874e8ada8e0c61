"""Loading plain PyTorch modules given as ``package.module:factory`` (or ``path/to/file.py:factory``)
with weights from safetensors (or a ``.pt`` state dict read with ``weights_only=True``)."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import sys
from pathlib import Path

import torch

from kdpipe.pipeline.errors import ConfigError, TeacherError


def import_factory(spec: str):
    """The callable named by ``module:factory``; a module may be a dotted name or a ``.py`` path."""
    if ":" not in spec:
        raise ConfigError(
            f"module spec {spec!r} has no ':factory' part; write it as package.module:factory "
            "or path/to/file.py:factory"
        )
    module_name, _, factory_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise TeacherError(f"module file {module_name} does not exist; check the path")
            name = f"kdpipe_user_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except TeacherError:
        raise
    except Exception as exc:  # user code: any import failure is theirs to fix
        raise TeacherError(f"cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise TeacherError(f"{module_name!r} has no callable {factory_name!r}; check the spec {spec!r}")
    return factory


def build_module(spec: str) -> torch.nn.Module:
    factory = import_factory(spec)
    try:
        module = factory()
    except Exception as exc:
        raise TeacherError(f"factory {spec!r} failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(module, torch.nn.Module):
        raise TeacherError(f"factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def load_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file, or a ``.pt``/``.pth`` state dict without pickle code."""
    path = Path(weights)
    if not path.is_file():
        raise TeacherError(f"weights file {path} does not exist; check --weights")
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise TeacherError(f"weights {path} must be a .safetensors file (or a .pt state dict)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # weights_only: tensors and plain containers only, never arbitrary pickled objects
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TeacherError(
            f"weights {path} hold pickled Python objects besides tensors, which kdpipe refuses to load "
            "(torch.load weights_only=True); save model.state_dict() with safetensors or torch.save"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TeacherError(f"cannot read weights {path} ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise TeacherError(
            f"weights {path} hold a {type(state).__name__} that is not a state dict of tensors; "
            "save model.state_dict()"
        )
    return state


def load_module(spec: str, weights: str | Path | None) -> torch.nn.Module:
    """Build the module and load its weights strictly (every key must match)."""
    module = build_module(spec)
    if weights is not None:
        state = load_state_dict(weights)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise TeacherError(f"weights {weights} do not fit {spec!r}: {first}") from None
    return module


def is_module_spec(spec: str) -> bool:
    """``package.module:factory`` or ``file.py:factory`` (a path never has a ':' on POSIX here)."""
    return ":" in spec and not Path(spec).exists()
