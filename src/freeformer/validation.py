"""Validation: the numbers a run reports on held-out batches, per scored target.

A Free Transformer has no closed-form likelihood; every estimate here is built from
``freeformer.likelihood``'s importance-sampling pieces (encoder and prior proposals), next
to the ELBO, the KL and cross-entropies with prior and encoder codes. A baseline reports
its cross-entropy.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from freeformer.diagnostics import pooled_split
from freeformer.likelihood import (
    LOG2,
    code_mask,
    draw_chunks,
    log_mean_exp,
    posterior_log_weights,
    prior_log_weights,
    scored,
    token_log_probs,
)

LOGIT_BUDGET = 1 << 27
"""Logit elements per validation forward (512 MiB in float32): bounds the draws batched."""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    *,
    latent: bool,
    n_bits: int,
    k: int,
    seed: int,
    device: torch.device,
    ctx: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
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
      information_bits, mismatch_bits
                    the KL split into I(S; Z_t) and KL(Q̄ || prior), Q̄ the mean posterior over
                    every validation token (``freeformer.diagnostics``); their sum is the
                    KL of the posteriors (kl_bits averages it over k draws of the same ones).
    Baseline: ce.
    """
    ctx = ctx if ctx is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    tot: dict[str, float] = {}
    n_tok = 0
    posteriors = []  # bit logits at the positions whose codes reach a scored target
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        n = int(scored(y).sum())
        with ctx:
            if not latent:
                vals = {"ce": -float(token_log_probs(model(x).logits, y).sum()) / n}
            else:
                weights, prior_weights, ce_prior, ce_enc = [], [], 0.0, 0.0
                # m draws per forward, sharing the first L/2 blocks and the encoder (no
                # code changes them); m bounded so the logits stay ~LOGIT_BUDGET elements.
                V = getattr(model, "module", model).config.vocab_size  # DDP wraps .module
                for m in draw_chunks(k, x.shape[0], max(1, LOGIT_BUDGET // (x.shape[1] * V))):
                    lw, lp = prior_log_weights(model, x, y, generator=gen, draws=m)
                    prior_weights.append(lw.view(m, -1))  # log P(S | Z), Z ~ P(Z)
                    ce_prior -= float(lp.sum()) / (n * k)
                    lw, lp, out = posterior_log_weights(model, x, y, generator=gen, draws=m)
                    weights.append(lw.double().view(m, -1))
                    ce_enc -= float(lp.sum()) / (n * k)
                # The posteriors are the same in every draw (rows 0..B-1: the first draw's).
                bits = out.bit_logits[: x.shape[0]]
                kl = float(out.kl_tokens[: x.shape[0]].float()[code_mask(y)].sum()) / n
                posteriors.append(bits.float()[code_mask(y)])
                log_ps = log_mean_exp(torch.cat(weights), 0)  # (B,) log P̂(S)
                log_ps_prior = log_mean_exp(torch.cat(prior_weights), 0)
                vals = {
                    "ce_prior": ce_prior,
                    "ce_encoder": ce_enc,
                    "kl_bits": kl / LOG2,
                    "elbo": ce_enc + kl,
                    "nll_is": float(-log_ps.sum()) / n,
                    "nll_is_prior": float(-log_ps_prior.sum()) / n,
                }
        for key, v in vals.items():
            tot[key] = tot.get(key, 0.0) + v * n
        n_tok += n
    model.train(was_training)
    out = {key: v / n_tok for key, v in tot.items()}
    if latent:
        # The KL split over every validation token (one aggregate: position has no fixed
        # meaning in text); information = what the codes say about the sequence.
        split = pooled_split(torch.cat(posteriors), generator=gen)
        out["information_bits"] = split["information_bits"]
        out["mismatch_bits"] = split["mismatch_bits"]
        out["is_samples"] = k
    return out


def format_val(step: int, v: dict[str, float]) -> str:
    if "ce" in v:
        return f"val step {step}: ce {v['ce']:.4f} nats/token"
    k = int(v.get("is_samples", 0))
    return (
        f"val step {step}: −log P(S)/T estimates (importance sampling, k={k}): encoder "
        f"proposal {v['nll_is']:.4f}, prior proposal {v['nll_is_prior']:.4f} nats/token | "
        f"ELBO {v['elbo']:.4f} | KL {v['kl_bits']:.4f} bits | ce(prior codes) "
        f"{v['ce_prior']:.4f} | ce(encoder codes, sees the future) {v['ce_encoder']:.4f} | "
        f"KL = information {v['information_bits']:.4f} + prior mismatch "
        f"{v['mismatch_bits']:.4f} bits"
    )
