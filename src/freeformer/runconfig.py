"""Run configuration: ``[model]``, ``[train]``, ``[data]`` sections from TOML + typed overrides.

A run is described by a TOML file (or a shipped preset, ``configs/NAME.toml``) whose
sections map onto :class:`ModelConfig`, :class:`TrainConfig` and :class:`DataConfig`, then
``--section.key=value`` overrides, each parsed with the field's type. Any unknown section,
key or bad value is a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from freeformer.config import ModelConfig
from freeformer.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DIST_MODES = ("none", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
DATA_SOURCES = ("synthetic", "files", "stdlib", "none")
TRAINABLE = ("all", "latent")


def _check(ok: bool, section: str, name: str, value: Any, expect: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{name} = {value!r} is invalid: expected {expect}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging, checkpointing and distribution of one training run."""

    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    """Global batch, in sequences per optimizer step (over all processes and micro-batches)."""
    micro_batch_size: int = 0
    """Sequences per forward pass per process; 0 means batch_size / world_size (no accumulation)."""
    seq_len: int = 256
    """Tokens per training sequence (the synthetic task fixes 65)."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW decay on matrices; norms, ζ, embeddings and the post-sampler table get none."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    seed: int = 0
    """Seeds the init, the data order and the latent draws."""
    log_every: int = 10
    """Steps between metrics.jsonl lines / progress-bar updates."""
    eval_every: int = 200
    """Steps between validations; 0 disables periodic validation."""
    eval_batches: int = 8
    """Validation batches (fixed windows) per validation."""
    importance_samples: int = 4
    """k posterior samples for the importance-sampled −log P(S) estimate."""
    ckpt_every: int = 500
    """Steps between checkpoints (one is always written at the end); 0: only at the end."""
    keep_last: int = 3
    """Checkpoints kept on disk."""
    dist: str = "none"
    """"none", "ddp" or "fsdp" (launch with torchrun)."""
    compile: bool = False
    """torch.compile each Transformer block (regional; the latent path stays eager)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward to save memory."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda"."""
    precision: str = "auto"
    """"auto" (bf16 autocast on CUDA, and on CPUs with native bf16 matmuls — AVX512-BF16 or
    AMX — for models with dim ≥ 128, where it was measured faster; else fp32), "fp32" or
    "bf16"."""
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""
    tensorboard: bool = False
    """Also log to RUN_DIR/tensorboard (needs the 'logging' extra)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the 'logging' extra)."""
    wandb_project: str = "freeformer"
    progress: bool = True
    """Show a progress bar."""
    init_from: str = ""
    """Fine-tuning: a run directory or checkpoint (e.g. made by `freeformer convert`) whose
    weights start this run. Weights only: the optimizer, the schedule, the step count and the
    data position start fresh. The [model] section must equal the checkpoint's model config."""
    trainable: str = "all"
    """"all": train every weight. "latent": train only the latent path — the encoder, the
    post-sampler and the injection block (block L/2+1, whose keys/values read x + r); every
    other weight is frozen (requires_grad False, no optimizer state, no weight decay)."""
    latent_lr_scale: float = 1.0
    """Multiplies the learning rate (at every step of the schedule) of the latent path's new
    weights: the encoder (with ζ and the bit readout) and the post-sampler — not the
    injection block, a pretrained decoder block. For fine-tuning a converted model, whose
    post-sampler starts at 0 (docs/pretrained.md); no effect without a latent path."""
    latent_ramp_steps: int = 0
    """Latent warm-up, an opt-in optimisation schedule (not the paper's; docs/latent-study.md):
    r, the post-sampler's output, is multiplied by min(1, step / N) for the first N steps,
    so a fine-tuning run whose post-sampler starts at the residual stream's scale
    (`freeformer convert --latent-init residual`) still starts from the source model's
    function. 0: off (r enters at full scale from step 0, as in the paper)."""
    free_bits_warmup_steps: int = 0
    """KL warm-up, an opt-in schedule (the classic remedy for posterior collapse; Bowman et
    al. 2016): the free-bits threshold starts at H bits — the largest KL a code can have
    against the uniform prior, so no KL is penalised — and falls linearly to model.free_bits
    over N steps, leaving the paper's objective from step N on. 0: off."""
    code_balance_weight: float = 0.0
    """λ of an opt-in term λ·Σ_h KL(q̄_h || ½) added to the loss (not the paper's objective):
    q̄_h = P(bit h = 1) averaged over the batch's positions (``latent.bit_balance_kl``), a
    penalty on prior mismatch that keeps the encoder from giving every token the same code
    (docs/latent-study.md). Per micro-batch and process. 0: off."""
    lora_rank: int = 0
    """LoRA rank r of the decoder's adapters (PEFT; the 'lora' extra); 0 = no LoRA. The
    latent path's new weights train in full beside them (freeformer.lora)."""
    lora_alpha: float = 16.0
    """LoRA α: the adapters add (α/r)·B·A to each targeted weight."""
    lora_targets: str = "wq,wkv,wo,w_in,w_out"
    """Comma-separated linears of each decoder block that get adapters: wq, wkv, wo
    (attention), w_in, w_out (SwiGLU)."""
    lora_injection: str = "full"
    """"full": the injection block (block L/2+1) trains in full, like the encoder and the
    post-sampler; "lora": it gets adapters like the other decoder blocks."""

    def __post_init__(self) -> None:
        s = "train"
        _check_lora(self)
        for n in (
            "max_steps",
            "batch_size",
            "seq_len",
            "eval_batches",
            "importance_samples",
            "keep_last",
            "log_every",
        ):
            v = getattr(self, n)
            _check(_is_int(v) and v > 0, s, n, v, "a positive integer")
        for n in (
            "micro_batch_size",
            "warmup_steps",
            "latent_ramp_steps",
            "free_bits_warmup_steps",
            "eval_every",
            "ckpt_every",
            "seed",
            "threads",
        ):
            v = getattr(self, n)
            _check(_is_int(v) and v >= 0, s, n, v, "an integer ≥ 0")
        _check(_is_num(self.lr) and self.lr > 0, s, "lr", self.lr, "a positive number")
        for n in ("latent_ramp_steps", "free_bits_warmup_steps"):
            # A run that ended mid-ramp would save weights meant for a scaled r.
            v = getattr(self, n)
            _check(v <= self.max_steps, s, n, v, f"at most train.max_steps = {self.max_steps}")
        _check(
            _is_num(self.code_balance_weight) and self.code_balance_weight >= 0,
            s,
            "code_balance_weight",
            self.code_balance_weight,
            "a number ≥ 0 (0: off)",
        )
        _check(
            _is_num(self.latent_lr_scale) and self.latent_lr_scale > 0,
            s,
            "latent_lr_scale",
            self.latent_lr_scale,
            "a positive number (1: the same lr)",
        )
        for n in ("min_lr_ratio", "beta1", "beta2"):
            v = getattr(self, n)
            # The lr floor may equal the peak (a constant lr), never exceed it; β < 1.
            ok = _is_num(v) and (0 <= v <= 1 if n == "min_lr_ratio" else 0 <= v < 1)
            _check(
                ok, s, n, v, "a number in [0, 1]" if n == "min_lr_ratio" else "a number in [0, 1)"
            )
        for n in ("weight_decay", "grad_clip"):
            v = getattr(self, n)
            _check(_is_num(v) and v >= 0, s, n, v, "a number ≥ 0")
        for n in ("compile", "activation_checkpointing", "tensorboard", "wandb", "progress"):
            v = getattr(self, n)
            _check(isinstance(v, bool), s, n, v, "true or false")
        _check(self.dist in DIST_MODES, s, "dist", self.dist, f"one of {', '.join(DIST_MODES)}")
        _check(self.device in DEVICES, s, "device", self.device, f"one of {', '.join(DEVICES)}")
        _check(
            self.precision in PRECISIONS,
            s,
            "precision",
            self.precision,
            f"one of {', '.join(PRECISIONS)}",
        )
        _check(
            isinstance(self.init_from, str),
            s,
            "init_from",
            self.init_from,
            "a run directory or checkpoint path (a string)",
        )
        _check(
            self.trainable in TRAINABLE,
            s,
            "trainable",
            self.trainable,
            f"one of {', '.join(TRAINABLE)}",
        )


