"""How much a cache's sparse view loses, measured against the dense teacher (issue 11).

:func:`fidelity_report` runs the teacher again on the cache's first rows and compares, at every
captured temperature ``T`` and over the positions the cache counts (``mask``):

- ``kl_bins``: ``KL(dense || reconstructed)`` (:func:`kl_per_position`) in nats per position on the
  cache's (k+1)-bin view (top-k + tail bucket, docs/THEORY.md section 3). "Dense" is the recomputed teacher's ``p_T`` gathered on the
  cache's top-k ids plus the rest of its mass as the tail bin; "reconstructed" is what the trainer
  reads from the cache (:func:`~kdpipe.pipeline.train.targets.teacher_targets`: the decoded values,
  renormalised over the k+1 bins when they are quantized). It measures what the value encoding
  loses; None for a sampled-only cache (k = 0: no bins).
- ``mass_covered``: the dense ``p_T`` mass on the ids the cache holds (top-k and drawn ids), averaged
  over positions; ``tail_mass`` is the cache's own stored tail mass, averaged alike (for a top-k cache
  ``mass_covered = 1 - tail_mass`` up to rounding).
- ``grad_cosine``: the cosine between the gradients, with respect to a random student's logits, of
  the dense forward KL at ``T`` and of the loss the trainer uses for this cache at ``T`` (forward-kl:
  ``sampled_kd_loss`` when the cache has draws, else ``sparse_kd_loss``), over all counted positions
  and vocabulary entries flattened into one vector. The student is :data:`STUDENT`.

Spaces: ``teacher_logits`` and ``student_logits`` are raw logits ``[n, V]`` of the ``n`` counted
positions (row-major over the probe's rows), ``V`` the teacher's output size; ``*_logprobs`` are
``log p_T`` (natural log) at one temperature.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from kdpipe.pipeline import data as datalib
from kdpipe.pipeline.cache.reader import TeacherCache
from kdpipe.pipeline.cache.sampling import describe_draws
from kdpipe.pipeline.capture.teachers import Teacher, load_hf_teacher, load_module_teacher
from kdpipe.pipeline.errors import CacheFormatError, ConfigError, DataError
from kdpipe.pipeline.models.devices import resolve_device, resolve_dtype
from kdpipe.pipeline.models.modules import is_module_spec
from kdpipe.pipeline.train.losses import dense_kd_loss
from kdpipe.pipeline.train.objective import distillation_objective, targets_for
from kdpipe.pipeline.train.targets import TeacherTargets

STUDENT = "random logits ~ N(0, 1), independent per position and vocabulary entry (a CPU torch.Generator)"
TEACHER_ROWS_BUDGET = 2**27  # rows per teacher forward: at most this many logits (rows x P x V), at least one row
CHUNK_BUDGET = 2**23  # positions per loss computation: at most this many logits (positions x V)
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- the teacher
def load_cache_teacher(cache: TeacherCache, *, teacher: str | None = None, weights: str | None = None,
                       device: str = "auto", trust_remote_code: bool = False) -> Teacher:
    """The teacher ``cache`` was made with, loaded on ``device`` in the capture's dtype.

    teacher: a model directory, hub id or ``file.py:factory``; None: the one the manifest records
    (``capture.teacher``), if it is there. weights: a module teacher's weights (the manifest records
    only their sha256). Raises :class:`ConfigError` when the teacher cannot be found or its
    fingerprint differs from the manifest's.
    """
    manifest = cache.manifest
    recorded = manifest["capture"]["teacher"]
    name = teacher or recorded
    if teacher is None and not _reachable(recorded):
        raise ConfigError(f"the cache's teacher {recorded} is not found here; pass --teacher (the model the cache "
                          "was made with)")
    run_on = resolve_device(device)
    dtype = resolve_dtype(manifest["teacher"].get("dtype", "float32"), run_on)
    if is_module_spec(name) and weights is None:
        raise ConfigError(f"module teacher {name} needs its weights (the manifest keeps only their sha256): "
                          "pass --weights FILE.safetensors")

    def load(load_weights: bool) -> Teacher:
        if is_module_spec(name):
            return load_module_teacher(name, weights=weights, device=run_on, dtype=dtype, load_weights=load_weights,
                                       num_classes=int(manifest["capture"]["teacher_vocab_size"]))
        return load_hf_teacher(name, device=run_on, dtype=dtype, trust_remote_code=trust_remote_code,
                               task=cache.schema.task, load_weights=load_weights)

    check_teacher(cache, load(load_weights=False), name)  # the fingerprint hashes the files: no weights loaded yet
    return load(load_weights=True)


def _reachable(spec: str) -> bool:
    """A recorded teacher that is here: a path, or the file of a ``file.py:factory`` spec."""
    if Path(spec).exists():
        return True
    module = spec.rpartition(":")[0]
    return bool(module) and (not module.endswith(".py") or Path(module).is_file())


def teacher_identity(fingerprint: dict) -> dict:
    """What must match between two teachers' fingerprints: their weights and architecture, not where
    they were loaded from, nor the dtype they ran in, nor the transformers version that wrote the config."""
    config = {k: v for k, v in (fingerprint.get("config") or {}).items()
              if k not in ("transformers_version", "_name_or_path")}
    return {"kind": fingerprint.get("kind"), "class": fingerprint.get("class"), "config": config,
            "weights_sha256": fingerprint.get("weights_sha256")}


def check_teacher(cache: TeacherCache, teacher: Teacher, name: str) -> None:
    """Refuse a teacher other than the one ``cache`` was made with (one line, naming the fix)."""
    recorded = teacher_identity(cache.manifest["teacher"])
    given = teacher_identity(teacher.fingerprint)
    differs = [key for key in recorded if recorded[key] != given[key]]
    if differs:
        raise ConfigError(f"teacher {name} is not the teacher cache {cache.root} was made with (its {differs[0]} "
                          f"differs); pass --teacher {cache.manifest['capture']['teacher']} (with its --weights for a "
                          "module teacher)")
    if teacher.vocab_size != cache.manifest["capture"]["teacher_vocab_size"]:
        raise ConfigError(f"teacher {name} has {teacher.vocab_size} outputs but the cache was made with "
                          f"{cache.manifest['capture']['teacher_vocab_size']}; pass the cache's teacher")


# ----------------------------------------------------------------------------- the probe
def read_probe(cache: TeacherCache, rows: int) -> dict[str, np.ndarray]:
    """The cache's first ``rows`` rows in the logical fields of :mod:`~kdpipe.pipeline.cache.schema`,
    stacked with a leading row axis (shards read in order, each released once read)."""
    n = min(rows, len(cache))
    if n == 0:
        raise CacheFormatError(f"cache {cache.root} holds no rows; re-run cache-teacher")
    cache.schedule(list(range(cache.locate(n - 1)[0] + 1)))  # a remote cache downloads them ahead
    parts, left = [], n
    for shard, entry in enumerate(cache.shards):
        if left == 0:
            break
        take = min(left, entry["rows"])
        if take:
            parts.append(cache.read_rows(shard, 0, take))
        cache.release(shard)
        left -= take
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def model_inputs(cache: TeacherCache, probe: dict, inputs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher's input ``[B, ...]`` for each probe row and its attention mask ``[B, L]`` (or None),
    checked against the rows' ``input_hash``.

    Text caches hold their ``input_ids``: a text cache's mask marks its real tokens, which are what the
    capture attended to; a chat cache's rows are padded on the right, which no counted position of a
    causal model attends to (no mask needed). Array caches (module teachers) hold no input: it is
    ``inputs[sample_index]``, ``inputs`` being the capture's ``.npz`` ``x``.
    """
    schema = cache.schema
    if schema.input_len is not None:
        if schema.task != "causal-lm":
            raise ConfigError("--fidelity is not available for text-classification caches: they keep no attention "
                              "mask of their padded rows to run the teacher on")
        x = probe["input_ids"]
        attention = probe["mask"].astype(np.int64) if schema.mask_meaning == "real-token" else None
    else:
        if inputs is None:
            raise ConfigError(f"cache {cache.root} holds no inputs (module teacher): pass the capture's data, "
                              f"--data {cache.manifest['capture']['data']}")
        index = probe["sample_index"]
        if int(index.max()) >= len(inputs):
            raise DataError(f"cache row {int(np.argmax(index))} is sample {int(index.max())}, beyond the {len(inputs)} "
                            f"samples of --data; pass the data the cache was made from ({cache.manifest['capture']['data']})")
        x, attention = inputs[index], None
    for row, (one, key) in enumerate(zip(x, probe["input_hash"])):
        if datalib.input_hash(one) != int(key):
            raise DataError(f"cache row {row}: its input does not hash to the row's input_hash; pass the data the "
                            f"cache was made from ({cache.manifest['capture']['data']})")
    return x, attention


