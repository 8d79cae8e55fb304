"""Generation: a preallocated KV cache, prefill, one-token decode steps and sampling.

Latents per position (paper Section 3.4): prompt codes come from the encoder run once over
the prompt during prefill (``prefill="encoder"``, the paper), or from the uniform prior
(``prefill="prior"``); every new token draws a fresh uniform code; or the caller pins every
position's code (``latents``), which is how a group of samples shares one Z (Figure 4).
The encoder never runs during decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freeformer.errors import DataError
from freeformer.latent import uniform_codes
from freeformer.layers import LayerKV
from freeformer.model import FreeTransformer

PREFILL_MODES = ("encoder", "prior")


class KVCache:
    """Keys/values of every decoder block for a batch, plus the next write position."""

    def __init__(self, model: FreeTransformer, batch_size: int, max_len: int,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        c = model.config
        p = model.tok_emb.weight
        shape = (batch_size, c.n_kv_heads, max_len, c.head_dim)
        dtype, device = dtype or p.dtype, device or p.device
        self.layers = [LayerKV(torch.empty(shape, dtype=dtype, device=device),
                               torch.empty(shape, dtype=dtype, device=device))
                       for _ in range(c.n_layers)]
        self.pos = 0


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row of ``logits`` (B, V). ``temperature == 0`` is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps ≥ 1).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _validate(model: FreeTransformer, prompt: Tensor, max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, latents: Tensor | None,
              prefill: str) -> None:
    c = model.config
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise DataError(f"max_new_tokens = {max_new_tokens!r}: expected an integer ≥ 0")
    if prompt.shape[1] + max_new_tokens > c.max_seq_len:
        raise DataError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                        f"max_seq_len={c.max_seq_len}")
    if temperature < 0:
        raise DataError(f"temperature = {temperature}: expected ≥ 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise DataError(f"top_k = {top_k}: expected an integer ≥ 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise DataError(f"top_p = {top_p}: expected a number in (0, 1]")
    if prefill not in PREFILL_MODES:
        raise DataError(f"prefill = {prefill!r}: expected one of {', '.join(PREFILL_MODES)}")
    if latents is not None:
        if not c.latent:
            raise DataError("latents given to a baseline model (latent=false), which has none")
        want = prompt.shape[1] + max_new_tokens
        if latents.shape[-1] != want:
            raise DataError(f"latents cover {latents.shape[-1]} positions; expected prompt + "
                            f"max_new_tokens = {want}")


@torch.no_grad()
def generate(model: FreeTransformer, prompt: Tensor, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             latents: Tensor | None = None, prefill: str = "encoder",
             generator: torch.Generator | None = None, eos_id: int | None = None,
             return_latents: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Continue ``prompt`` (B, T0) or (T0,) by up to ``max_new_tokens`` tokens.

    ``latents`` (B or 1, T0 + max_new_tokens) pins every position's code, prompt included.
    Otherwise prompt codes follow ``prefill`` and new tokens draw uniform codes. Sequences
    that emit ``eos_id`` are padded with it; generation stops once all have. Returns the
    tokens (prompt included), and with ``return_latents`` also the codes used (B, T).
    """
    squeeze = prompt.dim() == 1
    prompt = prompt[None] if squeeze else prompt
    _validate(model, prompt, max_new_tokens, temperature, top_k, top_p, latents, prefill)
    c = model.config
    B, T0 = prompt.shape
    device = model.tok_emb.weight.device
    prompt = prompt.to(device)
    if latents is not None:
        latents = latents.to(device).long()
        latents = latents.expand(B, -1) if latents.dim() == 1 or latents.shape[0] == 1 else latents
        # Check every pinned code once here; decode steps then skip the per-call checks.
        latents = model._pinned_codes(latents, B, T0 + max_new_tokens, device)

    cache = KVCache(model, B, T0 + max_new_tokens)
    prompt_latents = latents[:, :T0] if latents is not None else (
        None if prefill == "encoder" else "prior")
    out = model(prompt, latents=prompt_latents, generator=generator, cache=cache,
                last_logits_only=True)
    all_codes = None
    if c.latent:
        # Codes for every position: the prompt's (encoder, prior or pinned), then a fresh
        # uniform draw per new token (paper Section 3.4), unless pinned by the caller.
        all_codes = latents if latents is not None else torch.cat(
            [out.codes, uniform_codes((B, max_new_tokens), c.latent_bits, device, generator)],
            dim=1)
    tokens = [prompt]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        nxt = sample(out.logits[:, -1], temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        tokens.append(nxt[:, None])
        if t == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
            break
        pos = T0 + t
        step_codes = all_codes[:, pos:pos + 1] if all_codes is not None else None
        out = model(nxt[:, None], latents=step_codes, cache=cache, last_logits_only=True,
                    check_inputs=False)  # sampled ids and checked codes are in range
    result = torch.cat(tokens, dim=1)
    if squeeze:
        result = result[0]
    if not return_latents:
        return result
    if all_codes is not None:
        all_codes = all_codes[:, :result.shape[-1]]
        if squeeze:
            all_codes = all_codes[0]
    return result, all_codes
