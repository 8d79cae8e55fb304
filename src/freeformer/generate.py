"""Generation: prefill, one-token decode steps, the streaming decode loop and sampling.

Latents per position (paper Section 3.4): prompt codes come from the encoder run once over
the prompt during prefill (``prefill="encoder"``, the paper), or from the uniform prior
(``prefill="prior"``); every new token draws a fresh uniform code; or the caller pins every
position's code (``latents``), which is how a group of samples shares one Z (Figure 4).
The encoder never runs during decoding.

Structure (as gpt-fast's ``prefill`` / ``decode_one_token`` / ``decode_n_tokens``):
:func:`prefill_prompt` runs the prompt into a :class:`~freeformer.layers.KVCache`;
:func:`decode_one` is one step (the function to compile, or to give a static cache, later);
:func:`decode_stream` is the one decode loop, an iterator with per-row stopping, used by
:func:`generate` and by the lm-eval adapter (``evaluation/lm_eval_model.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from freeformer.errors import DataError
from freeformer.latent import check_codes, uniform_codes
from freeformer.layers import KVCache
from freeformer.model import FreeTransformer, ModelOutput
from freeformer.static_decode import StaticDecodeStep

PREFILL_MODES = ("encoder", "prior")
EOS_CHECK_EVERY = 16
"""Decode steps between the host syncs that ask whether every row has emitted EOS."""


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
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


def _validate(
    model: FreeTransformer,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    latents: Tensor | None,
    prefill: str,
) -> None:
    c = model.config
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise DataError(f"max_new_tokens = {max_new_tokens!r}: expected an integer ≥ 0")
    if prompt.shape[1] + max_new_tokens > c.max_seq_len:
        raise DataError(
            f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={c.max_seq_len}"
        )
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
            raise DataError(
                f"latents cover {latents.shape[-1]} positions; expected prompt + "
                f"max_new_tokens = {want}"
            )


def new_cache(model: FreeTransformer, batch_size: int, max_len: int) -> KVCache:
    """An empty KV cache for ``model``, in its parameters' dtype and on their device."""
    p = model.tok_emb.weight
    return KVCache(model.config, batch_size, max_len, dtype=p.dtype, device=p.device)


def prefill_prompt(
    model: FreeTransformer,
    prompt: Tensor,
    cache: KVCache,
    latents: Tensor | str | None = None,
    *,
    generator: torch.Generator | None = None,
    bit_noise: Tensor | None = None,
) -> ModelOutput:
    """Run ``prompt`` (B, T0) into an empty ``cache``; the output holds the last position's
    logits and the prompt's codes. ``latents``: None (encoder over the prompt), "prior" or
    the prompt's codes, as in ``FreeTransformer.forward``."""
    return model(
        prompt,
        latents=latents,
        generator=generator,
        bit_noise=bit_noise,
        cache=cache,
        last_logits_only=True,
    )


def decode_one(
    model: FreeTransformer, tokens: Tensor, cache: KVCache, codes: Tensor | None = None
) -> Tensor:
    """One decode step: feed ``tokens`` (B,) at ``cache.pos`` with their ``codes`` (B, 1)
    (None for a baseline) and return the next logits (B, V).

    No id-range checks (each costs a host sync): sampled ids are in range by construction
    and callers check pinned codes once, up front.
    """
    out = model(
        tokens[:, None], latents=codes, cache=cache, last_logits_only=True, check_inputs=False
    )
    return out.logits[:, -1]


