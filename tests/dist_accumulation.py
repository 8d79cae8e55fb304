"""Worker for tests/test_distributed.py (run by torchrun, 2 gloo processes).

One optimizer step of the debug model under ``--mode`` (ddp | fsdp) with 1, 2 and 4
micro-batches per process, against one process computing the same global batch unwrapped.
The optimizer is SGD with lr = 1 and no clipping, so the step's parameter change is exactly
−(the averaged gradient): any error in how micro-batch gradients are summed, scaled or
reduced shows in the parameters. Gradient communications (FSDP2 reduce-scatters, DDP
bucket all-reduces) are counted per step: they must not grow with the micro-batches.
Rank 0 writes a JSON report to the path given as the last argument.
"""

import argparse
import contextlib
import json
import os

import torch
import torch.distributed as dist

from freeformer import FreeTransformer, ModelConfig
from freeformer import distributed as D
from freeformer.runconfig import TrainConfig
from freeformer.train import train_step

CALLS = {"reduce_scatter": 0, "all_reduce": 0}


def counting(name, fn):
    def wrapper(*args, **kwargs):
        CALLS[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["ddp", "fsdp"], required=True)
    ap.add_argument("out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = D.init_distributed(args.mode, "cpu")
    # FSDP2 reduce-scatters through dist.reduce_scatter_single (looked up at call time);
    # DDP's buckets are counted by a comm hook that then all-reduces as DDP would.
    dist.reduce_scatter_single = counting("reduce_scatter", dist.reduce_scatter_single)
    cfg = ModelConfig.preset("debug")
    g = torch.Generator().manual_seed(0)
    B, T = 8, 16
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    noise = torch.rand(B, T, cfg.latent_bits, generator=g)
    tc = TrainConfig(batch_size=B, seq_len=T, grad_clip=0.0)
    ctx = contextlib.nullcontext()

    # Reference: the whole global batch in one process, one micro-batch, no wrapping.
    ref = FreeTransformer(cfg, seed=0)
    opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    m = train_step(ref, opt, x, y, noise, 1, tc, ctx)
    report = {"ref_loss": float(m["loss"]), "runs": {}}
    ref_state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    init = FreeTransformer(cfg, seed=0).state_dict()

    b = B // info.world_size
    rows = slice(info.rank * b, (info.rank + 1) * b)
    for n_micro in (1, 2, 4):
        model = FreeTransformer(cfg, seed=0)
        wrapped = D.wrap_model(model, info)
        if args.mode == "ddp":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def count_allreduce(state, bucket):  # DDP checks the hook's argument names
                CALLS["all_reduce"] += 1
                return allreduce_hook(state, bucket)

            wrapped.register_comm_hook(None, count_allreduce)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        CALLS.update(reduce_scatter=0, all_reduce=0)
        m = train_step(wrapped, opt, x[rows], y[rows], noise[rows], n_micro, tc, ctx)
        calls = CALLS["reduce_scatter" if args.mode == "fsdp" else "all_reduce"]
        loss = D.mean_across_ranks({"loss": float(m["loss"])}, info, torch.device("cpu"))["loss"]
        msd, _ = D.full_state_dicts(model, None)  # collective; full tensors on rank 0 only
        if info.is_main:
            err = max(float((msd[k] - ref_state[k]).abs().max()) for k in ref_state)
            moved = max(float((ref_state[k] - init[k]).abs().max()) for k in ref_state)
            report["runs"][str(n_micro)] = {
                "loss": loss,
                "max_param_err": err,
                "grad_comm_calls": calls,
                "step_size": moved,
            }
    if info.is_main:
        with open(args.out, "w") as f:
            json.dump(report, f)
    D.shutdown(info)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
