"""Training: build functions, one step, honest validation, the loop, checkpoints and resume.

One path serves a laptop CPU and a torchrun cluster: distribution is applied by
``distributed.wrap_model``; data are sharded by rank so that any number of processes sees
the same global batch; latent draws are sliced from one global draw for the same reason.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from freeformer import __version__, lora
from freeformer import distributed as D
from freeformer.checkpoint import (
    Checkpoint,
    flatten_optimizer_state,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    unflatten_optimizer_state,
    write_json_atomic,
)
from freeformer.errors import CheckpointError, ConfigError, UserError
from freeformer.likelihood import (
    code_mask,
    log_mean_exp,
    posterior_log_weights,
    scored,
    token_log_probs,
)
from freeformer.model import FreeTransformer
from freeformer.runconfig import RunConfig, TrainConfig

LOG2 = math.log(2.0)


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------
def resolve_device(tc: TrainConfig, info: D.DistInfo | None = None) -> torch.device:
    if tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but CUDA is not available; use 'cpu' or 'auto'")
        return torch.device("cuda", info.local_rank if info else 0)
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def bf16_native_cpu() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: x86 AVX512-BF16 or AMX-BF16.

    Elsewhere oneDNN emulates bf16 GEMMs through float32, which is slower than FP32 itself.
    A capability check, not a timing at start-up: timings on a shared machine are noisy, and
    the gain was measured side by side once (bench/bench_precision.py, bench/RESULTS.md).
    """
    caps = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if caps is not None:  # torch ≥ 2.13
        c = caps()
        return bool(c.get("avx512_bf16") or c.get("amx_bf16"))
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# Below this width the casts around every small matmul cost more than bf16 matmuls save:
# measured on an AVX512-BF16 CPU (bench/RESULTS.md, precision-cpu), bf16 autocast made a
# training step 0.55 × as fast at D 32 and 0.7 × at D 64 (the debug and synthetic presets),
# and 1.2 × faster at D 128, 1.3–1.5 × at D 256, 1.6 × at D 512.
CPU_BF16_MIN_DIM = 128


