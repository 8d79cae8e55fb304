"""Pretrained decoder → freeformer run directory (``freeformer convert``).

One key-template map, :data:`FROM_HF`, says where each freeformer parameter comes from in a
Hugging Face Llama checkpoint (``{i}``: block index); a target with several sources is
their rows stacked in that order (K before V in ``wkv``, gate before up in ``w_in``, as
:mod:`freeformer.layers` splits them). Families differ only by small overrides
(:data:`FAMILY_EXTRA`: Qwen2's q/k/v biases). No RoPE permutation: Hugging Face and
freeformer both rotate the first half of each head against the second (GGUF's permuted
layout is undone when reading, in :mod:`freeformer.pretrained.sources`).

Every parameter must come from exactly one source tensor of the expected shape and every
source tensor must be used: a missing, extra or mis-shaped tensor is refused by name.

Without ``--baseline`` the latent path is added so that the converted Free Transformer
computes exactly the source's function at step 0, whatever the codes, and still learns
(``FreeTransformer.init_latent_path(..., from_decoder=True)``; the reasons are in
docs/design.md, "Starting from a pretrained decoder").
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from freeformer.config import ModelConfig
from freeformer.errors import ConfigError, ConvertError
from freeformer.pretrained.sources import SourceModel, read_source

# Longest context a converted model gets unless --max-seq-len asks for more: RoPE tables and
# KV caches are sized by it, and 128k-position tables help nobody fine-tuning on a CPU.
DEFAULT_MAX_SEQ_LEN = 8192

_L = "model.layers.{i}."
FROM_HF: dict[str, tuple[str, ...]] = {
    "tok_emb.weight": ("model.embed_tokens.weight",),
    "norm.weight": ("model.norm.weight",),
    "head.weight": ("lm_head.weight",),
    "blocks.{i}.attn_norm.weight": (_L + "input_layernorm.weight",),
    "blocks.{i}.mlp_norm.weight": (_L + "post_attention_layernorm.weight",),
    "blocks.{i}.attn.wq.weight": (_L + "self_attn.q_proj.weight",),
    "blocks.{i}.attn.wkv.weight": (_L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
    "blocks.{i}.attn.wo.weight": (_L + "self_attn.o_proj.weight",),
    "blocks.{i}.mlp.w_in.weight": (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
    "blocks.{i}.mlp.w_out.weight": (_L + "mlp.down_proj.weight",),
}
FAMILY_EXTRA: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {
        "blocks.{i}.attn.wq.bias": (_L + "self_attn.q_proj.bias",),
        "blocks.{i}.attn.wkv.bias": (_L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
    },
}
# A Free Transformer exported by `freeformer export` (model_type "freeformer"): the decoder
# under the names above, each encoder block under the decoder block's names (the same map,
# re-rooted), and the latent path's own tensors.
_E = "model.encoder.layers.{i}."
LATENT_FROM_HF: dict[str, tuple[str, ...]] = {
    **{
        "encoder." + k: tuple(n.replace(_L, _E) for n in v)
        for k, v in {**FROM_HF, **FAMILY_EXTRA["qwen2"]}.items()
        if k.startswith("blocks.")
    },
    "encoder.zeta": ("model.encoder.zeta",),
    "encoder.norm.weight": ("model.encoder.norm.weight",),
    "encoder.readout.weight": ("model.encoder.readout.weight",),
    "post_sampler.weight": ("model.post_sampler.weight",),
}


def weight_table(arch: str, config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """freeformer parameter template → its Hugging Face source names, for ``arch``'s layout
    (``export`` reads the same table the other way)."""
    table = {**FROM_HF, **FAMILY_EXTRA.get(arch, {})}
    if config.qkv_bias:
        table.update(FAMILY_EXTRA["qwen2"])
    if config.latent:
        table.update(LATENT_FROM_HF)
    return table


# Buffers some old checkpoints carry: recomputed from the config, never weights.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------
def _rope(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """rope_theta and llama3 scaling from either config layout (transformers 4: rope_theta +
    rope_scaling; transformers 5: rope_parameters)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
    else:
        theta, scaling = cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling")
    out: dict[str, Any] = {"rope_theta": theta}
    if not scaling:
        return out
    if not isinstance(scaling, dict):
        raise ConvertError(f"{where}: rope scaling {scaling!r} is not an object")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return out
    if kind != "llama3":
        raise ConvertError(
            f"{where}: RoPE scaling type {kind!r} is not supported (only 'llama3', Llama 3.1/3.2's)"
        )
    try:
        out.update(
            rope_scaling="llama3",
            rope_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_max_len=int(scaling["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{where}: llama3 RoPE scaling lacks or mangles {e}") from None
    return out


def _sliding_window(src: SourceModel) -> int | None:
    """The attention window when the source uses one (it then caps max_seq_len: within a
    window, sliding-window attention is full causal attention)."""
    c = src.config
    window = c.get("sliding_window")
    if src.arch == "qwen2":
        layer_types = c.get("layer_types")
        uses = bool(c.get("use_sliding_window")) or (
            isinstance(layer_types, list) and "sliding_attention" in layer_types
        )
        window = window if uses else None
    if window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConvertError(f"{src.path}: sliding_window = {window!r} is not a positive integer")
    return window


# ModelConfig fields an exported Free Transformer's config.json records under these names
# (besides the decoder's Hugging Face names above); freeformer.export writes them.
FREEFORMER_FIELDS = (
    "latent_bits",
    "free_bits",
    "inject_layer",
    "encoder_layers",
    "latent_embedding",
    "latent_init_std",
    "qkv_bias",
)
_LLAMA3_FIELDS = (
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
)


def _freeformer_fields(c: dict[str, Any], where: str) -> dict[str, Any]:
    missing = [k for k in FREEFORMER_FIELDS if k not in c]
    if missing:
        raise ConvertError(
            f"{where}: a freeformer config.json must hold {missing[0]}; "
            "export the run again with `freeformer export`"
        )
    out: dict[str, Any] = {k: c[k] for k in FREEFORMER_FIELDS}
    out["latent"] = True
    llama3 = c.get("rope_llama3")
    if llama3 is not None:
        if not isinstance(llama3, list) or len(llama3) != 4:
            raise ConvertError(
                f"{where}: rope_llama3 = {llama3!r}; expected [factor, "
                "low_freq_factor, high_freq_factor, original_max_len] or null"
            )
        out.update(rope_scaling="llama3", **dict(zip(_LLAMA3_FIELDS, llama3)))
    return out


def model_config_from_source(
    src: SourceModel, *, latent: bool, max_seq_len: int | None = None, **latent_fields: Any
) -> ModelConfig:
    """The ModelConfig of ``src``; every value freeformer cannot reproduce is refused."""
    c, where = src.config, f"{src.path}"

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        if key not in c or c[key] is None:
            if required and default is None:
                raise ConvertError(f"{where}: config value {key} is missing")
            return default
        return c[key]

    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConvertError(f"{where}: hidden_act = {act!r}; only SwiGLU with silu is supported")
    for flag in ("attention_bias", "mlp_bias"):
        if get(flag, False, required=False):
            raise ConvertError(
                f"{where}: {flag} = true is not supported (Llama-style biases "
                "on every projection; only Qwen2's q/k/v biases are)"
            )
    dim, n_heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim", None, required=False)
    if (
        isinstance(dim, int)
        and isinstance(n_heads, int)
        and n_heads > 0
        and head_dim is not None
        and head_dim * n_heads != dim
    ):
        raise ConvertError(
            f"{where}: head_dim = {head_dim} differs from hidden_size / "
            f"num_attention_heads = {dim}/{n_heads}; not supported"
        )
    source_len = get("max_position_embeddings")
    window = _sliding_window(src)
    limit = min(source_len, window) if window is not None else source_len
    if max_seq_len is None:  # an exported freeformer model keeps its own length
        max_seq_len = limit if src.arch == "freeformer" else min(limit, DEFAULT_MAX_SEQ_LEN)
    elif max_seq_len > limit:
        why = (
            f"its sliding window ({window}), beyond which attention differs"
            if window is not None and window < source_len
            else f"the source's context length ({source_len})"
        )
        raise ConvertError(f"--max-seq-len {max_seq_len} exceeds {why}")
    fields = dict(
        vocab_size=get("vocab_size"),
        dim=dim,
        n_layers=get("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads", n_heads),
        mlp_hidden=get("intermediate_size"),
        max_seq_len=max_seq_len,
        tie_embeddings=bool(get("tie_word_embeddings", False, required=False)),
        norm_eps=get("rms_norm_eps"),
        qkv_bias=src.arch == "qwen2",
        **_rope(c, where),
        latent=latent,
        **latent_fields,
    )
    if src.arch == "freeformer":  # an exported Free Transformer: its own latent path
        fields.update(_freeformer_fields(c, where))
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConvertError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------
def _template(key: str) -> tuple[str, str | None]:
    m = re.match(r"^((?:encoder\.)?blocks)\.(\d+)\.(.*)$", key)
    return (f"{m.group(1)}.{{i}}.{m.group(3)}", m.group(2)) if m else (key, None)


def convert_weights(src: SourceModel, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Baseline (latent=False) state dict of ``config`` from ``src``'s tensors; the whole
    Free Transformer's when ``src`` is one (an exported one, arch "freeformer")."""
    from freeformer.model import FreeTransformer

    if src.arch != "freeformer":  # an exported Free Transformer keeps its latent path
        config = config.replace(latent=False)
    target = FreeTransformer.empty(config, "meta").state_dict()
    table = weight_table(src.arch, config)
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for key, param in target.items():
        template, i = _template(key)
        if template not in table:
            raise ConvertError(f"internal: no source for parameter {key}")  # pragma: no cover
        names = [n.replace("{i}", i) if i is not None else n for n in table[template]]
        rows = param.shape[0] // len(names)
        parts = []
        for name in names:
            if name not in src.shapes:
                raise ConvertError(f"{src.path}: tensor {name} is missing (needed for {key})")
            want = (rows, *param.shape[1:])
            if tuple(src.shapes[name]) != want:
                raise ConvertError(
                    f"{src.path}: tensor {name} has shape "
                    f"{tuple(src.shapes[name])}, the config implies {want}"
                )
            parts.append(src.load(name))
            used.add(name)
        out[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if config.tie_embeddings and "lm_head.weight" in src.shapes:
        # Some tied checkpoints store the head anyway: accept it only if it is the embedding.
        head = src.load("lm_head.weight")
        if head.shape != out["tok_emb.weight"].shape or not torch.equal(
            head, out["tok_emb.weight"]
        ):
            raise ConvertError(
                f"{src.path}: tie_word_embeddings is true but lm_head.weight "
                "differs from the embeddings"
            )
        used.add("lm_head.weight")
    extra = sorted(n for n in src.shapes if n not in used and not _IGNORED.match(n))
    if extra:
        raise ConvertError(
            f"{src.path}: unexpected tensor {extra[0]} ({len(extra)} unused) for "
            f"a {src.arch} model with this config; refusing to drop weights"
        )
    return out


# ---------------------------------------------------------------------------------------
# Run directory
# ---------------------------------------------------------------------------------------
LATENT_INITS = ("zero", "residual")


@torch.no_grad()
def residual_rms(model, n_tokens: int = 256, seed: int = 0) -> float:
    """The residual stream's scale where r is added: the median over positions of the RMS
    of x entering the injection block, on seeded random tokens (data-free; within ~6 % of
    the value on Python source for SmolLM2-135M: 6.07 vs 6.47). The median, because a few
    positions (the first token's attention sink) carry norms over 100× the rest."""
    c = model.config
    T = min(n_tokens, c.max_seq_len)
    tokens = torch.randint(0, c.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
    x = model.tok_emb(tokens)
    for i in range(c.inject_layer):
        x = model.blocks[i](x, model.rope_cos[:T], model.rope_sin[:T])
    return float(x.float().pow(2).mean(-1).sqrt().median())


def convert(
    src: str | Path,
    out: str | Path,
    *,
    baseline: bool = False,
    latent_bits: int = 16,
    free_bits: float = 0.5,
    inject_layer: int | None = None,
    encoder_layers: int = 1,
    encoder_window: int = 0,
    max_seq_len: int | None = None,
    seed: int = 0,
    latent_init: str = "zero",
    latent_init_scale: float = 1.0,
    latent_injection: str = "kv",
) -> Path:
    """Convert ``src`` (Hugging Face directory or .gguf) into the run directory ``out``.

    ``out`` holds config.json, tokenizer/ (the source's) and checkpoints/step_00000000/:
    an ordinary run directory for generate / validate / eval / load_model.
    ``latent_init``: "zero" (the post-sampler at 0: the model computes the source's function
    under any codes) or "residual" (its rows at the residual stream's scale at the injection
    block, for fine-tuning with the latent warm-up's ramp on r, which alone keeps step 0 at
    the source's function: docs/latent-study.md), times ``latent_init_scale``.
    ``latent_injection``: "kv" (the paper) or "residual" (opt-in variant; ModelConfig);
    ``encoder_window``: 0 (the paper) or W (opt-in variant; ModelConfig).
    """
    if latent_init not in LATENT_INITS:
        raise ConvertError(f"latent init {latent_init!r}: use one of {', '.join(LATENT_INITS)}")
    if not (latent_init_scale > 0 and math.isfinite(latent_init_scale)):
        raise ConvertError(f"--latent-init-scale {latent_init_scale}: expected a number > 0")
    from freeformer import __version__
    from freeformer.checkpoint import atomic_directory, save_checkpoint, write_json_atomic
    from freeformer.model import FreeTransformer
    from freeformer.runconfig import DataConfig, RunConfig, TrainConfig

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} already exists and is not empty; choose another --out")
    source = read_source(src)
    latent_fields = (
        {}
        if baseline
        else dict(
            latent_bits=latent_bits,
            free_bits=free_bits,
            inject_layer=inject_layer,
            encoder_layers=encoder_layers,
            encoder_window=encoder_window,
            latent_injection=latent_injection,
        )
    )
    if source.arch == "freeformer":
        if baseline:
            raise ConvertError(
                f"{source.path} is an exported Free Transformer; --baseline would "
                "drop its trained latent path (convert it without --baseline)"
            )
        latent_fields = {}  # its own, from its config.json (the latent flags do not apply)
    mc = model_config_from_source(
        source, latent=not baseline, max_seq_len=max_seq_len, **latent_fields
    )
    tok = source.tokenizer
    if tok.vocab_size > mc.vocab_size:
        raise ConvertError(
            f"{source.path}: the tokenizer has ids up to {tok.vocab_size - 1}, "
            f"beyond the model's vocab_size {mc.vocab_size}"
        )
    weights = convert_weights(source, mc)
    # Every parameter is set below (the decoder from the source, the latent path by
    # init_latent_path), so no random init is drawn only to be overwritten.
    model = FreeTransformer.empty(mc)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # anything left unset below would show, not pass silently
    model.load_state_dict(weights, strict=False, assign=True)
    if mc.latent and source.arch != "freeformer":
        # The latent path's init on a pretrained decoder (docs/design.md, "Starting from a
        # pretrained decoder"): the model computes the source's function at step 0.
        std = residual_rms(model) * latent_init_scale if latent_init == "residual" else 0.0
        model.init_latent_path(
            torch.Generator().manual_seed(seed), from_decoder=True, post_sampler_std=std
        )
    unset = [n for n, p in model.named_parameters() if p.isnan().any()]
    if unset:  # pragma: no cover - a parameter the converter does not know about
        raise ConvertError(f"internal: parameter {unset[0]} was not initialised by convert")

    cfg = RunConfig(
        model=mc,
        train=TrainConfig(seq_len=min(256, mc.max_seq_len)),
        data=DataConfig(source="none"),
    )
    with atomic_directory(out) as tmp:
        write_json_atomic(tmp / "config.json", {**cfg.to_dict(), "version": __version__})
        tok.save(tmp / "tokenizer")
        save_checkpoint(
            tmp,
            0,
            model_state=model.state_dict(),
            keep_last=1,
            state={"config": cfg.to_dict(), "tokens": 0, "converted_from": source.describe()},
        )
    return out