def _check_lora(tc: TrainConfig) -> None:
    from freeformer.lora import LORA_INJECTION, LORA_TARGETS, parse_targets

    s = "train"
    _check(
        _is_int(tc.lora_rank) and tc.lora_rank >= 0,
        s,
        "lora_rank",
        tc.lora_rank,
        "an integer ≥ 0 (0: no LoRA)",
    )
    _check(
        _is_num(tc.lora_alpha) and tc.lora_alpha > 0,
        s,
        "lora_alpha",
        tc.lora_alpha,
        "a positive number",
    )
    try:
        parse_targets(tc.lora_targets)
        ok = True
    except (ValueError, AttributeError):
        ok = False
    _check(
        ok,
        s,
        "lora_targets",
        tc.lora_targets,
        f"comma-separated names among {', '.join(LORA_TARGETS)}",
    )
    _check(
        tc.lora_injection in LORA_INJECTION,
        s,
        "lora_injection",
        tc.lora_injection,
        f"one of {', '.join(LORA_INJECTION)}",
    )
    if tc.lora_rank:
        _check(
            tc.trainable == "all",
            s,
            "trainable",
            tc.trainable,
            "'all' with train.lora_rank > 0 (LoRA itself says what trains)",
        )
        _check(
            tc.dist != "fsdp",
            s,
            "dist",
            tc.dist,
            "none or ddp with train.lora_rank > 0 (LoRA under FSDP2 is untested)",
        )


