"""Likelihoods of a Free Transformer, estimated by importance sampling over the latent codes.

The model defines P(S) = E_Z[P(S | Z)], Z = (Z_0, …, Z_{T−1}) one code per position, each
uniform on {0 … 2^H − 1} (paper Section 3). Given the codes the decoder is causal: the
prediction at position t reads tokens ≤ t and codes ≤ t. No likelihood is available in
closed form (2^(H·T) code sequences), so every number we report is an estimate, built here
and only here (used by validation in ``validation.evaluate`` and by the lm-eval adapter):

* **Document** log P(S), proposal the encoder over S (``posterior_log_weights``):
  Z_j ~ Q(· | S), w_j = P(S | Z_j) P(Z_j) / Q(Z_j | S), estimate log (1/K) Σ_j w_j. The mean
  of the w_j is unbiased for P(S), so the log is low on average (Jensen) and −log is an
  upper bound on −log P(S) *in expectation* — not for every draw. Consistent as K grows.
  With the prior as the proposal (``prior_log_weights``): Z_j ~ P(Z), w_j = P(S | Z_j).
* **Conditional** log P(cont | ctx) = log E_Z[P(ctx | Z) P(cont | ctx, Z)] − log E_Z[P(ctx | Z)]:
  the codes must be consistent with the context, so averaging P(cont | ctx, Z) over prior
  draws (log E_Z[P(cont | ctx, Z)]) estimates a different number. Self-normalised importance
  sampling, ``self_normalised``: with a_j = log of the draw's weight for the context and
  b_j = log P(cont | ctx, Z_j),  estimate = log Σ_j e^{a_j + b_j} − log Σ_j e^{a_j}.
  Proposals (``PROPOSALS``):
    - ``prior``: every code from the uniform prior; a_j = log P(ctx | Z_j).
    - ``encoder``: the context's codes from the encoder run over the context alone (it is
      non-causal: over context + continuation it would read the answer), the continuation's
      from the prior; a_j = log P(ctx | Z_j) + Σ_{t < n_ctx} [log P(Z_t) − log Q(Z_t | ctx)].
  Both are ratios of two unbiased estimates (of P(ctx, cont) and of P(ctx)), consistent as
  K grows, with a bias of order 1/K.

Ignored targets (``IGNORE_INDEX``) contribute no log-probability; a code after a row's last
scored target can change no scored prediction (the decoder is causal), so its P/Q factor
integrates to one and is left out (``code_mask``): a right-padded row gives the estimate of
the unpadded one. Per-token figures divide by the number of scored targets, like the
cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeformer.latent import reaching_codes, uniform_codes
from freeformer.model import IGNORE_INDEX

LOG2 = math.log(2.0)
PROPOSALS = ("prior", "encoder")


# ---------------------------------------------------------------------------------------
# Per-position pieces
# ---------------------------------------------------------------------------------------
def log_q(bit_logits: Tensor, codes: Tensor) -> Tensor:
    """log Q(Z_t = codes_t | ·) per position: Σ_h log σ(±L_{t,h}) (independent bits)."""
    bits = (codes[..., None] >> torch.arange(bit_logits.shape[-1], device=codes.device)) & 1
    L = bit_logits.float()
    return torch.where(bits.bool(), F.logsigmoid(L), F.logsigmoid(-L)).sum(-1)


def log_prior_ratio(bit_logits: Tensor, codes: Tensor) -> Tensor:
    """log P(Z_t) − log Q(Z_t) per position, P the uniform prior 2^−H."""
    return -bit_logits.shape[-1] * LOG2 - log_q(bit_logits, codes)


def token_log_probs(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, T) log P(targets_t | ·) in float32; 0 where the target is ``IGNORE_INDEX``."""
    B, T = targets.shape
    return -F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(B, T)


def scored(targets: Tensor) -> Tensor:
    return targets != IGNORE_INDEX


def code_mask(targets: Tensor) -> Tensor:
    """(B, T) bool: positions up to each row's last scored target, whose codes can matter."""
    return reaching_codes(scored(targets))


def log_mean_exp(x: Tensor, dim: int = 0) -> Tensor:
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


