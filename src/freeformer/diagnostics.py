"""Is the latent used? The posterior's KL split into information and prior mismatch.

Free bits bound E_S[KL(Q(Z_t | S) || P)] per token, and that KL is two different things
(Hoffman & Johnson, "ELBO surgery", 2016):

    E_S KL(Q(Z_t | S) || P) = I(S; Z_t) + KL(Q̄_t || P),      Q̄_t = E_S Q(Z_t | S)

The first term, the *information*, is what Z_t tells about the sequence: what the decoder can
use. The second, the *prior mismatch*, is how far the codes the encoder actually emits are
from the uniform codes generation draws (paper Section 3.3): KL spent on it buys nothing and
makes prior samples of Z unlike the training ones. An encoder that collapses to one
input-independent distribution has all its KL in mismatch.

Q̄ is estimated by the mean of the posteriors at hand (``kl_split``): per position over n
sequences for the synthetic task (position t means the same thing in every sequence), or
pooled over every scored token for text. Over all 2^H codes when 2^H is small enough
(``ENUMERATE_BITS``); else by sampling codes from the mixture Q̄ (an unbiased estimate of
E_Q̄ log Q̄ for the Q̄ at hand). Either way Q̄ comes from finitely many posteriors, which biases
the mismatch up (and the information down) when the posteriors are sharp and few against the
codes they reach; the number of posteriors is returned so a reader can judge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from freeformer.latent import bit_matrix, kl_per_token

LOG2 = 0.6931471805599453
# Enumerate all 2^H codes up to H = 16 (65,536 codes), in chunks of _CODE_CHUNK.
ENUMERATE_BITS = 16
_CODE_CHUNK = 256
# Codes drawn from Q̄ per aggregate when H is larger, and posteriors scored per chunk.
MISMATCH_SAMPLES = 4096
_ROW_CHUNK = 4096


def _log_bits(L: Tensor) -> tuple[Tensor, Tensor]:
    return F.logsigmoid(L), F.logsigmoid(-L)  # log Q(bit = 1), log Q(bit = 0)


def _mismatch_enumerated(L: Tensor) -> Tensor:
    """KL(Q̄_t || uniform) in nats for each t, over all 2^H codes; L is (n, T, H)."""
    n, T, H = L.shape
    lp, lq = _log_bits(L.reshape(n * T, H))
    out = torch.zeros(T, dtype=L.dtype, device=L.device)
    bits = bit_matrix(H, L.dtype, L.device)  # (2^H, H)
    for c0 in range(0, 1 << H, _CODE_CHUNK):
        b = bits[c0 : c0 + _CODE_CHUNK]
        q = (lp @ b.T + lq @ (1 - b).T).exp().reshape(n, T, -1)  # Q(code | S_i) per position
        agg = q.mean(0)  # (T, chunk): Q̄_t on these codes
        out += (agg * (agg.clamp_min(1e-300).log() + H * LOG2)).sum(-1)
    return out


def _mismatch_sampled(L: Tensor, samples: int, generator: torch.Generator | None) -> Tensor:
    """E_{z ~ Q̄_t}[log Q̄_t(z)] + H log 2 per t, by ``samples`` draws of z from the mixture."""
    n, T, H = L.shape
    out = torch.empty(T, dtype=L.dtype, device=L.device)
    for t in range(T):
        Lt = L[:, t]  # (n, H)
        who = torch.randint(0, n, (samples,), generator=generator, device=L.device)
        u = torch.rand(samples, H, generator=generator, device=L.device, dtype=L.dtype)
        z = (u < torch.sigmoid(Lt[who])).to(L.dtype)  # (samples, H): z ~ Q̄_t
        lp, lq = _log_bits(Lt)
        log_agg = torch.empty(samples, dtype=L.dtype, device=L.device)
        for s0 in range(0, samples, _ROW_CHUNK):
            zs = z[s0 : s0 + _ROW_CHUNK]
            lqz = zs @ lp.T + (1 - zs) @ lq.T  # (chunk, n): log Q(z | S_i)
            log_agg[s0 : s0 + _ROW_CHUNK] = torch.logsumexp(lqz, 1) - torch.log(
                torch.tensor(float(n), dtype=L.dtype)
            )
        out[t] = log_agg.mean() + H * LOG2
    return out


@torch.no_grad()
def kl_split(
    bit_logits: Tensor,
    *,
    samples: int = MISMATCH_SAMPLES,
    generator: torch.Generator | None = None,
    enumerate_bits: int = ENUMERATE_BITS,
) -> dict[str, Tensor]:
    """Split the posterior's KL to the uniform prior, per position, in bits.

    ``bit_logits`` (n, T, H): the encoder's logits for n sequences; Q̄_t is the mean of the n
    posteriors at position t (reshape to (N, 1, H) to pool N tokens into one aggregate).
    Returns (T,) float64 tensors ``kl`` (mean over sequences of KL(Q(Z_t | S) || uniform)),
    ``mismatch`` (KL(Q̄_t || uniform)) and ``information`` = kl − mismatch (I(S; Z_t) under the
    empirical distribution of the n sequences). Exact over the 2^H codes for H ≤
    ``enumerate_bits``, else estimated with ``samples`` codes drawn from Q̄_t (``generator``).
    """
    L = bit_logits.detach().double()
    if L.dim() != 3:
        raise ValueError(f"bit_logits must be (n, T, H), got {tuple(L.shape)}")
    kl = kl_per_token(L).mean(0)  # nats
    if L.shape[-1] <= enumerate_bits:
        mismatch = _mismatch_enumerated(L)
    else:
        mismatch = _mismatch_sampled(L, samples, generator)
    return {"kl": kl / LOG2, "mismatch": mismatch / LOG2, "information": (kl - mismatch) / LOG2}


def pooled_split(bit_logits: Tensor, mask: Tensor | None = None, **kw) -> dict[str, float]:
    """``kl_split`` with one aggregate over every token of ``bit_logits`` (..., H) where
    ``mask`` (...) is true: for text, where position t has no fixed meaning. Means in bits,
    plus ``tokens``, the number of posteriors the aggregate was estimated from."""
    L = bit_logits.reshape(-1, bit_logits.shape[-1])
    if mask is not None:
        L = L[mask.reshape(-1)]
    s = kl_split(L[:, None], **kw)
    return {
        "kl_bits": float(s["kl"][0]),
        "information_bits": float(s["information"][0]),
        "mismatch_bits": float(s["mismatch"][0]),
        "tokens": int(L.shape[0]),
    }