def resolve_precision(device: torch.device, precision: str, dim: int | None = None) -> str:
    """"fp32" or "bf16" for ``train.precision`` on ``device`` for a model of width ``dim``.

    "auto" means bf16 autocast on CUDA, and on CPUs with native bf16 matmuls for models at
    least ``CPU_BF16_MIN_DIM`` wide (where it was measured faster); FP32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    if (device.type == "cpu" and bf16_native_cpu()
            and (dim is None or dim >= CPU_BF16_MIN_DIM)):
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str,
             dim: int | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast (float32 master weights; the model computes CE and KL in float32) when
    ``resolve_precision`` says bf16, else no autocast."""
    if resolve_precision(device, precision, dim) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def param_groups(model: nn.Module, weight_decay: float,
                 latent_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Decay matrices; no decay for norms, ζ, the token embedding and the post-sampler table
    (rows of a lookup table that most steps do not touch would only shrink).

    With ``latent_lr_scale`` ≠ 1 the latent path's new weights (``NEW_LATENT_PREFIXES``) get
    groups of their own whose ``lr_scale`` multiplies the scheduled lr. The groups depend on
    the model and these two numbers only, so a resumed run rebuilds them identically."""
    new = NEW_LATENT_PREFIXES if latent_lr_scale != 1.0 else ()
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (d, n): [] for n in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lookup = name.startswith(("tok_emb.", "post_sampler."))
        buckets[(p.dim() >= 2 and not lookup, bool(new) and name.startswith(new))].append(p)
    groups = []
    for (decay, is_new), params in buckets.items():
        if params or not is_new:  # the two base groups always exist, as before the option
            groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": latent_lr_scale if is_new else 1.0})
    return groups


# The latent path's weights that a converted pretrained model does not have: the encoder
# (its blocks, ζ, the bit readout) and the post-sampler. The injection block is a decoder
# block of the source model, so it is not among them.
NEW_LATENT_PREFIXES = ("encoder.", "post_sampler.")


def latent_path_prefixes(model: FreeTransformer) -> tuple[str, ...]:
    """Parameter-name prefixes of the latent path: the encoder, the post-sampler and the
    injection block, the one block whose keys/values read x + r (paper Algorithm 2)."""
    return ("encoder.", "post_sampler.", f"blocks.{model.config.inject_layer}.")


def set_trainable(model: FreeTransformer, trainable: str) -> None:
    """``"all"``: every weight trains. ``"latent"``: only the latent path does; the rest is
    frozen (requires_grad False), so it gets no gradient, no optimizer state and no decay."""
    keep = latent_path_prefixes(model) if trainable == "latent" else ("",)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(keep))


def load_init_checkpoint(cfg: RunConfig) -> Checkpoint | None:
    """The checkpoint named by ``train.init_from``, checked against the run's [model] section."""
    src = cfg.train.init_from
    if not src:
        return None
    ck = load_checkpoint(src)
    saved, own = ck.state["config"]["model"], cfg.model.to_dict()
    diff = [k for k in own if saved.get(k) != own[k]]
    if diff:
        k = diff[0]
        more = f" (and {len(diff) - 1} more field(s) differ)" if len(diff) > 1 else ""
        raise CheckpointError(
            f"--init-from {src}: model.{k} = {own[k]!r} in this run's config but "
            f"{saved.get(k)!r} in the checkpoint{more}; set --model.{k}={saved.get(k)} or make "
            "[model] equal the checkpoint's config.json")
    return ck


def _check_same_tokenizer(init: Checkpoint, data_dir: Path) -> None:
    """Data prepared with another tokenizer than the initial weights' would train on
    meaningless ids without any error; refuse it."""
    from freeformer.checkpoint import load_run_tokenizer
    from freeformer.data.tokenizer import load_tokenizer

    run_dir = init.path.parent.parent
    if not (run_dir / "tokenizer").is_dir():
        return  # the source run has no tokenizer to compare with (synthetic task)
    a, b = load_run_tokenizer(init), load_tokenizer(data_dir)
    # Same vocabulary and ids; the document separator may differ (prepare with the
    # tokenizer.json file ends documents with <|endoftext|>, with the directory with the
    # source's own EOS), both are ids the model knows.
    same = type(a) is type(b) and a.vocab_size == b.vocab_size
    if same and hasattr(a, "hf"):
        same = (a.hf.get_vocab(with_added_tokens=True) == b.hf.get_vocab(with_added_tokens=True)
                and a.encode(_PROBE) == b.encode(_PROBE))
    if not same:
        raise ConfigError(f"the data in {data_dir} was prepared with another tokenizer than "
                          f"the --init-from run's; prepare it with --tokenizer "
                          f"{run_dir / 'tokenizer'}")


_PROBE = "def f(x):\n    return x  # Ünïcödé, 中文, emoji 🙂\n\tThe end. 12345"


def build_model(cfg: RunConfig, device: torch.device, init: Checkpoint | None = None
                ) -> FreeTransformer:
    """The model of a new run: seeded init, or exactly ``init``'s weights; then frozen as
    ``train.trainable`` says."""
    if init is None:
        model = FreeTransformer(cfg.model, seed=cfg.train.seed).to(device)
    else:
        with torch.device("meta"):  # no seeded init that would be overwritten at once
            model = FreeTransformer(cfg.model)
        model.to_empty(device=device)
        load_model_state(model, lora.merged_state(init.model_state, init.state["config"]))
    set_trainable(model, cfg.train.trainable)
    return model


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.latent_lr_scale), lr=tc.lr,
                             betas=(tc.beta1, tc.beta2), fused=on_cuda or None)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio · lr``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.max_steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    floor = tc.min_lr_ratio * tc.lr
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * progress))


