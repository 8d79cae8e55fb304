"""Training: build functions, one step, the loop, checkpoints and resume.

One path serves a laptop CPU and a torchrun cluster: distribution is applied by
``distributed.wrap_model``; data are sharded by rank so that any number of processes sees
the same global batch; latent draws are sliced from one global draw for the same reason.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from freeformer import __version__, lora
from freeformer import distributed as D
from freeformer.checkpoint import (
    Checkpoint,
    flatten_optimizer_state,
    load_checkpoint,
    model_from_state,
    save_checkpoint,
    unflatten_optimizer_state,
    write_json_atomic,
)
from freeformer.errors import CheckpointError, ConfigError, UserError
from freeformer.finetune import (
    check_same_tokenizer,
    latent_warmup,
    load_init_checkpoint,
    opt_in_latent_loss,
    set_trainable,
)
from freeformer.likelihood import LOG2
from freeformer.metrics import LatentMonitor, MetricsLog
from freeformer.model import FreeTransformer
from freeformer.optim import build_optimizer, lr_at
from freeformer.runconfig import RunConfig, TrainConfig
from freeformer.runtime import autocast, resolve_device, resolve_precision
from freeformer.validation import evaluate, format_val


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------
def build_model(
    cfg: RunConfig, device: torch.device, init: Checkpoint | None = None
) -> FreeTransformer:
    """The model of a new run: seeded init, or exactly ``init``'s weights; then frozen as
    ``train.trainable`` says."""
    if init is None:
        model = FreeTransformer(cfg.model, seed=cfg.train.seed).to(device)
    else:
        model = model_from_state(
            cfg.model, lora.merged_state(init.model_state, init.state["config"]), device
        )
    set_trainable(model, cfg.train.trainable)
    return model


def build_data(cfg: RunConfig, info: D.DistInfo):
    """(training batches, validation batches) for the configured source."""
    tc, dc = cfg.train, cfg.data
    if tc.batch_size % info.world_size:
        raise ConfigError(
            f"train.batch_size = {tc.batch_size} is not divisible by the "
            f"{info.world_size} processes"
        )
    if dc.source == "none":
        raise ConfigError(
            "data.source = 'none' (a converted model): give prepared data, e.g. "
            "--data.source=files --data.path=DIR (validate: --data DIR)"
        )
    if dc.source == "synthetic":
        from freeformer.data.synthetic import SyntheticBatches

        train = SyntheticBatches(tc.batch_size, tc.seed, info.rank, info.world_size)
    else:
        from freeformer.data.loader import TokenWindows
        from freeformer.data.prepare import ensure_stdlib_data

        path = ensure_stdlib_data(dc.path) if dc.source == "stdlib" else dc.path
        train = TokenWindows(
            path, "train", tc.seq_len, tc.batch_size, tc.seed, info.rank, info.world_size
        )
        if train.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the "
                f"data's vocabulary ({train.vocab_size}); set "
                f"--model.vocab_size={train.vocab_size}"
            )
    return train, train.fixed_batches(tc.eval_batches)


def micro_batches(tc: TrainConfig, info: D.DistInfo) -> int:
    local = tc.batch_size // info.world_size
    mb = tc.micro_batch_size or local
    if local % mb:
        raise ConfigError(
            f"train.micro_batch_size = {mb} must divide the per-process batch "
            f"{local} (batch_size / processes)"
        )
    return local // mb


# ---------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------
def global_bit_noise(
    cfg: RunConfig, gen: torch.Generator, info: D.DistInfo, device: torch.device
) -> Tensor | None:
    """Uniforms for the posterior draws of the whole global batch; this rank's rows."""
    if not cfg.model.latent:
        return None
    tc = cfg.train
    u = torch.rand(
        tc.batch_size, tc.seq_len, cfg.model.latent_bits, generator=gen, device=gen.device
    )
    b = tc.batch_size // info.world_size
    return u[info.rank * b : (info.rank + 1) * b].to(device)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    noise: Tensor | None,
    n_micro: int,
    tc: TrainConfig,
    ctx: contextlib.AbstractContextManager,
    free_bits_nats: float | None = None,
) -> dict[str, Tensor]:
    """Forward/backward over ``n_micro`` micro-batches, clip, step. Returns mean metrics as
    0-d tensors: converting them to floats here would cost a host sync per step on CUDA, so
    the loop does it only on logging steps.

    The step's loss is the mean of the micro-batches' losses, which equals the mean over the
    batch's tokens because every micro-batch scores the same number of tokens (the training
    data never uses IGNORE_INDEX). Gradients cross processes once, on the last micro-batch.
    ``free_bits_nats`` replaces the model's κ in the free-bits hinge (the KL warm-up).
    """
    sums: dict[str, Tensor] = {}
    xs, ys = x.chunk(n_micro), y.chunk(n_micro)
    ns = noise.chunk(n_micro) if noise is not None else [None] * n_micro
    for i in range(n_micro):
        # DDP / FSDP2: gradients are reduced across processes once, on the last micro-batch.
        with D.accumulating(model, sync=i == n_micro - 1):
            with ctx:
                out = model(xs[i], ys[i], bit_noise=ns[i], return_logits=False)
                opt_in_latent_loss(out, tc, free_bits_nats)  # off by default (finetune.py)
            (out.loss / n_micro).backward()
        for k in ("loss", "ce", "kl", "kl_loss"):
            v = getattr(out, k).detach().float() / n_micro
            sums[k] = sums[k] + v if k in sums else v
    if tc.grad_clip > 0:
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    tokens: int
    last: dict[str, float]
    val: dict[str, float]
    tokens_per_s: float
    run_dir: Path


