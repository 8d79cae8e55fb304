"""Model configuration: one frozen, validated dataclass plus named presets.

Every field is checked in ``__post_init__``; a bad value raises :class:`ConfigError` whose
message names the field, the value and what would be accepted. Derived quantities are
properties, so a config never holds two values that can disagree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from freeformer.errors import ConfigError

LATENT_EMBEDDINGS = ("table", "bits")
LATENT_INJECTIONS = ("kv", "residual")
ROPE_SCALINGS = ("none", "llama3")
# Defaults of the llama3 RoPE-scaling fields; with rope_scaling = "none" they must stay so
# (a factor that silently does nothing would be a wrong result, not a setting).
_ROPE_SCALING_DEFAULTS = dict(
    rope_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192
)


def _require(ok: bool, name: str, value: Any, expect: str) -> None:
    if not ok:
        raise ConfigError(f"model.{name} = {value!r} is invalid: expected {expect}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Free Transformer (``latent=True``) or of its matched baseline (``latent=False``).

    Sizes follow the paper's notation: L = ``n_layers`` blocks of width D = ``dim``;
    H = ``latent_bits`` bits per token, so 2^H codes; κ = ``free_bits`` (in bits).
    """

    vocab_size: int = 256
    """Number of token ids; every input id must be < vocab_size."""
    dim: int = 256
    """Model width D."""
    n_layers: int = 8
    """Number of decoder blocks L (the encoder block is extra)."""
    n_heads: int = 8
    """Query heads per attention layer."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means n_heads."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (RoPE tables are built for it)."""
    mlp_hidden: int | None = None
    """SwiGLU hidden width; None means 8/3·D rounded up to a multiple of 64 (Llama rule)."""
    tie_embeddings: bool = False
    """Share the input embedding and the output readout (the paper's 1.5B model does)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_scaling: str = "none"
    """"none", or "llama3": Llama 3.1/3.2's frequency-dependent RoPE rescaling (pretrained
    checkpoints only; the four rope_* fields below are its parameters)."""
    rope_factor: float = 1.0
    """llama3 scaling: low frequencies are divided by this factor."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above rope_original_max_len / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below rope_original_max_len / this are kept."""
    rope_original_max_len: int = 8192
    """llama3 scaling: the context length the base model was pretrained with."""
    qkv_bias: bool = False
    """Biases on the query/key/value projections (Qwen2 checkpoints; the paper has none)."""
    latent: bool = True
    """True: Free Transformer. False: the matched baseline (plain decoder, same shared init)."""
    latent_bits: int = 16
    """H: bits per latent; Z_t takes 2^H values (paper: H = 16)."""
    free_bits: float = 0.5
    """κ in bits per token for the free-bits hinge (paper Eq. 5); converted to nats once."""
    inject_layer: int | None = None
    """0-based index of the block whose keys/values read x + r; None means n_layers // 2."""
    encoder_layers: int = 1
    """Non-causal encoder blocks queried by ζ (paper: 1)."""
    encoder_window: int = 0
    """0: the paper — the encoder's query at position t reads every position. W > 0: an
    opt-in variant (not the paper's) for fine-tuning pretrained decoders — it reads only
    positions t … t+W, the tokens Z_t can tell the decoder that it has not yet seen. A
    converted encoder's constant query cannot address t+1 and collapses onto one key for all
    positions (docs/latent-study.md); a window leaves it nothing else to read."""
    latent_embedding: str = "table"
    """"table": the paper's 2^H × D post-sampler; "bits": linear in ±1 bits (ablation)."""
    latent_injection: str = "kv"
    """"kv": the paper — r enters only the keys/values of block inject_layer, never the
    residual stream. "residual": an opt-in variant (not the paper's) for fine-tuning
    pretrained decoders — r is added to the residual stream entering that block (its queries,
    keys, values and skip path), which a pretrained decoder learns to read within tens of
    steps where it does not learn to read the keys/values path (docs/latent-study.md)."""
    latent_init_std: float | None = None
    """Init std of the post-sampler rows; None means the token embedding's std, so r
    starts at the scale of the residual stream — a table at std 0.02 next to activations of
    scale 1 is ignored by the decoder (see docs/design.md)."""

    _derived: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)
    """Fields left at None and derived here; ``replace`` derives them again."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "_derived",
            frozenset(
                n for n in ("n_kv_heads", "mlp_hidden", "inject_layer") if getattr(self, n) is None
            ),
        )

        def positive_int(name: str) -> None:
            v = getattr(self, name)
            _require(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                name,
                v,
                "a positive integer",
            )

        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "max_seq_len",
            "latent_bits",
            "encoder_layers",
        ):
            positive_int(name)
        _require(
            isinstance(self.encoder_window, int)
            and not isinstance(self.encoder_window, bool)
            and self.encoder_window >= 0,
            "encoder_window",
            self.encoder_window,
            "an integer ≥ 0 (0: the paper's encoder, reading every position)",
        )
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        positive_int("n_kv_heads")
        _require(
            self.dim % self.n_heads == 0, "n_heads", self.n_heads, f"a divisor of dim={self.dim}"
        )
        _require(
            self.head_dim % 2 == 0,
            "n_heads",
            self.n_heads,
            f"a value giving an even head_dim for RoPE (dim/n_heads = {self.head_dim})",
        )
        _require(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            self.n_kv_heads,
            f"a divisor of n_heads={self.n_heads}",
        )
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", 64 * math.ceil(8 * self.dim / 3 / 64))
        positive_int("mlp_hidden")
        for name in ("tie_embeddings", "latent", "qkv_bias"):
            _require(
                isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false"
            )
        for name in ("rope_theta", "norm_eps"):
            v = getattr(self, name)
            _require(
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and v > 0
                and math.isfinite(v),
                name,
                v,
                "a positive number",
            )
        _require(
            self.rope_scaling in ROPE_SCALINGS,
            "rope_scaling",
            self.rope_scaling,
            f"one of {', '.join(ROPE_SCALINGS)}",
        )
        if self.rope_scaling == "none":
            for name, default in _ROPE_SCALING_DEFAULTS.items():
                _require(
                    getattr(self, name) == default,
                    name,
                    getattr(self, name),
                    f"{default} (the default) unless rope_scaling = 'llama3'",
                )
        else:
            for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
                v = getattr(self, name)
                _require(
                    isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and v > 0
                    and math.isfinite(v),
                    name,
                    v,
                    "a positive number",
                )
            _require(self.rope_factor >= 1, "rope_factor", self.rope_factor, "a number ≥ 1")
            _require(
                self.rope_high_freq_factor > self.rope_low_freq_factor,
                "rope_high_freq_factor",
                self.rope_high_freq_factor,
                f"a number > rope_low_freq_factor = {self.rope_low_freq_factor}",
            )
            positive_int("rope_original_max_len")
        # 2^30 codes would need a 2^30 × D table: far beyond any sensible memory.
        _require(
            self.latent_bits <= 24,
            "latent_bits",
            self.latent_bits,
            "at most 24 (the table has 2^H rows)",
        )
        fb = self.free_bits
        _require(
            isinstance(fb, (int, float))
            and not isinstance(fb, bool)
            and fb >= 0
            and math.isfinite(fb),
            "free_bits",
            fb,
            "a number of bits ≥ 0",
        )
        _require(
            fb <= self.latent_bits,
            "free_bits",
            fb,
            f"at most latent_bits={self.latent_bits} (KL per token cannot exceed H bits)",
        )
        if self.inject_layer is None:
            object.__setattr__(self, "inject_layer", self.n_layers // 2)
        il = self.inject_layer
        _require(
            isinstance(il, int) and not isinstance(il, bool) and 1 <= il < self.n_layers,
            "inject_layer",
            il,
            f"an integer in [1, {self.n_layers - 1}] (blocks before it feed the encoder)",
        )
        _require(
            self.latent_embedding in LATENT_EMBEDDINGS,
            "latent_embedding",
            self.latent_embedding,
            f"one of {', '.join(LATENT_EMBEDDINGS)}",
        )
        _require(
            self.latent_injection in LATENT_INJECTIONS,
            "latent_injection",
            self.latent_injection,
            f"one of {', '.join(LATENT_INJECTIONS)}",
        )
        lis = self.latent_init_std
        _require(
            lis is None
            or (
                isinstance(lis, (int, float))
                and not isinstance(lis, bool)
                and lis > 0
                and math.isfinite(lis)
            ),
            "latent_init_std",
            lis,
            "a positive number or null",
        )

    # Derived values ----------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_codes(self) -> int:
        """2^H: the number of values of one latent Z_t."""
        return 1 << self.latent_bits

    @property
    def free_bits_nats(self) -> float:
        """κ in nats — the only place bits become nats (paper: "1/2 bit" = log(2)/2)."""
        return self.free_bits * math.log(2.0)

    @property
    def embed_init_std(self) -> float:
        # Untied: unit-scale embeddings (residual stream starts at RMS 1, as in torchtitan).
        # Tied: the same matrix is the readout, so it must be small (GPT-2's 0.02).
        return 0.02 if self.tie_embeddings else 1.0

    @property
    def resolved_latent_init_std(self) -> float:
        return self.embed_init_std if self.latent_init_std is None else self.latent_init_std

    @property
    def rope_llama3(self) -> tuple[float, float, float, int] | None:
        """(factor, low_freq_factor, high_freq_factor, original_max_len), or None."""
        if self.rope_scaling != "llama3":
            return None
        return (
            float(self.rope_factor),
            float(self.rope_low_freq_factor),
            float(self.rope_high_freq_factor),
            self.rope_original_max_len,
        )

    # Construction helpers ----------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; fields that were derived (None) are derived again."""
        unknown = set(changes) - set(self.field_names())
        if unknown:
            raise ConfigError(
                f"unknown model field(s): {', '.join(sorted(unknown))}; "
                f"valid fields: {', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **{**{n: None for n in self._derived}, **changes})

    def to_dict(self) -> dict[str, Any]:
        """All fields, derived ones resolved (what a checkpoint records)."""
        return {n: getattr(self, n) for n in self.field_names()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a table/object, got {type(d).__name__}")
        unknown = set(d) - set(cls.field_names())
        if unknown:
            raise ConfigError(
                f"unknown model field(s): {', '.join(sorted(unknown))}; "
                f"valid fields: {', '.join(cls.field_names())}"
            )
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named shape (``debug``, ``synthetic``, ``paper-1.5b``, ``paper-8b``) with overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # Tiny, for tests: every code path, milliseconds per step.
    "debug": dict(
        vocab_size=64,
        dim=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        latent_bits=6,
        free_bits=0.5,
    ),
    # The synthetic experiment (paper Section 4.1; its model size is not given in the paper).
    # One setup for every κ, as in the paper. Measured in docs/synthetic/results.md: H = 8
    # (κ = 8 bits needs H ≥ 8) with RoPE base 10^4 gives a κ = 1 bit latent that spreads its
    # KL over every token and carries the target position (the earlier base 100 / H = 6
    # made a local noise code win; see the search log there).
    "synthetic": dict(
        vocab_size=29,
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        max_seq_len=66,
        rope_theta=10000.0,
        latent_bits=8,
        free_bits=1.0,
    ),
    # Paper Section 4.2: 28 layers, D = 1536, 12 query heads, 2 KV heads, tied embeddings,
    # vocabulary 2^17, H = 16 (the shape of Qwen2-1.5B, whose SwiGLU width is 8960).
    "paper-1.5b": dict(
        vocab_size=1 << 17,
        dim=1536,
        n_layers=28,
        n_heads=12,
        n_kv_heads=2,
        mlp_hidden=8960,
        max_seq_len=4096,
        tie_embeddings=True,
        rope_theta=1e6,
        latent_bits=16,
        free_bits=0.5,
    ),
    # Paper Section 4.2: the Llama-3 8B shape (32 layers, D = 4096, 32/8 heads, SwiGLU 14336).
    "paper-8b": dict(
        vocab_size=1 << 17,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        mlp_hidden=14336,
        max_seq_len=4096,
        rope_theta=5e5,
        latent_bits=16,
        free_bits=0.5,
    ),
}


__all__ = ["ModelConfig", "PRESETS", "LATENT_EMBEDDINGS"]
