"""Training settings: one dataclass, filled from defaults, then a TOML file, then command-line flags.

Every field is also a flag of ``kdpipe train-student`` (``weight_decay`` is ``--weight-decay``) except
``storage_options``, whose flag takes JSON. Unknown keys and wrong types are errors. Keys may be
written with ``-`` or ``_``. A resumed run (``--resume``) starts from the settings its ``run.json``
recorded instead of the defaults (:func:`merge_config`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import tomllib

from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.models.lora import DEFAULT_TARGETS, default_alpha
from kdpipe.pipeline.train.losses import KINDS
from kdpipe.pipeline.train.reporting import parse_report_to
from kdpipe.pipeline.train.xtok.losses import CROSS_TOKENIZER_LOSSES
from kdpipe.pipeline.train.sharding import SHARDINGS


@dataclasses.dataclass
class TrainConfig:
    cache: str = ""
    student: str = ""
    out: str = ""
    loss: str = "forward-kl"
    alpha: float = 0.5
    temperature: float = 1.0
    schedule: str | None = None  # e.g. "0:T=4,alpha=0.9;600:T=1,alpha=0.5"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 0
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    data: str | None = None  # the capture's .npz for module caches
    tokenizer: str | None = None
    eval_cache: str | None = None  # a cache of held-out data (default: a fraction of --cache)
    eval_data: str | None = None  # the .npz that --eval-cache was captured from (module caches)
    eval_fraction: float = 0.05
    eval_every: int = 100
    eval_rows: int = 256
    checkpoint_every: int = 100
    shuffle_buffer: int = 1024
    num_workers: int = 0
    fused_loss: bool = True  # the lm-head and the loss in one chunked pass where the student allows it
    cross_tokenizer_loss: str = "prefix-groups"  # a student with another tokenizer (pipeline/train/xtok; docs/cross-tokenizer.md)
    sharding: str = "ddp"  # under torchrun: a whole student per rank (ddp) or a shard of it (fsdp)
    cpu_offload: bool = False  # fsdp: parameter, gradient and optimizer shards in CPU memory
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    lora_r: int | None = None  # LoRA adapters of this rank train instead of every weight (pretrained students)
    lora_alpha: float | None = None  # the update is (lora_alpha / lora_r) B A; None: 2 * lora_r
    lora_targets: list[str] = dataclasses.field(default_factory=list)  # module names; empty: all-linear
    log_every: int = 10
    report_to: list[str] = dataclasses.field(default_factory=list)  # trackers besides metrics.jsonl
    # Reading a cache from an object store (s3://, gs://, az://); none of these change what is computed.
    storage_options: dict | None = None  # fsspec options (a TOML table); never recorded: may hold keys
    local_cache: str | None = None  # folder of downloaded shards, shared by the processes of a machine
    local_cache_gb: float | None = None  # its size limit (least recently used shards go); None = no limit
    read_ahead: int | None = None  # shards downloaded ahead of the reader (default: the cache's)

    def validate(self) -> None:
        for name in ("cache", "student", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required (or set {name} in the config file)")
        if self.loss not in KINDS:
            raise ConfigError(f"unknown --loss {self.loss!r}; use one of {', '.join(KINDS)}")
        if self.cross_tokenizer_loss not in CROSS_TOKENIZER_LOSSES:
            raise ConfigError(f"unknown --cross-tokenizer-loss {self.cross_tokenizer_loss!r}; use one of {', '.join(CROSS_TOKENIZER_LOSSES)}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"--alpha {self.alpha} must be between 0 and 1")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature {self.temperature} must be > 0")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("give exactly one of --steps or --epochs")
        if (self.steps is not None and self.steps <= 0) or (self.epochs is not None and self.epochs <= 0):
            raise ConfigError("--steps/--epochs must be positive")
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("--batch-size and --grad-accum must be positive")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction {self.eval_fraction} must be in [0, 1)")
        self._validate_optimizer()
        self._validate_counts()
        self._validate_lora()
        self._validate_sharding()
        parse_report_to(self.report_to)
        if self.read_ahead is not None and self.read_ahead < 0:
            raise ConfigError(f"--read-ahead {self.read_ahead} must be 0 (no read-ahead) or more")
        if self.local_cache_gb is not None and (self.local_cache is None or not self.local_cache_gb > 0):
            raise ConfigError("--local-cache-gb needs --local-cache DIR and must be positive")

    def _validate_optimizer(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay {self.weight_decay} must be >= 0")
        if self.clip < 0:
            raise ConfigError(f"--clip {self.clip} must be >= 0 (0 turns gradient clipping off)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio {self.min_lr_ratio} must be in [0, 1]")
        if self.warmup < 0:
            raise ConfigError(f"--warmup {self.warmup} must be >= 0")

    def _validate_counts(self) -> None:
        if self.log_every < 1:
            raise ConfigError(f"--log-every {self.log_every} must be >= 1")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"--shuffle-buffer {self.shuffle_buffer} must be >= 1 (1 keeps the shards' row order)")
        for name in ("eval_rows", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 0 (0 turns it off)")

    def _validate_sharding(self) -> None:
        if self.sharding not in SHARDINGS:
            raise ConfigError(f"unknown --sharding {self.sharding!r}; use one of {', '.join(SHARDINGS)}")
        if self.cpu_offload and self.sharding != "fsdp":
            raise ConfigError("--cpu-offload moves FSDP's shards to CPU memory; add --sharding fsdp (under torchrun)")

    def _validate_lora(self) -> None:
        """Fills in the LoRA defaults (alpha 2r, all-linear) so that run.json records what ran."""
        self.lora_targets = [t.strip() for item in self.lora_targets for t in item.split(",") if t.strip()]
        if self.lora_r is None:
            if self.lora_alpha is not None or self.lora_targets:
                raise ConfigError("--lora-alpha and --lora-targets need --lora-r (the adapters' rank)")
            return
        if self.lora_r < 1:
            raise ConfigError(f"--lora-r {self.lora_r} must be >= 1")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha {self.lora_alpha} must be > 0")
        self.lora_alpha = default_alpha(self.lora_r) if self.lora_alpha is None else self.lora_alpha
        self.lora_targets = self.lora_targets or list(DEFAULT_TARGETS)

    def storage(self) -> dict:
        """How to read the caches: keyword arguments of :class:`~kdpipe.pipeline.cache.reader.TeacherCache`."""
        return {"storage_options": self.storage_options, "local_cache": self.local_cache,
                "local_cache_gb": self.local_cache_gb, "read_ahead": self.read_ahead}

    def recorded(self) -> dict:
        """The settings as a run manifest records them: no storage options, URLs without user info."""
        from kdpipe.pipeline.provenance import redact_url

        values = dataclasses.asdict(self)
        values.pop("storage_options")
        for key in ("cache", "eval_cache"):
            if values[key]:
                values[key] = redact_url(values[key])
        return values


def _check_type(key: str, value, annotation):
    if typing.get_origin(annotation) is list:  # report_to: "tensorboard,wandb" or ["tensorboard", "wandb"]
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return [value] if isinstance(value, str) else value
        raise ConfigError(f"config key {key!r} must be a string or a list of strings, got {value!r}")
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind in (int, str, bool, dict) and type(value) is kind:
            return value
    names = " or ".join("a table" if k is dict else k.__name__ for k in allowed if k is not type(None))
    shown = "a value" if key.replace("-", "_") == "storage_options" else repr(value)  # may hold keys
    raise ConfigError(f"config key {key!r} must be {names}, got {shown}")


def merge_config(file: str | None, overrides: dict, *, resume: bool = False) -> TrainConfig:
    """Defaults <- (with ``resume``) the run's recorded settings <- TOML file <- flags.

    ``overrides``: the flags given (None = not given). With ``resume``, ``out`` (a flag or a key of the
    file) names the run directory whose ``run.json`` supplies every setting not given; a ``steps`` or
    ``epochs`` given replaces the recorded length (whether the run may take it is checked when it
    resumes: :func:`kdpipe.pipeline.train.checkpoint.check_resumable`).
    """
    given = {**_read_file(file), **{k: v for k, v in overrides.items() if v is not None}}
    values = {**(_recorded(given) if resume else {}), **given}
    values["report_to"] = parse_report_to(values.get("report_to", []))
    config = TrainConfig(**values)
    config.validate()
    return config


def _read_file(file: str | None) -> dict:
    """The settings of a TOML file (its ``[train]`` table, or the whole file), type-checked."""
    if not file:
        return {}
    try:
        raw = tomllib.loads(Path(file).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    hints = typing.get_type_hints(TrainConfig)
    values = {}
    for key, value in raw.get("train", raw).items():
        name = key.replace("-", "_")
        if name not in hints:
            raise ConfigError(f"unknown config key {key!r} in {file}; valid keys: {', '.join(sorted(hints))}")
        values[name] = _check_type(key, value, hints[name])
    return values


def _recorded(given: dict) -> dict:
    """The settings recorded by the run in ``given["out"]``, less the length when one is given."""
    from kdpipe.pipeline.train.checkpoint import recorded_settings

    if not given.get("out"):
        raise ConfigError("--resume needs --out RUN_DIR, the run directory to continue")
    hints = typing.get_type_hints(TrainConfig)
    recorded = {k: _check_type(k, v, hints[k]) for k, v in recorded_settings(Path(given["out"])).items() if k in hints}
    if "steps" in given or "epochs" in given:  # steps and epochs exclude each other
        recorded.pop("steps", None)
        recorded.pop("epochs", None)
    return recorded