@dataclass(frozen=True)
class DataConfig:
    """Where training sequences come from."""

    source: str = "synthetic"
    """"synthetic" (the paper's Section 4.1 task, generated on the fly), "files" (a
    directory made by `freeformer prepare`), or "stdlib" (Python's standard library source,
    prepared with the byte tokenizer into `path` on first use), or "none" (a converted
    pretrained model: no data yet; give --data to validate, a data section to train)."""
    path: str = ""
    """Prepared data directory (files, stdlib)."""

    def __post_init__(self) -> None:
        _check(
            self.source in DATA_SOURCES,
            "data",
            "source",
            self.source,
            f"one of {', '.join(DATA_SOURCES)}",
        )
        _check(isinstance(self.path, str), "data", "path", self.path, "a string")
        if self.source in ("files", "stdlib"):
            _check(
                bool(self.path),
                "data",
                "path",
                self.path,
                f"a directory (data.source = {self.source!r} needs one)",
            )


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.data.source == "synthetic":
            from freeformer.data.synthetic import SEQ_LEN, VOCAB_SIZE

            _check(
                self.train.seq_len == SEQ_LEN - 1,
                "train",
                "seq_len",
                self.train.seq_len,
                f"{SEQ_LEN - 1} for the synthetic task (66 characters, shifted by one)",
            )
            _check(
                self.model.vocab_size >= VOCAB_SIZE,
                "model",
                "vocab_size",
                self.model.vocab_size,
                f"≥ {VOCAB_SIZE} for the synthetic task",
            )
        _check(
            self.train.seq_len <= self.model.max_seq_len,
            "train",
            "seq_len",
            self.train.seq_len,
            f"≤ model.max_seq_len = {self.model.max_seq_len}",
        )
        _check(
            self.train.trainable != "latent" or self.model.latent,
            "train",
            "trainable",
            self.train.trainable,
            "'all' for a baseline (model.latent = false has no latent path to train)",
        )
        for n in ("latent_ramp_steps", "free_bits_warmup_steps", "code_balance_weight"):
            v = getattr(self.train, n)
            _check(self.model.latent or not v, "train", n, v, "0 for a baseline (no latent)")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            "model": self.model.to_dict(),
            "train": dataclasses.asdict(self.train),
            "data": dataclasses.asdict(self.data),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return build_run_config(d)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _parse_value(section: str, key: str, text: str, tp: Any) -> Any:
    """Parse an override string with the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        tp = args[0]
    try:
        if tp is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            if "/" in text:  # allow fractions such as 1/8 for free bits
                a, b = text.split("/", 1)
                return float(a) / float(b)
            return float(text)
        return text
    except (ValueError, ZeroDivisionError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"--{section}.{key}={text!r}: expected {name}") from None


def available_presets() -> list[str]:
    root = resources.files("freeformer") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def preset_path(name: str) -> Path:
    names = available_presets()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(names)}")
    return Path(str(resources.files("freeformer") / "configs" / f"{name}.toml"))


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None


def build_run_config(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Sections dict (as read from TOML) + ``section.key=value`` overrides → RunConfig."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for k, v in raw.items():
        if k not in SECTIONS:
            raise ConfigError(
                f"unknown config section [{k}]; valid sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(v, dict):
            raise ConfigError(f"config section [{k}] must be a table, got {v!r}")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.key=value")
        lhs, text = ov.split("=", 1)
        lhs = lhs.lstrip("-")
        if "." not in lhs:
            raise ConfigError(f"override {ov!r} must look like section.key=value")
        section, key = lhs.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown config section in {ov!r}; valid sections: {', '.join(SECTIONS)}"
            )
        types_ = _field_types(SECTIONS[section])
        if key == "preset" and section == "model":
            raw.setdefault("model", {})["preset"] = text
            continue
        if key not in types_:
            raise ConfigError(f"unknown key {section}.{key}; valid keys: {', '.join(types_)}")
        raw.setdefault(section, {})[key] = _parse_value(section, key, text, types_[key])

    model_raw = dict(raw.get("model", {}))
    preset = model_raw.pop("preset", None)
    model = (
        ModelConfig.preset(preset, **model_raw)
        if preset is not None
        else ModelConfig.from_dict(model_raw)
    )
    sections: dict[str, Any] = {"model": model}
    for name in ("train", "data"):
        cls = SECTIONS[name]
        given = raw.get(name, {})
        types_ = _field_types(cls)
        unknown = set(given) - set(types_)
        if unknown:
            raise ConfigError(
                f"unknown key(s) in [{name}]: {', '.join(sorted(unknown))}; "
                f"valid keys: {', '.join(types_)}"
            )
        for k, v in given.items():  # TOML ints are fine where floats are expected
            if types_[k] is float and _is_int(v):
                given[k] = float(v)
        sections[name] = cls(**given)
    return RunConfig(**sections)


def load_run_config(
    *,
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    if (preset is None) == (path is None):
        raise ConfigError("give exactly one of --preset NAME or --config FILE.toml")
    return build_run_config(read_toml(preset_path(preset) if preset else path), overrides)