def self_normalised(log_w: Tensor, log_f: Tensor, dim: int = 0) -> Tensor:
    """log(Σ_j w_j f_j / Σ_j w_j) along ``dim``, from log w and log f (float64)."""
    log_w, log_f = log_w.double(), log_f.double()
    return torch.logsumexp(log_w + log_f, dim) - torch.logsumexp(log_w, dim)


# ---------------------------------------------------------------------------------------
# One forward per batch of draws
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def posterior_log_weights(
    model: nn.Module,
    tokens: Tensor,
    targets: Tensor,
    *,
    generator: torch.Generator | None = None,
    bit_noise: Tensor | None = None,
    draws: int = 1,
):
    """One draw Z ~ Q(· | tokens) per row (the encoder over the row) and its log weight
    log P(targets | tokens, Z) + log P(Z) − log Q(Z | tokens), shape (B,) float32.

    Returns (log_w, token_log_probs (B, T), model output). The encoder reads every token of
    the row, so rows must not be padded *inside* the part whose codes are scored; right
    padding with ignored targets is exact only when the encoder's view does not matter —
    callers that can, batch rows of equal length. ``draws`` = m: m draws per row in one
    forward that shares the part no code changes (``FreeTransformer.forward``); every
    output then has m·B rows, row j·B + b being draw j of row b.
    """
    out = model(tokens, generator=generator, bit_noise=bit_noise, draws=draws)
    targets = targets.repeat(draws, 1)
    lp = token_log_probs(out.logits, targets)
    ratio = log_prior_ratio(out.bit_logits, out.codes).masked_fill(~code_mask(targets), 0.0)
    return lp.sum(-1) + ratio.sum(-1), lp, out


@torch.no_grad()
def prior_log_weights(
    model: nn.Module,
    tokens: Tensor,
    targets: Tensor,
    *,
    generator: torch.Generator | None = None,
    draws: int = 1,
) -> tuple[Tensor, Tensor]:
    """One draw Z ~ P(Z) (uniform codes) per row and its log weight log P(targets | tokens, Z),
    shape (B,) float64: the prior proposal's document estimate is log (1/k) Σ_j of these
    weights' exponentials. Returns (log_w, token_log_probs (B, T)); ``draws`` as in
    ``posterior_log_weights``."""
    logits = model(tokens, latents="prior", generator=generator, draws=draws).logits
    lp = token_log_probs(logits, targets.repeat(draws, 1))
    return lp.double().sum(-1), lp


@dataclass
class DrawScores:
    """One draw of codes for each row of a conditional request (see ``conditional_scores``)."""

    log_w: Tensor
    """(B,) a_j: log P(ctx | Z) + the proposal's log P/Q over the context's codes."""
    log_cont: Tensor
    """(B,) b_j: log P(cont | ctx, Z)."""
    greedy: Tensor
    """(B,) bool: every continuation token is the argmax under these codes."""


@torch.no_grad()
def conditional_scores(
    model: nn.Module,
    tokens: Tensor,
    targets: Tensor,
    n_ctx: Tensor,
    codes: Tensor | None,
    ctx_log_ratio: Tensor | None = None,
    *,
    draws: int = 1,
) -> DrawScores:
    """Score rows whose first ``n_ctx`` tokens are the context, with pinned ``codes``.

    ``tokens`` (B, T) = context + continuation[:-1] (right-padded), ``targets`` the tokens
    shifted by one (``IGNORE_INDEX`` on padding); positions t < n_ctx − 1 predict context
    tokens, the others continuation tokens. ``ctx_log_ratio`` (B, T): log P(Z_t) − log Q(Z_t)
    for codes drawn from a proposal other than the prior (0 elsewhere), or None.
    ``codes=None``: a baseline (no latents). ``draws`` = m: ``codes`` (and
    ``ctx_log_ratio``) hold m·B rows, m draws per row scored in one forward that shares the
    part no code changes; the scores then have m·B rows (row j·B + b: draw j of row b).
    """
    logits = model(tokens, latents=codes, draws=draws).logits
    targets, n_ctx = targets.repeat(draws, 1), n_ctx.repeat(draws)
    lp = token_log_probs(logits, targets)
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    in_ctx = pos[None, :] < (n_ctx.to(tokens.device)[:, None] - 1)
    log_w = (lp * in_ctx).sum(-1)
    if ctx_log_ratio is not None:
        log_w = log_w + ctx_log_ratio.masked_fill(~code_mask(targets), 0.0).sum(-1)
    cont = scored(targets) & ~in_ctx
    hit = (logits.argmax(-1) == targets) | ~cont
    return DrawScores(log_w, (lp * cont).sum(-1), hit.all(-1))


