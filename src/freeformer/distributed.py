"""Data parallelism applied from outside the model: torchrun init, DDP / FSDP2 wrapping,
full (unsharded) state dicts for checkpoints, and metric reduction.

The model file never imports ``torch.distributed``; everything distributed lives here.
Launch: ``torchrun --nproc_per_node=N -m freeformer train ... --train.dist=ddp|fsdp``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from freeformer.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def init_distributed(mode: str, device_type: str) -> DistInfo:
    """Join the torchrun process group for ``mode`` in {"ddp", "fsdp"}; "none" is a no-op."""
    if mode == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "launched by torchrun with several processes but train.dist = "
                "'none'; pass --train.dist=ddp or --train.dist=fsdp"
            )
        return DistInfo()
    if "RANK" not in os.environ:
        raise ConfigError(
            f"train.dist = {mode!r} needs a torchrun launch: torchrun "
            "--nproc_per_node=N -m freeformer train ..."
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(mode, rank, world, local)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def compile_blocks(model: nn.Module) -> nn.Module:
    """Regional compilation: ``torch.compile`` each Transformer block — decoder and encoder —
    in place, rather than the whole model.

    Blocks of one shape share their compiled code (modules are inlined as inputs), so compile
    time no longer grows with depth; the latent path between them (sampling with an explicit
    generator, the mapper's autograd Function with its chunk loop) stays eager, where tracing
    it would unroll the loop and break the graph at the draw. In place, so parameter names
    and checkpoints are unchanged. Apply before ``wrap_model`` (FSDP2 wraps compiled blocks).
    """
    for block in _blocks(model):
        block.compile()
    return model


def checkpoint_activations(model: nn.Module) -> None:
    """Activation checkpointing: each decoder block's forward is recomputed in the backward
    (training only: cached or gradient-free calls run it plainly). Applied from outside the
    model, like compilation and sharding."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        fwd = block.forward

        def wrapped(*args, _fwd=fwd, **kwargs):
            if kwargs.get("cache") is not None or not torch.is_grad_enabled():
                return _fwd(*args, **kwargs)
            return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = list(model.blocks)
    if getattr(model, "encoder", None) is not None:
        blocks += list(model.encoder.blocks)
    return blocks


def wrap_model(
    model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per block — decoder and encoder — then the root).

    ``param_dtype`` (FSDP2 only): the dtype parameters are all-gathered and computed in
    (bf16 under bf16 precision: half the all-gather traffic, and a bf16 residual stream);
    gradients are still reduced, and the optimizer still steps, in float32.
    """
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.local_rank] if next(model.parameters()).is_cuda else None
        return DDP(model, device_ids=ids)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in _blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    return model


@contextlib.contextmanager
def accumulating(model: nn.Module, sync: bool) -> Iterator[None]:
    """Context for one micro-batch's forward and backward: with ``sync=False`` its gradients
    accumulate locally and nothing is communicated; the micro-batch with ``sync=True`` (the
    last one) reduces the sum across processes once.

    DDP: ``no_sync``. FSDP2: ``set_requires_gradient_sync(False)`` on every sharded module —
    each gradient, the dense 2^H × D post-sampler's included, is reduce-scattered once per
    step instead of once per micro-batch. Unsharded gradients are held between micro-batches
    (DDP's memory for gradients); parameters still reshard after each backward, so the
    sharded parameter memory is kept, at the price of re-gathering them in the next forward.
    """
    m = getattr(model, "_orig_mod", model)  # through torch.compile's wrapper
    if sync:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(m, DDP):
        with m.no_sync():
            yield
    elif isinstance(m, FSDPModule):
        m.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            m.set_requires_gradient_sync(True)
    else:
        yield


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Unsharded, CPU model and name-keyed optimizer state dicts (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer else None
    return msd, osd


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> None:
    """Load a name-keyed full optimizer state into a plain, DDP or FSDP2-sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def mean_across_ranks(
    values: dict[str, float], info: DistInfo, device: torch.device
) -> dict[str, float]:
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