# ----------------------------------------------------------------------------- per temperature
class _Sums:
    """Sums over counted positions at one temperature (see :meth:`result`)."""

    def __init__(self):
        self.positions = 0
        self.kl = self.covered = self.tail = 0.0
        self.dot = self.dense_sq = self.cache_sq = 0.0  # gradient dot product and squared norms

    def result(self, *, has_bins: bool) -> dict:
        n = max(self.positions, 1)
        norms = math.sqrt(self.dense_sq * self.cache_sq)
        return {"kl_bins": self.kl / n if has_bins else None, "mass_covered": self.covered / n,
                "tail_mass": self.tail / n, "grad_cosine": self.dot / norms if norms > 0 else None}


def dense_bin_logprobs(teacher_logprobs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The dense teacher on the (k+1)-bin view: ``[n, V]`` log p_T, ``[n, k]`` ids -> ``[n, k+1]``
    (the top-k ids' log p_T, then the log of all the rest; ``-inf`` when nothing is left)."""
    rest = teacher_logprobs.scatter(1, topk_ids, _NEG_INF)
    return torch.cat([teacher_logprobs.gather(1, topk_ids), torch.logsumexp(rest, dim=1, keepdim=True)], dim=1)


def kl_per_position(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum p log(p / q) - sum p + sum q`` over the last dim, ``[n, B]`` -> ``[n]``, with ``0 log 0 = 0``.

    The KL divergence of positive measures: it is the KL itself when ``p`` and ``q`` both sum to 1, and
    stays ``>= 0`` (0 only at ``q = p``) when the reconstruction ``q`` does not quite sum to 1 (float
    values are not renormalised; see :func:`~kdpipe.pipeline.train.targets.teacher_targets`), where the
    plain ``sum p log(p / q)`` could be negative.
    """
    p, q = log_p.exp(), log_q.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1) - p.sum(-1) + q.sum(-1)


def covered_mass(teacher_logprobs: torch.Tensor, targets: TeacherTargets) -> torch.Tensor:
    """``[n]``: the teacher's mass on the ids the cache holds (top-k and drawn ids, not padding slots)."""
    holds = torch.zeros_like(teacher_logprobs, dtype=torch.int32)  # [n, V]: how often the cache names each id
    holds.scatter_add_(1, targets.topk_ids, torch.ones_like(targets.topk_ids, dtype=torch.int32))
    if targets.sample_ids is not None:
        drawn = (targets.sample_logprobs > _NEG_INF).int()  # padding slots hold id 0 and log p = -inf
        holds.scatter_add_(1, targets.sample_ids, drawn)
    return torch.where(holds > 0, teacher_logprobs.exp(), 0.0).sum(-1)


def cache_loss(student_logits: torch.Tensor, targets: TeacherTargets, temperature: float) -> torch.Tensor:
    """The trainer's forward-kl on this cache's targets (``[n]`` flat, all counted): the unbiased
    estimator when the targets carry draws, else the top-k + tail bins. Scalar, ``T**2 * mean``."""
    return distillation_objective(targets, alpha=1.0, temperature=temperature, student_logits=student_logits)["loss"]


def _logit_gradient(loss_of, student_logits: torch.Tensor) -> torch.Tensor:
    """Gradient ``[n, V]`` of ``n * loss_of(logits)`` (the sum over positions of a mean loss)."""
    logits = student_logits.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(logits) * logits.shape[0], logits)
    return grad


def add_chunk(sums: _Sums, teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: TeacherTargets,
              temperature: float) -> None:
    """Add ``n`` counted positions at one temperature: raw logits ``[n, V]``, their flat targets."""
    teacher_logprobs = torch.log_softmax(teacher_logits / temperature, dim=-1)  # [n, V]
    sums.positions += teacher_logits.shape[0]
    sums.covered += float(covered_mass(teacher_logprobs, targets).sum())
    sums.tail += float(targets.tail_logprob.exp().sum())
    if targets.topk_ids.shape[1]:
        cached = torch.cat([targets.topk_logprobs, targets.tail_logprob[:, None]], dim=1)  # [n, k+1]
        dense_bins = dense_bin_logprobs(teacher_logprobs, targets.topk_ids)  # [n, k+1]
        sums.kl += float(kl_per_position(dense_bins.double(), cached.double()).sum())
    dense = _logit_gradient(lambda s: dense_kd_loss(s, teacher_logits, temperature=temperature), student_logits)
    sparse = _logit_gradient(lambda s: cache_loss(s, targets, temperature), student_logits)
    sums.dot += float((dense.double() * sparse.double()).sum())
    sums.dense_sq += float(dense.double().square().sum())
    sums.cache_sq += float(sparse.double().square().sum())


# ----------------------------------------------------------------------------- the report
def _targets(cache: TeacherCache, batch: dict, temperature: float) -> TeacherTargets:
    """The trainer's targets (see ``Trainer.targets``) of a batch, at the counted positions only."""
    targets = targets_for(cache.schema, batch, temperature=temperature, kind="forward-kl")
    return _select(targets, targets.kd_mask)


def _tensors(probe: dict, rows: slice, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v[rows])).to(device) for k, v in probe.items()}