def build_data(cfg: RunConfig, info: D.DistInfo):
    """(training batches, validation batches) for the configured source."""
    tc, dc = cfg.train, cfg.data
    if tc.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size = {tc.batch_size} is not divisible by the "
                          f"{info.world_size} processes")
    if dc.source == "none":
        raise ConfigError("data.source = 'none' (a converted model): give prepared data, e.g. "
                          "--data.source=files --data.path=DIR (validate: --data DIR)")
    if dc.source == "synthetic":
        from freeformer.data.synthetic import SyntheticBatches

        train = SyntheticBatches(tc.batch_size, tc.seed, info.rank, info.world_size)
    else:
        from freeformer.data.loader import TokenWindows

        path = ensure_stdlib_data(dc.path) if dc.source == "stdlib" else dc.path
        train = TokenWindows(path, "train", tc.seq_len, tc.batch_size, tc.seed, info.rank,
                             info.world_size)
        if train.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the "
                              f"data's vocabulary ({train.vocab_size}); set "
                              f"--model.vocab_size={train.vocab_size}")
    return train, train.fixed_batches(tc.eval_batches)


def ensure_stdlib_data(path: str) -> str:
    """Prepare Python's own standard library source (byte tokenizer) into ``path`` once."""
    if (Path(path) / "manifest.json").is_file():
        return path
    import sysconfig

    from freeformer.data.prepare import prepare

    stdlib = sysconfig.get_paths()["stdlib"]
    prepare([stdlib], path, tokenizer="byte", include=("*.py",),
            exclude=("site-packages", "dist-packages", "test", "tests", "idlelib"),
            val_fraction=0.01, seed=0)
    return path


def micro_batches(tc: TrainConfig, info: D.DistInfo) -> int:
    local = tc.batch_size // info.world_size
    mb = tc.micro_batch_size or local
    if local % mb:
        raise ConfigError(f"train.micro_batch_size = {mb} must divide the per-process batch "
                          f"{local} (batch_size / processes)")
    return local // mb


# ---------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------
def global_bit_noise(cfg: RunConfig, gen: torch.Generator, info: D.DistInfo,
                     device: torch.device) -> Tensor | None:
    """Uniforms for the posterior draws of the whole global batch; this rank's rows."""
    if not cfg.model.latent:
        return None
    tc = cfg.train
    u = torch.rand(tc.batch_size, tc.seq_len, cfg.model.latent_bits, generator=gen,
                   device=gen.device)
    b = tc.batch_size // info.world_size
    return u[info.rank * b:(info.rank + 1) * b].to(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               noise: Tensor | None, n_micro: int, tc: TrainConfig,
               ctx: contextlib.AbstractContextManager) -> dict[str, Tensor]:
    """Forward/backward over ``n_micro`` micro-batches, clip, step. Returns mean metrics as
    0-d tensors: converting them to floats here would cost a host sync per step on CUDA, so
    the loop does it only on logging steps.

    The step's loss is the mean of the micro-batches' losses, which equals the mean over the
    batch's tokens because every micro-batch scores the same number of tokens (the training
    data never uses IGNORE_INDEX). Gradients cross processes once, on the last micro-batch.
    """
    sums: dict[str, Tensor] = {}
    xs, ys = x.chunk(n_micro), y.chunk(n_micro)
    ns = noise.chunk(n_micro) if noise is not None else [None] * n_micro
    for i in range(n_micro):
        # DDP / FSDP2: gradients are reduced across processes once, on the last micro-batch.
        with D.accumulating(model, sync=i == n_micro - 1):
            with ctx:
                out = model(xs[i], ys[i], bit_noise=ns[i])
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
# Validation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]], *, latent: bool,
             n_bits: int, k: int, seed: int, device: torch.device,
             ctx: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """Validation metrics in nats per scored target (``IGNORE_INDEX`` targets are skipped,
    like the cross-entropy) unless named ``_bits``.

    Free Transformer (the estimators are in ``freeformer.likelihood``; k = ``is_samples``):
      nll_is        the model's −log P(S)/T estimated by importance sampling with k encoder
                    samples: −log (1/k) Σ_j P(S|Z_j) P(Z_j) / Q(Z_j|S), Z_j ~ Q(·|S).
      nll_is_prior  the same number estimated with k prior samples: −log (1/k) Σ_j P(S|Z_j),
                    Z_j ~ P(Z). (Measured tighter than nll_is at small k on models trained
                    to KL ≈ κ: docs/evaluation.md.)
                    Both are consistent as k grows; for finite k each is an upper bound on
                    −log P(S)/T *in expectation* (Jensen), not for every batch, and the
                    smaller of the two is biased low — no bound. Compare either, with its k,
                    to a baseline's CE.
      ce_prior      CE with codes from the uniform prior (what generation does), averaged
                    over the k prior draws: E_Z[−log P(S|Z)]/T, a looser upper bound.
      ce_encoder    CE with codes from the encoder — it has seen the future tokens, so this
                    is NOT the model's likelihood (it leaks the answer); reported for curves.
      kl_bits       KL(Q || prior) per scored target, in bits (positions after a row's last
                    scored target are left out: their codes reach no scored token).
      elbo          ce_encoder + KL: an unbiased estimate of the negative ELBO, an upper
                    bound on −log P(S)/T.
    Baseline: ce.
    """
    ctx = ctx if ctx is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    tot: dict[str, float] = {}
    n_tok = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        n = int(scored(y).sum())
        with ctx:
            if not latent:
                vals = {"ce": -float(token_log_probs(model(x).logits, y).sum()) / n}
            else:
                weights, prior_weights, ce_prior, ce_enc, kl = [], [], 0.0, 0.0, 0.0
                for _ in range(k):
                    lp = token_log_probs(model(x, latents="prior", generator=gen).logits, y)
                    prior_weights.append(lp.double().sum(-1))  # log P(S | Z), Z ~ P(Z)
                    ce_prior -= float(lp.sum()) / (n * k)
                    lw, lp, out = posterior_log_weights(model, x, y, generator=gen)
                    weights.append(lw.double())
                    ce_enc -= float(lp.sum()) / (n * k)
                    kl += float(out.kl_tokens.float()[code_mask(y)].sum()) / (n * k)
                log_ps = log_mean_exp(torch.stack(weights), 0)  # (B,) log P̂(S)
                log_ps_prior = log_mean_exp(torch.stack(prior_weights), 0)
                vals = {"ce_prior": ce_prior, "ce_encoder": ce_enc, "kl_bits": kl / LOG2,
                        "elbo": ce_enc + kl, "nll_is": float(-log_ps.sum()) / n,
                        "nll_is_prior": float(-log_ps_prior.sum()) / n}
        for key, v in vals.items():
            tot[key] = tot.get(key, 0.0) + v * n
        n_tok += n
    model.train(was_training)
    out = {key: v / n_tok for key, v in tot.items()}
    if latent:
        out["is_samples"] = k
    return out


