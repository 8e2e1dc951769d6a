"""How the model is spread over data-parallel ranks: replicated (DDP) or sharded (FSDP2).

`ddp` keeps a whole replica on every rank and all-reduces gradients once per optimizer step.
`fsdp` shards parameters, gradients and optimizer state over the ranks with
`torch.distributed.fsdp.fully_shard` (one unit per transformer block, plus the root), for models
whose training state does not fit one GPU: the model is built once in host memory and only its
shards move to the GPU. Either way a checkpoint holds the full, unsharded weights and optimizer
state, so it resumes on any number of ranks and exports like a single-process one.
"""

from __future__ import annotations

import contextlib

import torch

from gptcore.train.distributed import DistInfo
from gptcore.weights import with_aliases, without_aliases


class SingleProcess:
    """One process: the model as it is."""

    name = "single process"
    describe = "one process"

    def __init__(self, dist: DistInfo):
        self.dist = dist

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to call forward on; call before building the optimizer."""
        return model.to(self.dist.device)

    def gradient_sync(self, forward: torch.nn.Module, sync: bool):
        """Around one micro-batch's backward: all-reduce its gradients only when `sync`."""
        return contextlib.nullcontext()

    def full_weights(self, model: torch.nn.Module, aliases: dict[str, str]) -> dict[str, torch.Tensor] | None:
        """The whole state dict, tied tensors once, on rank 0 (None elsewhere). Every rank calls it."""
        return without_aliases(model.state_dict(), aliases) if self.dist.is_main else None

    def optimizer_states(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[dict] | None:
        """Each optimizer's whole state on rank 0 (None elsewhere). A collective: every rank calls it."""
        return [o.state_dict() for o in optimizers] if self.dist.is_main else None

    def load(
        self,
        model: torch.nn.Module,
        weights: dict[str, torch.Tensor],
        aliases: dict[str, str],
        optimizers: list[torch.optim.Optimizer],
        states: list[dict],
    ) -> None:
        """Every rank: full weights and optimizer states as `full_weights`/`optimizer_states` gave them."""
        model.load_state_dict(with_aliases(weights, aliases))
        for o, state in zip(optimizers, states, strict=True):
            o.load_state_dict(state)


class Replicated(SingleProcess):
    """DistributedDataParallel: a replica per rank, gradients all-reduced on the step's last micro-batch."""

    name = "DDP"
    describe = "model replicated"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device = self.dist.device
        return DistributedDataParallel(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)

    def gradient_sync(self, forward: torch.nn.Module, sync: bool):
        return contextlib.nullcontext() if sync else forward.no_sync()


class Sharded(SingleProcess):
    """FSDP2: every transformer block a unit of its own, so one block is unsharded at a time."""

    name = "FSDP"
    describe = "parameters sharded"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.dist.device.type, (self.dist.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, head
        return model.to(self.dist.device)  # moves this rank's shards only

    def gradient_sync(self, forward: torch.nn.Module, sync: bool):
        forward.set_requires_gradient_sync(sync)  # reduce-scatter only on the step's last micro-batch
        return contextlib.nullcontext()

    def full_weights(self, model: torch.nn.Module, aliases: dict[str, str]) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return without_aliases(full, aliases) if self.dist.is_main else None

    def optimizer_states(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[dict] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        states = [get_optimizer_state_dict(model, o, options=options) for o in optimizers]
        return states if self.dist.is_main else None

    def load(
        self,
        model: torch.nn.Module,
        weights: dict[str, torch.Tensor],
        aliases: dict[str, str],
        optimizers: list[torch.optim.Optimizer],
        states: list[dict],
    ) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)  # every rank read the file: each keeps its shard
        set_model_state_dict(model, with_aliases(weights, aliases), options=options)
        for o, state in zip(optimizers, states, strict=True):
            set_optimizer_state_dict(model, o, state, options=options)


def data_parallel(kind: str, dist: DistInfo) -> SingleProcess:
    """The strategy for `pretrain.parallelism` (`ddp` or `fsdp`) on this many ranks."""
    if not dist.enabled:
        return SingleProcess(dist)
    return Sharded(dist) if kind == "fsdp" else Replicated(dist)
