"""A Free Transformer (Fleuret, arXiv 2510.17558) as a Hugging Face causal LM.

Shipped beside the weights by ``freeformer export`` and loaded with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``. It needs torch and
transformers only — never freeformer — and computes freeformer's function: the decoder is
Llama's (pre-norm RMSNorm blocks, RoPE rotating the first half of each head against the
second, grouped-query attention, SwiGLU), and the latent path follows the paper's
Algorithm 2:

  x = embed(tokens); x = layers[0 : inject_layer](x)                      (causal)
  codes Z_t: from the encoder over x (prefill), uniform (new tokens), or pinned (``latents``)
  r = post_sampler(Z)
  x = layers[inject_layer](queries = x, keys/values = x + r)    (r never joins the residual)
  x = layers[inject_layer + 1 :](x); logits = lm_head(norm(x))

Which codes a forward uses (paper Section 3.4), position by position:

* ``latents`` given, (B or 1, ≥ past + T) integer codes in [0, 2^H): position p uses
  ``latents[:, p]`` — pinned codes, e.g. one Z shared by a group of samples;
* otherwise, a forward starting at position 0 (the prefill, or scoring a whole text) uses
  the encoder's posterior sample, Q(Z | prompt) — the encoder is non-causal, so it reads
  every input token — when ``config.prefill_latents == "encoder"`` (the paper), or uniform
  codes when it is ``"prior"`` (use that to score text: the encoder would see the answer);
* a forward after cached positions (a decode step) draws a fresh uniform code per token.

Random draws use ``latent_generator`` (a ``torch.Generator``) when given, else torch's
global RNG. Every output carries the ``codes`` it used; ``generate(...,
return_latents=True)`` returns them for the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_freeformer import FreeformerConfig

try:  # transformers ≥ 5: init functions that skip weights loaded from the checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4
    _init = nn.init


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------
class FreeformerRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # normalise in float32, return the input dtype
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


def _inv_freq(config: FreeformerConfig) -> Tensor:
    hd = config.hidden_size // config.num_attention_heads
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if config.rope_llama3:  # Llama 3.1's frequency-dependent rescaling
        factor, low, high, original = config.rope_llama3
        wavelen = 2 * math.pi / inv
        smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        inv = (1 - smooth) * inv / factor + smooth * inv
    return inv


def _rope_tables(position_ids: Tensor, config: FreeformerConfig) -> tuple[Tensor, Tensor]:
    """cos/sin (B, T, head_dim/2) of the angles position × frequency, computed in float64."""
    inv = _inv_freq(config).to(position_ids.device)
    angles = position_ids.to(torch.float64)[..., None] * inv
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, h, hd): (x1, x2) ↦ (x1·c − x2·s, x2·c + x1·s) over the two halves of a head."""
    xf = x.float()
    c = torch.cat([cos, cos], dim=-1)[:, :, None, :]
    s = torch.cat([-sin, sin], dim=-1)[:, :, None, :]
    return torch.addcmul(xf * c, xf.roll(x.shape[-1] // 2, dims=-1), s).type_as(x)


class FreeformerAttention(nn.Module):
    def __init__(self, config: FreeformerConfig, layer_idx: int | None) -> None:
        super().__init__()
        d, nh, nkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, d // nh
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(d, nh * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, nkv * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, nkv * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(nh * self.head_dim, d, bias=False)

    def forward(
        self,
        hq: Tensor,
        hkv: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: Any = None,
    ) -> Tensor:
        B, T, _ = hq.shape
        q = self.q_proj(hq).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(hkv).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(hkv).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.n_kv_heads != self.n_heads:  # query head i reads key/value head i // group
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FreeformerMLP(nn.Module):
    def __init__(self, config: FreeformerConfig) -> None:
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FreeformerBlock(nn.Module):
    """Pre-norm block whose attention may read keys/values from ``kv`` instead of x (the
    norm is applied to both, so with kv = x it is the ordinary block)."""

    def __init__(self, config: FreeformerConfig, layer_idx: int | None) -> None:
        super().__init__()
        self.input_layernorm = FreeformerRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = FreeformerAttention(config, layer_idx)
        self.post_attention_layernorm = FreeformerRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FreeformerMLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        kv: Tensor | None = None,
        cache: Any = None,
    ) -> Tensor:
        h = self.input_layernorm(x)
        hkv = h if kv is None else self.input_layernorm(kv)
        x = x + self.self_attn(h, hkv, cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class FreeformerEncoder(nn.Module):
    """Non-causal blocks queried by a learned constant ζ, reading the decoder's x at the
    injection point; H bit logits per position (paper Algorithm 2)."""

    def __init__(self, config: FreeformerConfig) -> None:
        super().__init__()
        self.zeta = nn.Parameter(torch.zeros(config.hidden_size))
        self.layers = nn.ModuleList(
            FreeformerBlock(config, None) for _ in range(config.encoder_layers)
        )
        self.norm = FreeformerRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.readout = nn.Linear(config.hidden_size, config.latent_bits, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        h = self.zeta.to(x.dtype).expand_as(x)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, kv=x)
        return self.readout(self.norm(h))


class FreeformerPostSampler(nn.Module):
    """Code → D-vector r: a 2^H × D table (the paper) or, for "bits", linear in ±1 bits."""

    def __init__(self, config: FreeformerConfig) -> None:
        super().__init__()
        self.kind, self.n_bits = config.latent_embedding, config.latent_bits
        shape = (
            (1 << self.n_bits, config.hidden_size)
            if self.kind == "table"
            else (config.hidden_size, self.n_bits)
        )
        self.weight = nn.Parameter(torch.zeros(shape))

    def forward(self, codes: Tensor) -> Tensor:
        if self.kind == "table":
            return F.embedding(codes, self.weight)
        bits = (codes[..., None] >> torch.arange(self.n_bits, device=codes.device)) & 1
        return F.linear(2 * bits.to(self.weight.dtype) - 1, self.weight)


def _sample_codes(bit_logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """Bits B_h ~ Bernoulli(σ(L_h)) independently; code d = Σ_h 2^h B_h."""
    p = torch.sigmoid(bit_logits.float())
    u = torch.rand(p.shape, generator=generator, device=p.device)
    weights = 1 << torch.arange(bit_logits.shape[-1], device=p.device)
    return ((u < p).long() * weights).sum(-1)


def _masks(
    attention_mask: Tensor | None, B: int, T: int, past: int, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """Boolean attention masks (B, 1, T, past + T): the decoder's (causal) and the encoder's
    (non-causal). ``attention_mask`` (B, past + T), 1 = real token, masks padded keys; each
    query always sees itself, so a padded row never has an empty softmax."""
    S = past + T
    qi = torch.arange(past, S, device=device)[:, None]
    kj = torch.arange(S, device=device)[None, :]
    causal = (kj <= qi)[None, None].expand(B, 1, T, S)
    if attention_mask is None:
        return causal, None
    keys = attention_mask[:, None, None, -S:].bool().to(device)
    diag = (kj == qi)[None, None]
    return (causal & keys) | diag, keys | diag


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
@dataclass
class FreeformerCausalLMOutput(ModelOutput):
    """Logits, the cross-entropy when ``labels`` are given (under the codes used; the
    training objective's KL term is not computed here), the cache, and the codes (B, T)
    used at each input position."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: Any = None
    codes: Tensor | None = None
    bit_logits: Tensor | None = None
    """(B, T, H) the encoder's bit logits when the encoder ran, else None."""


class FreeformerPreTrainedModel(PreTrainedModel):
    config_class = FreeformerConfig
    base_model_prefix = "model"
    _no_split_modules = ["FreeformerBlock"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, FreeformerRMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, FreeformerEncoder):
            _init.normal_(module.zeta, mean=0.0, std=std)
        elif isinstance(module, FreeformerPostSampler):
            _init.normal_(module.weight, mean=0.0, std=std)


class FreeformerModel(FreeformerPreTrainedModel):
    """Decoder, encoder and post-sampler; returns the final normed hidden states."""

    def __init__(self, config: FreeformerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            FreeformerBlock(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = FreeformerRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.encoder = FreeformerEncoder(config)
        self.post_sampler = FreeformerPostSampler(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def _codes(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        enc_mask: Tensor | None,
        past: int,
        latents: Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor | None]:
        c = self.config
        B, T = x.shape[:2]
        if latents is not None:  # pinned codes, indexed by position
            latents = torch.as_tensor(latents, device=x.device)
            if latents.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"latents must be integer codes, got {latents.dtype}")
            if latents.dim() == 1:
                latents = latents[None]
            if latents.shape[0] not in (1, B) or latents.shape[1] < past + T:
                raise ValueError(
                    f"latents have shape {tuple(latents.shape)}; this call needs "
                    f"({B} or 1, ≥ {past + T}) codes (one per position)"
                )
            codes = latents[:, past : past + T].expand(B, T).long()
            if int(codes.min()) < 0 or int(codes.max()) >= 1 << c.latent_bits:
                raise ValueError(f"latent codes must lie in [0, 2^H = {1 << c.latent_bits})")
            return codes, None
        if past == 0 and c.prefill_latents == "encoder":  # paper: Q(Z | prompt) at prefill
            bit_logits = self.encoder(x, cos, sin, enc_mask)
            return _sample_codes(bit_logits, generator), bit_logits
        # A fresh uniform code per new token: the prior P(Z_t) = 2^-H (paper Section 3.4).
        return torch.randint(
            0, 1 << c.latent_bits, (B, T), device=x.device, generator=generator
        ), None

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        latents: Tensor | None = None,
        latent_generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        c = self.config
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        cos, sin = _rope_tables(position_ids.expand(B, T), c)
        mask, enc_mask = _masks(attention_mask, B, T, past, input_ids.device)

        x = self.embed_tokens(input_ids)
        for layer in self.layers[: c.inject_layer]:
            x = layer(x, cos, sin, mask, cache=cache)
        codes, bit_logits = self._codes(x, cos, sin, enc_mask, past, latents, latent_generator)
        r = self.post_sampler(codes)
        x = self.layers[c.inject_layer](x, cos, sin, mask, kv=x + r.to(x.dtype), cache=cache)
        for layer in self.layers[c.inject_layer + 1 :]:
            x = layer(x, cos, sin, mask, cache=cache)
        return self.norm(x), codes, bit_logits


class FreeformerForCausalLM(FreeformerPreTrainedModel, GenerationMixin):
    def __init__(self, config: FreeformerConfig) -> None:
        super().__init__(config)
        self.model = FreeformerModel(config)
        # Tied embeddings: the readout reads model.embed_tokens directly (no lm_head).
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        latents: Tensor | None = None,
        latent_generator: torch.Generator | None = None,
        latent_record: list | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> FreeformerCausalLMOutput:
        """Logits of ``input_ids`` (B, T); see the module docstring for the codes used.

        ``latents``: pinned codes per position; ``latent_generator``: drives the encoder's
        and the prior's draws; ``latent_record``: a list the codes of this call are appended
        to (generate uses it to return every code it drew).
        """
        if inputs_embeds is not None:
            raise ValueError(
                "inputs_embeds is not supported: the encoder reads token ids' "
                "hidden states from the decoder; pass input_ids"
            )
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        h, codes, bit_logits = self.model(
            input_ids, attention_mask, position_ids, cache, latents, latent_generator
        )
        if latent_record is not None:
            latent_record.append(codes)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = (
            F.linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
        )
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        cache = cache if use_cache else None
        return FreeformerCausalLMOutput(
            loss=loss, logits=logits, cache=cache, codes=codes, bit_logits=bit_logits
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: Tensor | None = None,
        *,
        latents: Tensor | None = None,
        latent_generator: torch.Generator | None = None,
        return_latents: bool = False,
        **kwargs: Any,
    ):
        """transformers' ``generate`` with the paper's codes: the encoder's at prefill, a
        fresh uniform code per new token (or ``latents`` pinned per position, covering prompt
        + new tokens). ``return_latents=True`` returns ``(output, codes)``, codes (B, T) for
        every position of the output — the last one drawn but never read, as in
        freeformer's generate — so the same tokens can be reproduced from them."""
        record: list[Tensor] = []
        out = super().generate(
            inputs,
            latents=latents,
            latent_generator=latent_generator,
            latent_record=record,
            **kwargs,
        )
        if not return_latents:
            return out
        seqs = out if isinstance(out, Tensor) else out.sequences
        codes = torch.cat(record, dim=1)
        missing = seqs.shape[1] - codes.shape[1]
        if missing > 0:
            if latents is not None:
                pinned = torch.as_tensor(latents, device=codes.device).long()
                pinned = pinned[None] if pinned.dim() == 1 else pinned
                tail = pinned[:, codes.shape[1] : seqs.shape[1]].expand(codes.shape[0], -1)
            else:
                tail = torch.randint(
                    0,
                    1 << self.config.latent_bits,
                    (codes.shape[0], missing),
                    device=codes.device,
                    generator=latent_generator,
                )
            codes = torch.cat([codes, tail], dim=1)
        return out, codes


FreeformerConfig.register_for_auto_class()
FreeformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["FreeformerConfig", "FreeformerModel", "FreeformerForCausalLM"]