@torch.no_grad()
def encoder_proposal(
    model: nn.Module,
    ctx: Tensor,
    bit_noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    draws: int = 1,
) -> tuple[Tensor, Tensor]:
    """Codes (B, Tc) drawn from the encoder over ``ctx`` alone (never a continuation token;
    rows of equal length, unpadded) and their log P(Z_t) − log Q(Z_t | ctx); with ``draws``
    = m, m draws per row (m·B rows, row j·B + b: draw j of row b)."""
    out = model(
        ctx,
        latents=None,
        bit_noise=bit_noise,
        generator=generator,
        last_logits_only=True,
        draws=draws,
    )
    return out.codes, log_prior_ratio(out.bit_logits, out.codes)


# ---------------------------------------------------------------------------------------
# Whole estimators over K draws (the draws of a row share one forward's first half)
# ---------------------------------------------------------------------------------------
def draw_chunks(k: int, rows: int, max_rows: int | None) -> list[int]:
    """Split k draws of ``rows`` rows into forwards of at most ``max_rows`` rows (at least one
    draw each; all k in one forward when ``max_rows`` is None): the draws per forward."""
    step = k if max_rows is None else max(1, min(k, max_rows // rows))
    return [min(step, k - s) for s in range(0, k, step)]


@torch.no_grad()
def log_likelihood(
    model: nn.Module,
    tokens: Tensor,
    targets: Tensor,
    k: int,
    *,
    generator: torch.Generator | None = None,
    max_rows: int | None = None,
) -> Tensor:
    """(B,) float64 estimate of log P(targets | tokens[:, :1]) with the encoder over each row
    as the proposal: log (1/k) Σ_j P(S | Z_j) P(Z_j) / Q(Z_j | S)."""
    B = tokens.shape[0]
    lw = torch.cat(
        [
            posterior_log_weights(model, tokens, targets, generator=generator, draws=m)[0]
            for m in draw_chunks(k, B, max_rows)
        ]
    )  # row j·B + b: draw j of sequence b
    return log_mean_exp(lw.double().view(k, B), 0)


@torch.no_grad()
def conditional_log_likelihood(
    model: nn.Module,
    tokens: Tensor,
    targets: Tensor,
    n_ctx: int,
    k: int,
    *,
    proposal: str = "encoder",
    generator: torch.Generator | None = None,
    max_rows: int | None = None,
) -> Tensor:
    """(B,) float64 estimate of log P(cont | ctx) for rows ``tokens`` = ctx + cont[:-1] of
    equal length whose first ``n_ctx`` tokens are the context (module docstring)."""
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal={proposal!r}: expected one of {', '.join(PROPOSALS)}")
    c = model.config
    B, T = tokens.shape
    codes = uniform_codes((k * B, T), c.latent_bits, tokens.device, generator)
    bounds, s = [], 0
    for m in draw_chunks(k, B, max_rows):
        bounds.append((m, s, s + m * B))
        s += m * B
    ratio = None
    if proposal == "encoder":
        ratio = torch.zeros(k * B, T, device=tokens.device)
        for m, s, e in bounds:
            enc, r = encoder_proposal(model, tokens[:, :n_ctx], generator=generator, draws=m)
            codes[s:e, :n_ctx], ratio[s:e, :n_ctx] = enc, r
    n = torch.full((B,), n_ctx, device=tokens.device)
    parts = [
        conditional_scores(
            model, tokens, targets, n, codes[s:e], None if ratio is None else ratio[s:e], draws=m
        )
        for m, s, e in bounds
    ]
    a = torch.cat([p.log_w for p in parts]).view(k, B)
    b = torch.cat([p.log_cont for p in parts]).view(k, B)
    return self_normalised(a, b, 0)


__all__ = [
    "PROPOSALS",
    "log_q",
    "log_prior_ratio",
    "token_log_probs",
    "code_mask",
    "log_mean_exp",
    "self_normalised",
    "posterior_log_weights",
    "prior_log_weights",
    "conditional_scores",
    "encoder_proposal",
    "log_likelihood",
    "conditional_log_likelihood",
    "draw_chunks",
    "DrawScores",
]