class LatentMonitor:
    """Warns when the KL sits far below κ for long (the latent is unused) or near H bits
    (the latent copies the sequence). ``update`` returns a warning once per condition."""

    def __init__(self, kappa_bits: float, n_bits: int, patience: int = 20) -> None:
        self.kappa, self.n_bits, self.patience = kappa_bits, n_bits, patience
        self.low = self.high = 0
        self.warned: set[str] = set()

    def update(self, step: int, kl_bits: float) -> str | None:
        self.low = self.low + 1 if kl_bits < 0.1 * self.kappa else 0
        self.high = self.high + 1 if kl_bits > 0.5 * self.n_bits else 0
        if self.low >= self.patience and "low" not in self.warned:
            self.warned.add("low")
            return (f"step {step}: KL has stayed at {kl_bits:.4f} bits/token, far below "
                    f"κ = {self.kappa:g} bits, for {self.low} logs: the decoder is not using Z")
        if self.high >= self.patience and "high" not in self.warned:
            self.warned.add("high")
            return (f"step {step}: KL is {kl_bits:.2f} bits/token, near H = {self.n_bits} bits: "
                    "the latent may be copying the sequence (generation will break)")
        return None


# ---------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------
class MetricsLog:
    """RUN_DIR/metrics.jsonl plus optional TensorBoard / W&B sinks (main process only)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, enabled: bool, resume_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            # Drop lines logged after the checkpoint we resume from: they will be re-made.
            lines = self.path.read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif not resume_step:
            self.path.write_text("")
        tc = cfg.train
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard needs TensorBoard: "
                                "pip install 'freeformer[logging]'") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if tc.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("train.wandb needs Weights & Biases: "
                                "pip install 'freeformer[logging]'") from None
            self.wandb = wandb.init(project=tc.wandb_project, config=cfg.to_dict(),
                                    dir=str(run_dir), resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        prefix = "val/" if record.get("kind") == "val" else "train/"
        scalars = {prefix + k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("step", "kind")}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, " \
           f"{torch.get_num_threads()} torch threads"


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


def _check_resume_compatible(ck: Checkpoint, cfg: RunConfig) -> None:
    saved = ck.state["config"]
    if saved["model"] != cfg.model.to_dict():
        diff = [k for k in saved["model"] if saved["model"].get(k) != cfg.model.to_dict().get(k)]
        raise CheckpointError(f"cannot resume: the model config differs from the checkpoint's "
                              f"({', '.join(diff)})")
    for key in ("batch_size", "seq_len", "seed", "trainable", "latent_lr_scale", "lora_rank",
                "lora_alpha", "lora_targets", "lora_injection"):
        # .get: checkpoints from before a field existed trained with its default
        was = saved["train"].get(key, TrainConfig.__dataclass_fields__[key].default)
        if was != getattr(cfg.train, key):
            raise CheckpointError(f"cannot resume: train.{key} = {getattr(cfg.train, key)!r} but "
                                  f"the checkpoint used {was}")
    if saved["data"] != {"source": cfg.data.source, "path": cfg.data.path}:
        raise CheckpointError("cannot resume: the data section differs from the checkpoint's")


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
          quiet: bool = False) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (or continue the run there with ``resume``)."""
    tc = cfg.train
    run_dir = Path(run_dir)
    device = resolve_device(tc)
    info = D.init_distributed(tc.dist, device.type)
    try:
        return _train(cfg, run_dir, resume, quiet, info)
    finally:
        D.shutdown(info)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, quiet: bool,
           info: D.DistInfo) -> TrainResult:
    tc, mc = cfg.train, cfg.model
    device = resolve_device(tc, info)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    ck = None
    if resume:
        ck = load_checkpoint(run_dir)
        _check_resume_compatible(ck, cfg)
    elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} to continue "
                        "it or choose another --out")
    # Everything that can fail on user input is checked before the run directory is touched.
    n_micro = micro_batches(tc, info)
    train_data, val_batches = build_data(cfg, info)
    init = None if resume else load_init_checkpoint(cfg)
    data_dir = getattr(train_data, "data_dir", None)
    if init is not None and data_dir is not None:
        _check_same_tokenizer(init, Path(data_dir))
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
        model = FreeTransformer(mc, seed=tc.seed).to(device)
        # before sharding: fully_shard keeps values
        load_model_state(model, lora.base_state(ck.model_state))
        set_trainable(model, tc.trainable)
        lora.attach(model, tc, ck.model_state)  # LoRA: the adapters too (freeformer.lora)
    else:
        model = build_model(cfg, device, init)
        lora.attach(model, tc)
    del init
    if tc.activation_checkpointing:
        _enable_activation_checkpointing(model)
    # FSDP2 swaps parameters for sharded ones, so the optimizer is built after wrapping.
    wrapped = D.wrap_model(model, info)
    optimizer = build_optimizer(model, tc)
    # Taken before a checkpoint's param groups are loaded over the optimizer's own.
    lr_scales = [g["lr_scale"] for g in optimizer.param_groups]
    gen = torch.Generator(device=device).manual_seed(tc.seed + 1)
    start, tokens = 0, 0
    if ck is not None:
        osd = unflatten_optimizer_state(ck.optimizer_tensors(), ck.state["param_groups"],
                                        {n for n, _ in model.named_parameters()})
        D.load_optimizer_state(model, optimizer, osd)
        train_data.load_state_dict(ck.state["data"])
        gen.set_state(torch.tensor(ck.state["rng"]["latent"], dtype=torch.uint8))
        start, tokens = ck.step, int(ck.state["tokens"])
    if tc.compile:
        wrapped = torch.compile(wrapped)
    ctx = autocast(device, tc.precision, mc.dim)
    log = MetricsLog(run_dir, cfg, info.is_main, start)
    monitor = LatentMonitor(mc.free_bits, mc.latent_bits) if mc.latent else None
    tokens_per_step = tc.batch_size * tc.seq_len

    def checkpoint(step: int) -> None:
        msd, osd = D.full_state_dicts(model, optimizer)
        msd = lora.checkpoint_state(msd)  # PEFT's module names → freeformer's
        if info.is_main:
            otensors, groups = flatten_optimizer_state(osd)
            state = {"config": cfg.to_dict(), "tokens": tokens, "data": train_data.state_dict(),
                     "rng": {"latent": gen.get_state().tolist()}, "param_groups": groups,
                     "version": __version__, "world_size": info.world_size}
            save_checkpoint(run_dir, step, model_state=msd, optimizer_tensors=otensors,
                            state=state, keep_last=tc.keep_last)
        D.barrier(info)

    def validate(step: int) -> dict[str, float]:
        vals = evaluate(wrapped, val_batches, latent=mc.latent, n_bits=mc.latent_bits,
                        k=tc.importance_samples, seed=tc.seed + 2, device=device, ctx=ctx)
        vals = D.mean_across_ranks(vals, info, device)
        log.write({"step": step, "kind": "val", "tokens": tokens, **vals})
        return vals

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.max_steps, initial=start, disable=quiet or not tc.progress
               or not info.is_main, unit="step", dynamic_ncols=True)
    wrapped.train()
    last: dict[str, float] = {}
    val: dict[str, float] = {}
    t0, tok0 = time.perf_counter(), tokens
    window_t, window_tok = t0, tokens
    for step in range(start, tc.max_steps):
        lr = lr_at(step, tc)
        for g, scale in zip(optimizer.param_groups, lr_scales):
            g["lr"] = lr * scale
        x, y = train_data.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        noise = global_bit_noise(cfg, gen, info, device)
        m = train_step(wrapped, optimizer, x, y, noise, n_micro, tc, ctx)
        tokens += tokens_per_step
        done = step + 1
        if done % tc.log_every == 0 or done == tc.max_steps:
            m = D.mean_across_ranks({k: float(v) for k, v in m.items()}, info, device)
            now = time.perf_counter()
            tps = (tokens - window_tok) / max(now - window_t, 1e-9)
            window_t, window_tok = now, tokens
            last = {"loss": m["loss"], "ce": m["ce"], "kl_bits": m["kl"] / LOG2,
                    "kl_loss": m["kl_loss"], "lr": lr, "tokens_per_s": tps,
                    **({"grad_norm": m["grad_norm"]} if "grad_norm" in m else {})}
            log.write({"step": done, "tokens": tokens, **last})
            bar.set_postfix(loss=f"{m['loss']:.3f}", ce=f"{m['ce']:.3f}",
                            kl_bits=f"{last['kl_bits']:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{tps:,.0f}")
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
        val = validate(end)
        checkpoint(end)
        if not quiet and info.is_main:
            print(format_val(end, val))
    log.close()
    return TrainResult(end, tokens, last, val, (tokens - tok0) / max(elapsed, 1e-9), run_dir)


def format_val(step: int, v: dict[str, float]) -> str:
    if "ce" in v:
        return f"val step {step}: ce {v['ce']:.4f} nats/token"
    k = int(v.get("is_samples", 0))
    return (f"val step {step}: −log P(S)/T estimates (importance sampling, k={k}): encoder "
            f"proposal {v['nll_is']:.4f}, prior proposal {v['nll_is_prior']:.4f} nats/token | "
            f"ELBO {v['elbo']:.4f} | KL {v['kl_bits']:.4f} bits | ce(prior codes) "
            f"{v['ce_prior']:.4f} | ce(encoder codes, sees the future) {v['ce_encoder']:.4f}")


def _enable_activation_checkpointing(model: FreeTransformer) -> None:
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        fwd = block.forward

        def wrapped(*args, _fwd=fwd, **kwargs):
            if kwargs.get("cache") is not None or not torch.is_grad_enabled():
                return _fwd(*args, **kwargs)
            return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped


def iter_metrics(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a training run directory?")
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i} is not valid JSON") from None