# Training fields a resumed run must keep: they shape the data, the draws or the optimizer.
_RESUME_SAME = (
    "batch_size seq_len seed trainable latent_lr_scale latent_ramp_steps "
    "free_bits_warmup_steps code_balance_weight lora_rank lora_alpha lora_targets lora_injection"
).split()


def _check_resume_compatible(ck: Checkpoint, cfg: RunConfig) -> None:
    saved = ck.state["config"]
    if saved["model"] != cfg.model.to_dict():
        diff = [k for k in saved["model"] if saved["model"].get(k) != cfg.model.to_dict().get(k)]
        raise CheckpointError(
            f"cannot resume: the model config differs from the checkpoint's ({', '.join(diff)})"
        )
    for key in _RESUME_SAME:
        # .get: checkpoints from before a field existed trained with its default
        was = saved["train"].get(key, TrainConfig.__dataclass_fields__[key].default)
        if was != getattr(cfg.train, key):
            raise CheckpointError(
                f"cannot resume: train.{key} = {getattr(cfg.train, key)!r} but "
                f"the checkpoint used {was}"
            )
    if saved["data"] != {"source": cfg.data.source, "path": cfg.data.path}:
        raise CheckpointError("cannot resume: the data section differs from the checkpoint's")


def train(
    cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False
) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (or continue the run there with ``resume``)."""
    tc = cfg.train
    run_dir = Path(run_dir)
    device = resolve_device(tc.device, flag="train.device")
    info = D.init_distributed(tc.dist, device.type)
    try:
        return _train(cfg, run_dir, resume, quiet, info)
    finally:
        D.shutdown(info)


def _train(
    cfg: RunConfig, run_dir: Path, resume: bool, quiet: bool, info: D.DistInfo
) -> TrainResult:
    tc, mc = cfg.train, cfg.model
    device = resolve_device(tc.device, flag="train.device", local_rank=info.local_rank)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    ck = None
    if resume:
        ck = load_checkpoint(run_dir)
        _check_resume_compatible(ck, cfg)
    elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise UserError(
            f"{run_dir} already holds a run; use --resume {run_dir} to continue "
            "it or choose another --out"
        )
    # Everything that can fail on user input is checked before the run directory is touched.
    n_micro = micro_batches(tc, info)
    train_data, val_batches = build_data(cfg, info)
    init = None if resume else load_init_checkpoint(cfg)
    data_dir = getattr(train_data, "data_dir", None)
    if init is not None and data_dir is not None:
        check_same_tokenizer(init, Path(data_dir))
    if info.is_main and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", {**cfg.to_dict(), "version": __version__})
        init_tok = init.path.parent.parent / "tokenizer" if init is not None else None
        if init_tok is not None and init_tok.is_dir():
            # The source's own files (special tokens, chat template) go on with its weights.
            import shutil

            shutil.copytree(init_tok, run_dir / "tokenizer", dirs_exist_ok=True)
        elif cfg.data.source != "synthetic":
            from freeformer.data.tokenizer import load_tokenizer

            load_tokenizer(train_data.data_dir).save(run_dir / "tokenizer")
    if ck is not None:
        # Loaded before sharding: fully_shard keeps the values. LoRA adapters are attached
        # (and loaded) below, on top of the frozen base.
        model = model_from_state(mc, lora.base_state(ck.model_state), device)
        set_trainable(model, tc.trainable)
        lora.attach(model, tc, ck.model_state)  # LoRA: the adapters too (freeformer.lora)
    else:
        model = build_model(cfg, device, init)
        lora.attach(model, tc)
    del init
    if tc.activation_checkpointing:
        D.checkpoint_activations(model)
    if tc.compile:  # per block, before FSDP2 wraps them (distributed.compile_blocks)
        D.compile_blocks(model)
    # FSDP2 swaps parameters for sharded ones, so the optimizer is built after wrapping.
    bf16 = resolve_precision(device, tc.precision, mc.dim) == "bf16"
    wrapped = D.wrap_model(model, info, torch.bfloat16 if bf16 else None)
    optimizer = build_optimizer(model, tc)
    # Taken before a checkpoint's param groups are loaded over the optimizer's own.
    lr_scales = [g["lr_scale"] for g in optimizer.param_groups]
    gen = torch.Generator(device=device).manual_seed(tc.seed + 1)
    start, tokens = 0, 0
    if ck is not None:
        osd = unflatten_optimizer_state(
            ck.optimizer_tensors(),
            ck.state["param_groups"],
            {n for n, _ in model.named_parameters()},
        )
        D.load_optimizer_state(model, optimizer, osd)
        train_data.load_state_dict(ck.state["data"])
        gen.set_state(torch.tensor(ck.state["rng"]["latent"], dtype=torch.uint8))
        start, tokens = ck.step, int(ck.state["tokens"])
    ctx = autocast(device, tc.precision, mc.dim)
    log = MetricsLog(run_dir, cfg, info.is_main, start)
    monitor = LatentMonitor(mc.free_bits, mc.latent_bits) if mc.latent else None
    tokens_per_step = tc.batch_size * tc.seq_len

    def checkpoint(step: int) -> None:
        msd, osd = D.full_state_dicts(model, optimizer)
        msd = lora.checkpoint_state(msd)  # PEFT's module names → freeformer's
        if info.is_main:
            otensors, groups = flatten_optimizer_state(osd)
            state = {
                "config": cfg.to_dict(),
                "tokens": tokens,
                "data": train_data.state_dict(),
                "rng": {"latent": gen.get_state().tolist()},
                "param_groups": groups,
                "version": __version__,
                "world_size": info.world_size,
            }
            save_checkpoint(
                run_dir,
                step,
                model_state=msd,
                optimizer_tensors=otensors,
                state=state,
                keep_last=tc.keep_last,
            )
        D.barrier(info)

    def validate(step: int) -> dict[str, float]:
        vals = evaluate(
            wrapped,
            val_batches,
            latent=mc.latent,
            n_bits=mc.latent_bits,
            k=tc.importance_samples,
            seed=tc.seed + 2,
            device=device,
            ctx=ctx,
        )
        vals = D.mean_across_ranks(vals, info, device)
        log.write({"step": step, "kind": "val", "tokens": tokens, **vals})
        return vals

    from tqdm.auto import tqdm

    bar = tqdm(
        total=tc.max_steps,
        initial=start,
        disable=quiet or not tc.progress or not info.is_main,
        unit="step",
        dynamic_ncols=True,
    )
    wrapped.train()
    last: dict[str, float] = {}
    val: dict[str, float] = {}
    t0, tok0 = time.perf_counter(), tokens
    window_t, window_tok = t0, tokens
    for step in range(start, tc.max_steps):
        lr = lr_at(step, tc)
        for g, scale in zip(optimizer.param_groups, lr_scales):
            g["lr"] = lr * scale
        kappa = latent_warmup(model, step, tc)
        x, y = train_data.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        noise = global_bit_noise(cfg, gen, info, device)
        m = train_step(wrapped, optimizer, x, y, noise, n_micro, tc, ctx, kappa)
        tokens += tokens_per_step
        done = step + 1
        if done % tc.log_every == 0 or done == tc.max_steps:
            m = D.mean_across_ranks({k: float(v) for k, v in m.items()}, info, device)
            now = time.perf_counter()
            tps = (tokens - window_tok) / max(now - window_t, 1e-9)
            window_t, window_tok = now, tokens
            last = {
                "loss": m["loss"],
                "ce": m["ce"],
                "kl_bits": m["kl"] / LOG2,
                "kl_loss": m["kl_loss"],
                "lr": lr,
                "tokens_per_s": tps,
                **({"grad_norm": m["grad_norm"]} if "grad_norm" in m else {}),
            }
            log.write({"step": done, "tokens": tokens, **last})
            bar.set_postfix(
                loss=f"{m['loss']:.3f}",
                ce=f"{m['ce']:.3f}",
                kl_bits=f"{last['kl_bits']:.3f}",
                lr=f"{lr:.2e}",
                tok_s=f"{tps:,.0f}",
            )
            if monitor is not None and info.is_main and done > tc.warmup_steps:
                warning = monitor.update(done, last["kl_bits"])
                if warning:
                    bar.write(f"warning: {warning}")
        bar.update(1)
        if tc.eval_every and done % tc.eval_every == 0 and done != tc.max_steps:
            val = validate(done)
            bar.write(format_val(done, val))
        if tc.ckpt_every and done % tc.ckpt_every == 0 and done != tc.max_steps:
            checkpoint(done)
    bar.close()
    elapsed = time.perf_counter() - t0
    end = max(start, tc.max_steps)
    if start < tc.max_steps:
        latent_warmup(model, end, tc)  # r at its final scale: the saved model's function
        val = validate(end)
        checkpoint(end)
        if not quiet and info.is_main:
            print(format_val(end, val))
    log.close()
    return TrainResult(end, tokens, last, val, (tokens - tok0) / max(elapsed, 1e-9), run_dir)
