"""How the ranks of a torchrun launch hold the student: a whole copy each (DDP) or a shard each (FSDP2).

``--sharding ddp`` (the default) wraps the training forward in ``DistributedDataParallel``: every rank
keeps the whole student, its gradients and the AdamW state, about 16 bytes a parameter in fp32
(weights 4 + gradients 4 + two moments 8), so it fits while that fits one device. ``--sharding fsdp``
applies FSDP2 (``torch.distributed.fsdp.fully_shard``) to each decoder layer and then to the root:
each rank keeps 1/W of every parameter, gradient and optimizer moment, and a layer's full weights
exist only while it runs (gathered before its forward and backward, freed after). On CUDA the
gathered weights are bf16 and gradients are reduced in fp32 (``MixedPrecisionPolicy``); on CPU both
stay fp32. ``--cpu-offload`` keeps the shards (and the optimizer step) in CPU memory (CUDA runs only).

One process (no torchrun) trains the plain student whatever ``--sharding`` says: there is nothing to
shard over, and run.json records ``"sharding": "none (one process)"``.

The fused lm-head + loss needs the head's whole weight, which FSDP holds sharded outside a forward.
:class:`StudentForward` therefore runs the objective inside its own ``forward`` (the FSDP root), where
the root's parameters (embeddings, final norm, lm-head) are gathered; their gradients, made by the
fused loss's backward, are then reduced like any other. A tied head (``lm_head.weight is
embed_tokens.weight``) is one parameter of the root and stays tied.

``--gradient-checkpointing`` recomputes each decoder layer's activations in the backward pass
(Hugging Face's ``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``, with
non-reentrant ``torch.utils.checkpoint``; it checkpoints the layer's ``forward``, inside FSDP's hooks): less
activation memory, one more forward per layer, the same gradients.
"""

from __future__ import annotations

from typing import Callable

import torch

from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.train.fused_kd import output_head

SHARDINGS = ("ddp", "fsdp")


class StudentForward(torch.nn.Module):
    """The training forward of a Hugging Face student, the module DDP or FSDP wraps.

    ``forward(input_ids [B, P], attention_mask)`` returns the logits ``[B, P, V]`` (``[B, C]`` for a
    classifier). With ``objective``, a causal LM's last hidden states ``[B, P, H]`` (after the final
    norm: what the lm-head reads) and its head ``(weight [V, H], bias [V] or None)`` go to
    ``objective(hidden, weight, bias)`` inside this forward, whose result is returned: under FSDP the
    head's weight is whole there, not a shard."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                objective: Callable | None = None):
        if objective is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weight, bias = output_head(self.model)  # the parameters of this moment: gathered ones under FSDP
        return objective(hidden, weight, bias)


def sharding_record(sharding: str, *, world_size: int) -> str:
    """What run.json's ``distributed.sharding`` says: ``ddp``, ``fsdp``, or ``none (one process)``."""
    return sharding if world_size > 1 else "none (one process)"


def enable_gradient_checkpointing(model: torch.nn.Module, *, kind: str) -> None:
    """Recompute each decoder layer in backward (a Hugging Face student; refused for a module one)."""
    if kind != "hf" or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError("--gradient-checkpointing needs a Hugging Face student that supports it "
                          "(gradient_checkpointing_enable); drop the flag for this student")
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers FSDP shards one by one (``model.model.layers`` of a Hugging Face model)."""
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ConfigError(f"--sharding fsdp shards a Hugging Face student layer by layer, and "
                          f"{type(model).__name__} has no decoder layer list (model.model.layers); "
                          "train it with --sharding ddp")
    return layers


def wrap(forward: torch.nn.Module, *, model: torch.nn.Module, sharding: str, world_size: int,
         device: torch.device, cpu_offload: bool) -> torch.nn.Module:
    """The module the training step runs: ``forward`` itself in one process, DDP around it, or
    ``forward`` sharded in place by FSDP2 (``model``, the student inside it, gives the layers).
    Create the optimizer after this: FSDP replaces the parameters by sharded ones."""
    if world_size == 1:
        if cpu_offload:
            raise ConfigError("--cpu-offload offloads FSDP's shards, and one process shards nothing; start it with "
                              "torchrun --nproc-per-node N (N >= 2), or drop --cpu-offload")
        return forward
    if cpu_offload and device.type != "cuda":  # FSDP's offload moves shards between a GPU and CPU memory
        raise ConfigError("--cpu-offload moves FSDP's shards off the GPUs, and with --device cpu they are in CPU "
                          "memory already; drop --cpu-offload")
    if sharding == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(forward, device_ids=ids)
    return shard(forward, model=model, device=device, cpu_offload=cpu_offload)


def shard(forward: torch.nn.Module, *, model: torch.nn.Module, device: torch.device,
          cpu_offload: bool) -> torch.nn.Module:
    """``forward`` sharded in place over the default process group: ``fully_shard`` on each decoder
    layer of ``model``, then on ``forward`` (the root: embeddings, final norm, lm-head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = {"offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    if device.type == "cuda":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    root = dict(options)
    if "mp_policy" in root:  # the root's inputs include the teacher targets: leave them fp32
        root["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                 cast_forward_inputs=False)
    fully_shard(forward, **root)
    return forward


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 root (its collectives need every rank)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_model_state(root: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole student's weights gathered on rank 0 in CPU memory (None on the other ranks), named
    as the student's own ``state_dict`` names them. Every rank must call it (it gathers shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    prefix = "model."  # StudentForward.model
    return {name.removeprefix(prefix): tensor for name, tensor in state.items()}


def unsharded_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain copy of the Hugging Face student ``model`` (whose layers FSDP turned into FSDP modules)
    holding ``state`` (:func:`full_model_state`), for ``save_pretrained``; built on the meta device, so
    the only weights in memory are ``state``'s."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(state, assign=True)
    copy.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        copy.generation_config = model.generation_config
    return copy
