"""Teachers: a Hugging Face model (local directory or hub id) or a plain PyTorch module.

A :class:`Teacher` turns a batch of model inputs into logits ``[B, P, V]`` (``P = L`` positions for
a causal LM, ``P = 1`` for a classifier) and describes itself for the manifest (fingerprint).
:meth:`Teacher.sparse_view` goes straight to the cache's sparse view of the target positions; for
an HF causal LM whose output head is a plain ``nn.Linear`` it runs the decoder only and computes the
head in vocabulary blocks (:func:`~kdpipe.pipeline.capture.topk.sparse_view_of_hidden`), so the
``[tokens, V]`` logits are never materialised.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import torch

from kdpipe.pipeline.capture.topk import SparseView, sparse_view_of_hidden, sparse_view_of_logits
from kdpipe.pipeline.errors import ConfigError, TeacherError
from kdpipe.pipeline.fileio import sha256_files
from kdpipe.pipeline.models.modules import load_module
from kdpipe.pipeline.models.tokenizers import tokenizer_fingerprint

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_UNCHECKED = "unchecked"


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
    # Set by sparse_view: whether its last call took the head-fused path (None: no call yet), and
    # why not when it did not (for the manifest).
    fused_head: bool | None = None
    fused_head_reason: str | None = None
    _head_problem: str | None = dataclasses.field(default=_UNCHECKED, repr=False)  # cached fused_head_problem
    _head_checked: bool = dataclasses.field(default=False, repr=False)  # the first call's logits check ran

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

    @torch.inference_mode()
    def sparse_view(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor | None, mask, *,
        top_k: int, temperatures: tuple[float, ...], fused: bool | None = None, check_finite: bool = True,
    ) -> SparseView:
        """The sparse view of the positions where ``mask [B, P]`` (bool, tensor or numpy) is True, in
        row-major order, on the teacher's output device: the same view (up to the order of ties and
        rounding) as ``sparse_view_of_logits(logits(inputs, attention_mask).reshape(-1, V)[mask])``.

        ``fused=None`` (default): the head-fused path when :meth:`fused_head_problem` finds nothing
        against it and a one-time check passes (on the first batch row with target positions, the
        model's own logits are its head applied to the decoder's last hidden state), else the logits path;
        ``False``: the logits path; ``True``: the head-fused path without the check (ConfigError when
        the teacher cannot). Afterwards :attr:`fused_head` says which path this call took and
        :attr:`fused_head_reason` why it was not the fused one. Raises ``FloatingPointError`` naming
        the first bad masked position, as ``sparse_view_of_logits`` does; ``check_finite=False``
        marks such positions with a NaN ``logsumexp`` instead, and then nothing here waits for the
        GPU after the (first call's) checks: the caller may copy the view back asynchronously.
        """
        mask = torch.as_tensor(mask, dtype=torch.bool)
        problem = "the logits path was asked for" if fused is False else self._cached_head_problem()
        if problem is not None and fused is True:
            raise ConfigError(f"the head-fused sparse view cannot be used with this teacher: {problem}")
        if problem is None:
            view, problem = self._fused_sparse_view(inputs, attention_mask, mask, top_k=top_k, temperatures=temperatures,
                                                    check=fused is None and not self._head_checked,
                                                    check_finite=check_finite)
            if problem is None:
                self.fused_head, self.fused_head_reason = True, None
                return view
            self._head_problem = problem  # the check failed: the logits path from now on
            self.fused_head, self.fused_head_reason = False, problem
            return view
        self.fused_head, self.fused_head_reason = False, problem
        logits = self._checked_logits(inputs, attention_mask, mask)
        return self._view_of_logits(logits, mask, top_k, temperatures, check_finite)

    def masked_logits(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None, mask) -> torch.Tensor:
        """The raw logits ``[n, V]`` of the positions where ``mask [B, P]`` is True, in row-major order
        (on the teacher's output device); the logits path, for callers that need more than the view."""
        mask = torch.as_tensor(mask, dtype=torch.bool)
        logits = self._checked_logits(inputs, attention_mask, mask)
        return _masked_rows(logits.reshape(-1, self.vocab_size), mask)

    def _view_of_logits(self, logits, mask, top_k, temperatures, check_finite) -> SparseView:
        logits = _masked_rows(logits.reshape(-1, self.vocab_size), mask)
        return sparse_view_of_logits(logits, top_k=top_k, temperatures=temperatures, check_finite=check_finite)

    def _checked_logits(self, inputs, attention_mask, mask) -> torch.Tensor:
        logits = self.logits(inputs, attention_mask)
        if logits.shape[1:] != (mask.shape[1], self.vocab_size):
            raise TeacherError(f"teacher output has shape {tuple(logits.shape)}, expected "
                               f"[batch, {mask.shape[1]}, {self.vocab_size}]")
        return logits

    def sparse_view_path(self) -> str:
        """How the sparse view was made (the manifest's ``capture.sparse_view``)."""
        fused, reason = self.fused_head, self.fused_head_reason
        if fused is None:  # this process ran no batch (a resumed or empty share): what it would have done
            reason = self.fused_head_problem() if self.model is not None else "no weights loaded"
            fused = reason is None
        if fused:
            return "head-fused: the lm-head in vocabulary blocks, logits never materialised"
        reason = f" ({reason})" if reason else ""
        return f"from the teacher's logits{reason}"

    def _cached_head_problem(self) -> str | None:
        if self._head_problem == _UNCHECKED:
            self._head_problem = self.fused_head_problem()
        return self._head_problem

    def fused_head_problem(self) -> str | None:
        """Why the head-fused path cannot be used with this teacher, or None when nothing is against it.

        It needs an HF causal LM whose logits are ``lm_head(last hidden state)`` with a plain
        ``nn.Linear`` head of ``vocab_size`` outputs, its weights loaded, no forward hooks on it, no
        quantisation, and nothing in the config that rescales or caps the logits (soft-capping, logit
        scales and multipliers, muP width scaling: see ``_unusual_head_config``).
        """
        if self.kind != "hf" or self.task != "causal-lm":
            return f"a {self.kind} {self.task} teacher"
        if self.model is None:
            return "no model loaded"
        if not all(hasattr(self.model, name) for name in ("get_output_embeddings", "get_decoder")):
            return f"{type(self.model).__name__} has no get_output_embeddings/get_decoder"
        if not type(self.model).__name__.endswith("ForCausalLM"):
            return f"{type(self.model).__name__} is not a *ForCausalLM model"
        head = self.model.get_output_embeddings()
        if type(head) is not torch.nn.Linear:  # exactly: a subclass may change the forward
            return f"the output head is {type(head).__name__}, not a plain torch.nn.Linear"
        if head.weight.device.type == "meta":
            return "the output head's weights are offloaded"
        if not head.weight.dtype.is_floating_point or head.out_features != self.vocab_size:
            return (f"the output head is {head.out_features} x {head.in_features} {head.weight.dtype} "
                    f"for a vocabulary of {self.vocab_size}")
        if getattr(self.model, "is_quantized", False) or getattr(self.model, "hf_quantizer", None) is not None:
            return "the model is quantised"
        if head._forward_hooks or head._forward_pre_hooks:
            return "the output head has forward hooks"
        return _unusual_head_config(self.model.config)

    def _fused_sparse_view(self, inputs, attention_mask, mask, *, top_k, temperatures, check,
                           check_finite) -> tuple[SparseView, str | None]:
        """``(view, None)`` from the head-fused path, or ``(view, problem)`` from the logits path when
        ``check`` finds the model's logits are not its head applied to the last hidden state."""
        head = self.model.get_output_embeddings()
        if check:
            problem = self._check_head(inputs, attention_mask, mask, head)
            if problem is not None:
                logits = self._checked_logits(inputs, attention_mask, mask)
                return self._view_of_logits(logits, mask, top_k, temperatures, check_finite), problem
        hidden = self._last_hidden(inputs, attention_mask, mask, head)
        view = sparse_view_of_hidden(hidden, head.weight, head.bias, top_k=top_k, temperatures=temperatures,
                                     check_finite=check_finite)
        return view, None

    def _last_hidden(self, inputs, attention_mask, mask, head) -> torch.Tensor:
        """The decoder's last hidden states of the target positions, ``[N, H]`` on the head's device."""
        out = self.model.get_decoder()(input_ids=inputs, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, L, H]
        if hidden.ndim != 3 or hidden.shape[:2] != mask.shape or hidden.shape[2] != head.in_features:
            raise TeacherError(f"teacher decoder output has shape {tuple(hidden.shape)}, expected "
                               f"[{mask.shape[0]}, {mask.shape[1]}, {head.in_features}]")
        return _masked_rows(hidden.to(head.weight.device).reshape(-1, hidden.shape[2]), mask)

    def _check_head(self, inputs, attention_mask, mask, head) -> str | None:
        """The one-time check, on the batch's first row with target positions (two one-row forwards,
        the model's and the decoder's, so that both see the same shapes): None when it passes or
        cannot decide yet (no target position, non-finite logits), else the problem."""
        rows = torch.nonzero(mask.reshape(mask.shape[0], -1).any(dim=1)).flatten()
        if len(rows) == 0:
            return None
        r = int(rows[0])
        one = slice(r, r + 1)
        attention = None if attention_mask is None else attention_mask[one]
        logits = self._checked_logits(inputs[one], attention, mask[one])
        hidden = self._last_hidden(inputs[one], attention, mask[one], head)
        decided, problem = _head_mismatch(_masked_rows(logits.reshape(-1, self.vocab_size), mask[one]), hidden, head)
        self._head_checked = decided
        return problem


def _masked_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``x [B*P, ...]`` where ``mask [B, P]`` is True, in order. The index is made on
    the mask's device (the host) and sent over without waiting; no copy when every row is wanted."""
    flat = mask.reshape(-1)
    if bool(flat.all()):
        return x
    index = flat.nonzero().squeeze(1).to(x.device, non_blocking=True)
    return x.index_select(0, index)


def _head_mismatch(logits: torch.Tensor, hidden: torch.Tensor, head: torch.nn.Linear,
                   positions: int = 64) -> tuple[bool, str | None]:
    """``(decided, problem)``: whether the model's logits ``[N, V]`` of the first ``positions``
    positions are ``head(hidden)`` to within two units in the last place of the head's dtype (relative
    to the position's largest logit): a logit scale, multiplier or soft-cap in the model's forward
    shows as a larger difference. Undecided on non-finite logits (the sparse view reports them)."""
    expected = logits[:positions].float()
    if not bool(torch.isfinite(expected).all()):
        return False, None
    got = torch.nn.functional.linear(hidden[:positions], head.weight, head.bias).float().to(expected.device)
    eps = torch.finfo(head.weight.dtype).eps
    scale = expected.abs().amax(dim=1, keepdim=True)
    diff = (got - expected).abs()
    if bool((diff <= 2 * eps * (expected.abs() + scale) + 1e-6).all()):
        return True, None
    return True, (f"the model's logits are not its output head applied to the decoder's last hidden state "
                  f"(difference up to {float(diff.max()):.3g}: a logit scale or soft-cap in the forward?)")


# Config entries that rescale, cap or otherwise change the logits after the last hidden state (or
# the hidden state before the head): Gemma 2/3 final_logit_softcapping, Cohere logit_scale, Granite
# logits_scaling, Grok output_multiplier_scale, Falcon-H1 lm_head_multiplier, MiniCPM scale_width /
# dim_model_base, muP width multipliers. Matched generously by name (nested configs too); only a
# neutral value (None, False, empty, 1) passes.
_HEAD_CONFIG_WORDS = re.compile(r"logit|softcap|lm_head|output_mult|multiplier|scale_width|dim_model_base|mup")


def _unusual_head_config(config) -> str | None:
    def walk(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for key, value in walk(config.to_dict()):
        if _HEAD_CONFIG_WORDS.search(key.lower()) and not _is_neutral(value):
            return f"the config sets {key} = {value!r}, which may change the logits after the head"
    return None


def _is_neutral(value) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_neutral(v) for v in value)
    if isinstance(value, str):
        return value.strip().lower() in ("", "none")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 1
    return False


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

    from kdpipe.pipeline.models.hub import MISSING, ask_hub

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