def decode_stream(
    model: FreeTransformer,
    logits: Tensor,
    cache: KVCache,
    max_new_tokens: int,
    pick: Callable[[Tensor], Tensor],
    *,
    codes: Tensor | None = None,
    finished: Tensor | None = None,
    check_every: int = 1,
    static: bool = False,
) -> Iterator[Tensor]:
    """The decode loop: yield the next tokens (B,), up to ``max_new_tokens`` times.

    ``logits`` (B, V) are the prefill's last; ``pick`` turns logits into tokens (sampling
    or argmax). ``codes`` (B, ≥ cache.pos + max_new_tokens) give every new position's code
    (None for a baseline). Per-row stopping: ``finished`` (B,) bool is the caller's, who sets
    a row once it is done, between steps; the loop ends early once every row is (the model
    still runs finished rows, whose tokens the caller ignores). Asking is a host sync, so it
    is asked every ``check_every`` steps: up to ``check_every − 1`` steps may run after every
    row is done. No step runs after the last token is yielded.

    ``static=True``: the steps run at fixed shapes (:class:`~freeformer.static_decode.
    StaticDecodeStep`), replayed as one CUDA graph each on a GPU — no host sync, no per-kernel
    launch from Python. The cache then holds its position on the device.
    """
    start = int(cache.pos)
    step = None
    if static and max_new_tokens > 1:
        step = StaticDecodeStep(model, cache, logits.shape[0], graph=logits.device.type == "cuda")
    for t in range(max_new_tokens):
        nxt = pick(logits)
        yield nxt
        if t == max_new_tokens - 1:
            return
        if finished is not None and (t + 1) % check_every == 0 and bool(finished.all()):
            return
        pos = start + t
        step_codes = codes[:, pos : pos + 1] if codes is not None else None
        logits = (
            step(nxt[:, None], step_codes)
            if step is not None
            else decode_one(model, nxt, cache, step_codes)
        )


@torch.no_grad()
def generate(
    model: FreeTransformer,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    latents: Tensor | None = None,
    prefill: str = "encoder",
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    return_latents: bool = False,
    static: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Continue ``prompt`` (B, T0) or (T0,) by up to ``max_new_tokens`` tokens.

    ``latents`` (B or 1, T0 + max_new_tokens) pins every position's code, prompt included.
    Otherwise prompt codes follow ``prefill`` and new tokens draw uniform codes. Sequences
    that emit ``eos_id`` are padded with it; generation stops once all have. Returns the
    tokens (prompt included), and with ``return_latents`` also the codes used (B, T).

    ``static=True`` decodes at fixed shapes, one CUDA-graph replay per token on a GPU (the
    fast path for small batches there; see :func:`decode_stream`). The tokens are those of
    eager decoding up to the rounding of attention over the masked full cache.
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
        latents = check_codes(latents, c.latent_bits, B, T0 + max_new_tokens, device)

    cache = new_cache(model, B, T0 + max_new_tokens)
    prompt_latents = (
        latents[:, :T0] if latents is not None else (None if prefill == "encoder" else "prior")
    )
    out = prefill_prompt(model, prompt, cache, prompt_latents, generator=generator)
    all_codes = None
    if c.latent:
        # Codes for every position: the prompt's (encoder, prior or pinned), then a fresh
        # uniform draw per new token (paper Section 3.4), unless pinned by the caller.
        all_codes = (
            latents
            if latents is not None
            else torch.cat(
                [out.codes, uniform_codes((B, max_new_tokens), c.latent_bits, device, generator)],
                dim=1,
            )
        )
    tokens = [prompt]
    # Only an EOS can finish a row early.
    finished = torch.zeros(B, dtype=torch.bool, device=device) if eos_id is not None else None
    for nxt in decode_stream(
        model,
        out.logits[:, -1],
        cache,
        max_new_tokens,
        lambda logits: sample(logits, temperature, top_k, top_p, generator),
        codes=all_codes,
        finished=finished,
        check_every=EOS_CHECK_EVERY,
        static=static,
    ):
        if finished is not None:  # finished rows are padded with eos_id
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        tokens.append(nxt[:, None])
    result = torch.cat(tokens, dim=1)
    if eos_id is not None and result.shape[1] > T0:
        # End where every row had emitted eos_id: steps run after that (EOS is checked only
        # every EOS_CHECK_EVERY steps) only padded finished rows.
        done = (result[:, T0:] == eos_id).cummax(dim=1).values.all(dim=0)
        if bool(done.any()):
            result = result[:, : T0 + 1 + int(done.int().argmax())]
    if squeeze:
        result = result[0]
    if not return_latents:
        return result
    if all_codes is not None:
        all_codes = all_codes[:, : result.shape[-1]]
        if squeeze:
            all_codes = all_codes[0]
    return result, all_codes
