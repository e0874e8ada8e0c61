"""A teacher split over the ranks of a tensor-parallel group (``cache-teacher --tensor-parallel TP``).

Each data-parallel group of ``TP`` consecutive torchrun ranks (:class:`~kdpipe.pipeline.distributed.Group`)
loads the Hugging Face teacher with its model's tensor-parallel plan (transformers'
``from_pretrained(distributed_config=DistributedConfig(tp_plan="auto"))``, DTensor) on the group's
own device mesh (:func:`load_tensor_parallel_model`): each rank holds ``1/TP`` of every planned layer,
and every forward exchanges activations inside the group only.

The plan gathers the lm-head's output (``lm_head: colwise_gather_output`` in most models): the model's
forward would put the ``[tokens, V]`` logits on every rank. :class:`TensorParallelTeacher` does not
call it: it runs the decoder (whose last hidden state is the same on every rank), applies this rank's
vocabulary slice of the head (rows ``[r * ceil(V/TP), ...)`` of the weight, a ``Shard(0)`` DTensor)
in vocabulary blocks with the head-fused kernel (:func:`~kdpipe.pipeline.capture.topk.partial_of_hidden`),
gathers every rank's top-k candidates and per-temperature tail sums (``TP * k`` values per position)
and combines them exactly (:func:`merge_partials`; docs/capture.md, "Teachers larger than one
device"): the global top-k is the top-k of the candidates, the global tail at ``T`` the log-sum-exp of
every rank's tail plus the candidates that did not make the global top-k. Where that path cannot be used (a head split
on its hidden dimension, a logit scale in the forward, a sampled capture) the model's own forward runs
and every rank makes the view from the gathered logits; the manifest says which path ran.

One rank of each group (``tp_rank`` 0) writes the group's shards and progress record; the others run
the same batches and write nothing (:mod:`.followers`).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from kdpipe.pipeline.capture.teachers import Teacher, _head_mismatch
from kdpipe.pipeline.capture.topk import (
    HeadPartial,
    SparseView,
    partial_of_hidden,
    sparse_view_of_logits,
    view_of_partial,
)
from kdpipe.pipeline.distributed import is_collective_failure
from kdpipe.pipeline.errors import ConfigError, TeacherError

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- what can be split
def check_tensor_parallel_config(config, tensor_parallel: int, *, top_k: int, teacher: str) -> None:
    """Refuse (ConfigError, one line) a teacher config that ``tensor_parallel`` ranks cannot split: no
    tensor-parallel plan, attention or key/value heads not divisible, a vocabulary slice under ``top_k``
    ids (``top_k`` 0: not checked)."""
    if not (getattr(config, "base_model_tp_plan", None) or {}):
        raise ConfigError(f"teacher {teacher} ({config.model_type}) has no tensor-parallel plan in transformers; "
                          "drop --tensor-parallel and use --device-map auto to spread it over the GPUs")
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, name, None)
        if isinstance(heads, int) and heads % tensor_parallel:
            raise ConfigError(f"teacher {teacher} has {heads} {name.removeprefix('num_').replace('_', ' ')}, which "
                              f"--tensor-parallel {tensor_parallel} does not divide; use a --tensor-parallel that "
                              f"divides {heads}, or --device-map auto")
    vocab = int(config.vocab_size)
    smallest = vocab_slice(vocab, tensor_parallel, tensor_parallel - 1)[1]
    if top_k > smallest:
        raise ConfigError(f"--top-k {top_k} exceeds the {smallest} ids of the smallest of {tensor_parallel} slices "
                          f"of the {vocab}-id vocabulary; use --top-k {smallest} or less, or a smaller --tensor-parallel")


def vocab_slice(vocab: int, parts: int, index: int) -> tuple[int, int]:
    """``(first id, ids)`` of slice ``index`` of ``parts``, as a ``Shard(0)`` DTensor cuts ``vocab``
    rows (``torch.chunk``: ``ceil(vocab / parts)`` each, the last ones shorter)."""
    size = -(-vocab // parts)
    first = min(vocab, index * size)
    return first, min(vocab, first + size) - first


def load_tensor_parallel_model(path: str, *, group, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    """The causal LM at ``path`` split with its model's tensor-parallel plan over ``group``'s
    tensor-parallel ranks (every rank of the launch calls this at the same time).

    transformers builds its meshes from the whole world (``WORLD_SIZE`` must equal the tp size); the
    meshes here cut the world into data-parallel groups of ``TP`` consecutive ranks, handed to
    ``from_pretrained`` through the one hook that makes them (``prepare_distribute_model``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.distributed.utils import TransformersDeviceMesh

    tp, dp, kind = group.tensor_parallel, group.capture_world_size, group.device.type
    dense = init_device_mesh(kind, (1, dp, 1, tp), mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp"))
    experts = init_device_mesh(kind, (1, dp, tp, 1), mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"))
    meshes = TransformersDeviceMesh(dense, experts)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model_class = type(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code))

    def prepare(cls, distributed_config, device_map=None):
        return distributed_config, group.device, meshes

    loader = type(model_class.__name__, (model_class,), {
        "prepare_distribute_model": classmethod(prepare),
        "__module__": model_class.__module__, "__qualname__": model_class.__qualname__})
    try:
        model = loader.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                       distributed_config=DistributedConfig(tp_size=tp, tp_plan="auto"))
    except (OSError, ValueError, RuntimeError) as exc:
        if is_collective_failure(exc):  # another rank failed: the caller says so (peer_failures)
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TeacherError(f"cannot split teacher {path!r} over {tp} ranks with its tensor-parallel plan: {first}; "
                           "use --device-map auto instead") from None
    return model.eval()


# ----------------------------------------------------------------------------- the exact combination
def merge_partials(parts: list[HeadPartial], *, top_k: int, temperatures: tuple[float, ...]) -> HeadPartial:
    """One :class:`HeadPartial` of the whole vocabulary from the partials of its slices (ids already
    global): the top-k of every slice's candidates, and as the tail every slice's tail plus the
    candidates that did not make the top-k, summed per temperature relative to the largest of them
    (fp64). Exact: a value is in the global top-k only if it is in its slice's."""
    values = torch.cat([p.values for p in parts], dim=1)  # [n, R*k]
    ids = torch.cat([p.ids for p in parts], dim=1)
    kept_values, where = torch.topk(values, top_k, dim=1, sorted=True)
    rest = values.double().scatter(1, where, _NEG_INF)  # the candidates left out: tail now
    tail_max = torch.stack([p.tail_max for p in parts] + [rest.amax(dim=1)], dim=1).amax(dim=1)
    ref = torch.where(torch.isfinite(tail_max), tail_max, torch.zeros_like(tail_max))[:, None]
    inv_t = 1.0 / torch.tensor(temperatures, dtype=torch.float64, device=values.device)
    tail_sum = torch.exp((rest - ref)[:, :, None] * inv_t).sum(dim=1)  # [n, nT]
    for p in parts:  # exp(-inf) = 0 for an empty tail, whose sum is 0 too
        tail_sum += p.tail_sum * torch.exp((p.tail_max[:, None] - ref) * inv_t)
    bad = torch.stack([p.bad for p in parts]).any(dim=0)
    return HeadPartial(kept_values, ids.gather(1, where), tail_max, tail_sum, bad)


def merged_view(parts: list[HeadPartial], *, top_k: int, temperatures: tuple[float, ...],
                check_finite: bool = True) -> SparseView:
    """The sparse view of the whole vocabulary from its slices' partials (see :func:`merge_partials`)."""
    return view_of_partial(merge_partials(parts, top_k=top_k, temperatures=temperatures), temperatures,
                           check_finite=check_finite)


def gather_partials(local: HeadPartial, group, size: int) -> list[HeadPartial]:
    """Every rank's partial of ``group`` (``size`` ranks, the same positions), in rank order: two
    all-gathers of ``[n, k + nT + 2]`` fp64 (values, tail max and sums, the bad flag) and ``[n, k]`` ids."""
    import torch.distributed as dist

    k, n_t = local.values.shape[1], local.tail_sum.shape[1]
    packed = torch.cat([local.values.double(), local.tail_max[:, None], local.tail_sum,
                        local.bad.double()[:, None]], dim=1)
    packs = [torch.empty_like(packed) for _ in range(size)]
    id_parts = [torch.empty_like(local.ids) for _ in range(size)]
    dist.all_gather(packs, packed.contiguous(), group=group)
    dist.all_gather(id_parts, local.ids.contiguous(), group=group)
    return [HeadPartial(p[:, :k].float(), ids, p[:, k], p[:, k + 1 : k + 1 + n_t], p[:, -1] > 0)
            for p, ids in zip(packs, id_parts)]


# ----------------------------------------------------------------------------- the teacher
@dataclasses.dataclass
class TensorParallelTeacher(Teacher):
    """An HF causal LM split over this rank's tensor-parallel group (see the module doc). Every rank
    of the group must make the same calls, in the same order, with the same inputs."""

    tp_group: object = None  # the torch.distributed process group of the tensor-parallel ranks
    tp_rank: int = 0
    tp_size: int = 1

    @classmethod
    def of(cls, teacher: Teacher, model: torch.nn.Module, group) -> "TensorParallelTeacher":
        """``teacher`` (loaded without weights) with ``model`` split over ``group``'s tp ranks."""
        fields = {f.name: getattr(teacher, f.name) for f in dataclasses.fields(Teacher)}
        return cls(**fields | {"model": model, "device": group.device, "tp_group": group.tp_group,
                               "tp_rank": group.tp_rank, "tp_size": group.tensor_parallel})

    @torch.inference_mode()
    def sparse_view(self, inputs, attention_mask, mask, *, top_k, temperatures, fused=None, check_finite=True) -> SparseView:
        """As :meth:`Teacher.sparse_view`: the vocabulary-parallel path (:attr:`fused_head` True) when
        nothing is against it and a one-time check agreed by the group passes, else the view of the
        logits the model's forward gathers on every rank."""
        mask = torch.as_tensor(mask, dtype=torch.bool)
        problem = "the logits path was asked for" if fused is False else self._cached_head_problem()
        if problem is None and fused is None and not self._head_checked:
            problem = self._check_split_head(inputs, attention_mask, mask)
            self._head_problem = problem if problem is not None else self._head_problem
        if problem is not None and fused is True:
            raise ConfigError(f"the vocabulary-parallel sparse view cannot be used with this teacher: {problem}")
        self.fused_head, self.fused_head_reason = problem is None, problem
        if problem is not None:
            return self._view_of_logits(self._checked_logits(inputs, attention_mask, mask), mask, top_k, temperatures,
                                        check_finite)
        if not bool(mask.any()):  # every rank sees the same mask: none of them gathers
            return sparse_view_of_logits(torch.empty(0, self.vocab_size, device=self.device), top_k=top_k,
                                         temperatures=temperatures)
        head = self.model.get_output_embeddings()
        hidden = self._last_hidden(inputs, attention_mask, mask, head)  # [n, H], the same on every rank
        weight, bias, first = self._head_slice()
        local = partial_of_hidden(hidden, weight, bias, top_k=top_k, temperatures=temperatures)
        local.ids = local.ids + first
        parts = gather_partials(local, self.tp_group, self.tp_size)
        return merged_view(parts, top_k=top_k, temperatures=temperatures, check_finite=check_finite)

    def _head_slice(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """This rank's rows of the head's weight and bias, and the first id they hold."""
        head = self.model.get_output_embeddings()
        first, rows = vocab_slice(self.vocab_size, self.tp_size, self.tp_rank)
        bias = None if head.bias is None else _local_rows(head.bias, first, rows)
        return _local_rows(head.weight, first, rows), bias, first

    def _check_split_head(self, inputs, attention_mask, mask) -> str | None:
        """The one-time check of :meth:`Teacher._check_head` on this rank's slice of the head, agreed
        by the group (a problem on any rank is a problem on all; undecided until all decide)."""
        try:
            self._head_slice()
            problem = None
        except ValueError as exc:
            problem = str(exc)
        if self._any(problem is not None):
            return problem or "another rank cannot take its slice of the lm-head"
        rows = torch.nonzero(mask.reshape(mask.shape[0], -1).any(dim=1)).flatten()
        if len(rows) == 0:
            return None  # undecided, on every rank (the same mask)
        one = slice(int(rows[0]), int(rows[0]) + 1)
        attention = None if attention_mask is None else attention_mask[one]
        logits = self._checked_logits(inputs[one], attention, mask[one]).reshape(-1, self.vocab_size)
        head = self.model.get_output_embeddings()
        hidden = self._last_hidden(inputs[one], attention, mask[one], head)
        if type(hidden) is not torch.Tensor:  # a DTensor: the plan splits the sequence
            problem = f"the decoder's last hidden state is a {type(hidden).__name__}"
        else:
            weight, bias, first = self._head_slice()
            masked = logits[mask[one].reshape(-1).to(logits.device)][:, first : first + weight.shape[0]]
            decided, problem = _head_mismatch(masked, hidden, SimpleNamespace(weight=weight, bias=bias))
            if not self._any(not decided):
                self._head_checked = True
        if self._any(problem is not None):
            return problem or "the model's logits are not its output head applied to the decoder's last hidden state (on another rank's slice)"
        return None

    def _any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank of the group."""
        import torch.distributed as dist

        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.tp_group)
        return bool(value.item() > 0)

    def head_plan(self) -> str | None:
        """The tensor-parallel style the model's plan gives its lm-head (e.g. colwise_gather_output)."""
        head = self.model.get_output_embeddings() if self.model is not None else None
        name = next((n for n, m in self.model.named_modules() if m is head), None) if head is not None else None
        return (getattr(self.model, "tp_plan", None) or {}).get(name)

    def sparse_view_path(self) -> str:
        plan = f"lm_head {self.head_plan()}" if self.model is not None else "no weights loaded"
        if self.fused_head is False or (self.fused_head is None and self.fused_head_problem() is not None):
            reason = self.fused_head_reason or self.fused_head_problem()
            return (f"from the teacher's logits, gathered on each of the {self.tp_size} tensor-parallel ranks by "
                    f"its plan ({plan})" + (f" ({reason})" if reason else ""))
        return (f"vocabulary-parallel head-fused: each of the {self.tp_size} tensor-parallel ranks takes the top-k and "
                "per-temperature tail sums of its slice of the lm-head in vocabulary blocks; the group gathers "
                f"{self.tp_size} x top-k candidates per position and combines them exactly; logits never gathered "
                f"(the plan: {plan})")


def _local_rows(tensor: torch.Tensor, first: int, rows: int) -> torch.Tensor:
    """This rank's ``rows`` rows from ``first`` of a head parameter: its own shard of a ``Shard(0)``
    DTensor, or a slice of a replicated one; ValueError for any other layout."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(tensor, DTensor):
        return tensor[first : first + rows]
    if tensor.placements == (Shard(0),):
        local = tensor.to_local()
        if local.shape[0] != rows:
            raise ValueError(f"the lm-head's shard holds {local.shape[0]} rows, not the {rows} expected")
        return local
    if all(isinstance(p, Replicate) for p in tensor.placements):
        return tensor.to_local()[first : first + rows]
    raise ValueError(f"the lm-head is split as {tensor.placements}, not by vocabulary rows")