def encoding_summary(cache: TeacherCache) -> dict:
    """How the cache stores its rows: format version, ids, values, top-k, draws."""
    schema = cache.schema
    return {"format_version": cache.manifest["format_version"], "id_bits": schema.id_bits,
            "id_dtype": None if schema.packed else schema.id_dtype, "values": schema.value_dtype,
            "top_k": schema.top_k, "temperatures": list(schema.temperatures), "sample_draws": schema.sample_draws,
            "sample_temperature": schema.sample_temperature, "sample_scheme": schema.sample_scheme}


def fidelity_report(cache: TeacherCache, teacher: Teacher, *, rows: int = 64, seed: int = 0, device="cpu",
                    inputs: np.ndarray | None = None) -> dict:
    """Fidelity of ``cache`` against ``teacher`` (the one it was made with, see :func:`check_teacher`) on
    its first ``rows`` rows; see the module doc for what is measured.

    inputs: the capture's array inputs ``x [N, ...]`` for a cache without input ids (module teacher).
    seed: seeds the random student (:data:`STUDENT`). device: where the losses run (the teacher runs
    on its own device). Returns a JSON-ready dict; ``by_temperature`` maps ``f"{T:g}"`` to ``kl_bins``,
    ``mass_covered``, ``tail_mass`` and ``grad_cosine``.
    """
    if rows < 1:
        raise ConfigError(f"--rows {rows} must be at least 1")
    device = torch.device(device)
    schema = cache.schema
    probe = read_probe(cache, rows)
    x, attention = model_inputs(cache, probe, inputs)
    n_rows, vocab = len(x), teacher.vocab_size
    per_forward = max(1, TEACHER_ROWS_BUDGET // (schema.positions * vocab))
    per_chunk = max(1, CHUNK_BUDGET // vocab)
    generator = torch.Generator().manual_seed(seed)
    sums = {t: _Sums() for t in schema.temperatures}
    for start in range(0, n_rows, per_forward):
        span = slice(start, min(start + per_forward, n_rows))
        batch = _tensors(probe, span, device)
        teacher_input = torch.from_numpy(np.ascontiguousarray(x[span])).to(teacher.device)
        if teacher.kind == "module":
            teacher_input = teacher_input.to(next(teacher.model.parameters()).dtype)
        attention_mask = None if attention is None else torch.from_numpy(attention[span]).to(teacher.device)
        with torch.inference_mode():
            logits = teacher.masked_logits(teacher_input, attention_mask, probe["mask"][span])
        teacher_logits = logits.to(device=device, dtype=torch.float32).clone()  # [n, V], out of inference mode
        targets = {t: _targets(cache, batch, t) for t in schema.temperatures}
        for first in range(0, teacher_logits.shape[0], per_chunk):
            part = slice(first, first + per_chunk)
            student_logits = torch.randn(teacher_logits[part].shape, generator=generator).to(device)
            for t in schema.temperatures:
                add_chunk(sums[t], teacher_logits[part], student_logits, _select(targets[t], part), t)
    counted = next(iter(sums.values())).positions
    return {
        "path": str(cache.root),
        "teacher": teacher.fingerprint.get("path") or teacher.fingerprint.get("factory"),
        "rows": n_rows,
        "positions": counted,
        "student": f"{STUDENT}, seed {seed}",
        "cache_loss": _loss_name(schema),
        "bytes_per_token": cache.manifest["totals"]["bytes_per_token"],
        "encoding": encoding_summary(cache),
        "by_temperature": {f"{t:g}": s.result(has_bins=schema.top_k > 0) for t, s in sums.items()},
    }


def _select(targets: TeacherTargets, index) -> TeacherTargets:
    """The targets of some positions (``index``: a bool mask ``[N]`` or a slice)."""
    return dataclasses.replace(targets, **{f.name: getattr(targets, f.name)[index] for f in dataclasses.fields(targets)
                                           if isinstance(getattr(targets, f.name), torch.Tensor)})


def _loss_name(schema) -> str:
    if schema.sample_draws:
        head = f"exact top-{schema.top_k} + " if schema.top_k else ""
        draws = describe_draws(schema.sample_draws, sample_temperature=schema.sample_temperature,
                               temperatures=schema.temperatures)
        return f"forward-kl, unbiased estimator: {head}{draws} (sampled_kd_loss)"
    return f"forward-kl on the top-{schema.top_k} + tail bins (sparse_kd_loss)"
