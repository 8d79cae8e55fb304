"""Transformer building blocks shared by the decoder and the latent encoder.

Pre-norm blocks (RMSNorm) with RoPE grouped-query attention through
``F.scaled_dot_product_attention`` and a SwiGLU MLP (paper Section 3: the baseline is a
Llama-style decoder). A block may read its keys/values from a different input than its
queries: the Free Transformer's block L/2+1 takes queries from x and keys/values from x + r,
and the encoder takes queries from ζ and keys/values from x (paper Algorithm 2).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from freeformer.config import ModelConfig

# Attention backends for cached (prefill / decode) calls on CUDA. cuDNN's attention builds an
# execution plan for every new shape and caches it; decoding changes the key length at every
# step, and on an H200 that replanning cost ~65 ms per token — ten times the whole step of the
# baseline (bench/RESULTS.md, GPU section). Flash / memory-efficient kernels need no plan.
_CACHED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (bf16 sums of squares lose precision), return the input dtype.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


def llama3_inv_freq(
    inv_freq: Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_len: int,
) -> Tensor:
    """Llama 3.1's RoPE rescaling: long wavelengths (beyond the original context / low) are
    slowed by ``factor``, short ones (below original / high) kept, the band between
    interpolated linearly in original_max_len / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smooth = smooth.clamp(0.0, 1.0)  # 0 → fully scaled (low freq), 1 → kept (high freq)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_tables(
    head_dim: int, max_len: int, theta: float, llama3: tuple[float, float, float, int] | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape (max_len, head_dim // 2) for rotary embeddings.

    ``llama3``: (factor, low_freq_factor, high_freq_factor, original_max_len) of Llama 3.1's
    frequency rescaling (see :func:`llama3_inv_freq`), or None for plain RoPE.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if llama3 is not None:
        inv_freq = llama3_inv_freq(inv_freq, *llama3)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the last dim. x: (B, T, h, hd); cos/sin: (T, hd/2).

    (x1, x2) ↦ (x1·c − x2·s, x2·c + x1·s), written as x·[c, c] + roll(x)·[−s, s] with
    roll(x) = (x2, x1): three ops on whole rows instead of four on strided halves and a cat,
    1.8× faster, ~4 % of a synthetic-preset training step (bench/RESULTS.md, "Synthetic
    experiment: throughput choices")."""
    xf = x.float()
    c = torch.cat([cos, cos], dim=-1)[:, None, :]  # (T, 1, hd), broadcast over heads
    s = torch.cat([-sin, sin], dim=-1)[:, None, :]
    return torch.addcmul(xf * c, xf.roll(x.shape[-1] // 2, dims=-1), s).type_as(x)


class LayerKV:
    """Preallocated keys/values of one attention layer: (B, n_kv_heads, max_len, head_dim).

    ``pos`` is a Python int (eager decoding: attention reads the filled prefix) or a 0-dim
    long tensor on the cache's device (static decoding: every shape is fixed, so one step can
    be captured in a CUDA graph and replayed; attention then reads the whole buffer with the
    positions after ``pos`` masked)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    def update(self, pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, h, t, hd) at positions [pos, pos+t) and return the keys/values to
        attend to: those so far (int ``pos``) or the whole buffer (tensor ``pos``)."""
        t = k.shape[2]
        if isinstance(pos, Tensor):
            idx = pos + torch.arange(t, device=k.device)
            self.k.index_copy_(2, idx, k.to(self.k.dtype))
            self.v.index_copy_(2, idx, v.to(self.v.dtype))
            return self.k, self.v
        self.k[:, :, pos : pos + t] = k
        self.v[:, :, pos : pos + t] = v
        return self.k[:, :, : pos + t], self.v[:, :, : pos + t]


class KVCache:
    """Keys/values of every decoder block for a batch, plus the next write position.

    Preallocated for ``max_len`` positions; the model's forward writes each block's keys and
    values at ``pos`` and advances ``pos`` by the number of tokens it ran.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.layers = [
            LayerKV(
                torch.empty(shape, dtype=dtype, device=device),
                torch.empty(shape, dtype=dtype, device=device),
            )
            for _ in range(config.n_layers)
        ]
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        # qkv_bias: Qwen2-style biases on q, k and v (never on the output projection).
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=qkv_bias)
        # Keys and values share one matmul: they always read the same input (K rows first).
        self.wkv = nn.Linear(dim, 2 * n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        xq: Tensor,
        xkv: Tensor,
        cos: Tensor,
        sin: Tensor,
        causal: bool,
        cache: LayerKV | None = None,
        pos: int | Tensor = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """``mask`` (T, T) bool, True where query i may read key j: only without a cache and
        with ``causal=False`` (the encoder's window)."""
        B, T, _ = xq.shape
        q = self.wq(xq).view(B, T, self.n_heads, self.head_dim)
        k, v = self.wkv(xkv).view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
        if mask is not None and (cache is not None or causal):
            raise ValueError("an attention mask is for the non-causal, uncached encoder only")
        if cache is not None:
            k, v = cache.update(pos, k, v)
        S = k.shape[2]
        if isinstance(pos, Tensor):  # static cache: the whole buffer, keys after pos masked
            qpos = pos + torch.arange(T, device=xq.device)
            mask = torch.arange(S, device=xq.device)[None, :] <= qpos[:, None]
            causal = False
        elif causal and S != T:
            if T == 1:
                causal = False  # one new query attends to every cached key
            else:  # a chunk after cached positions: query i sees keys ≤ pos + i
                qi = torch.arange(pos, pos + T, device=xq.device)[:, None]
                mask = torch.arange(S, device=xq.device)[None, :] <= qi
                causal = False
        with sdpa_kernel(_CACHED_BACKENDS) if cache is not None and xq.is_cuda else nullcontext():
            y = self._attend(q, k, v, mask, causal)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        B, _, T, _ = q.shape
        g = self.n_heads // self.n_kv_heads
        if T == 1 and g > 1 and not causal:
            # One query per head: fold the g query heads that share a KV head into the query
            # axis, (B, h, 1, hd) → (B, h_kv, g, hd) (head i reads KV head i // g, as
            # enable_gqa does), so attention reads each cached K/V once and no backend needs
            # GQA support. A (1, S) mask broadcasts over the g rows.
            y = F.scaled_dot_product_attention(
                q.reshape(B, self.n_kv_heads, g, self.head_dim), k, v, attn_mask=mask
            )
            y = y.reshape(B, self.n_heads, 1, self.head_dim)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=causal,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        return y


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up in one matmul
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm Transformer block; ``kv`` (default: x) is the key/value input of attention.

    The attention norm is applied to both inputs, so with kv = x this is the ordinary block,
    and with r = 0 the Free Transformer's injection block equals the baseline's.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        hidden: int,
        eps: float,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, qkv_bias)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: Tensor | None = None,
        causal: bool = True,
        cache: LayerKV | None = None,
        pos: int | Tensor = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        h = self.attn_norm(x)
        hkv = h if kv is None else self.attn_norm(kv)
        x = x + self.attn(h, hkv, cos, sin, causal, cache, pos, mask)
        return x + self.mlp(self.mlp_norm(x))


# Elements of each (tokens × vocabulary) float32 logit chunk of linear_cross_entropy: 2^26
# (256 MiB) on a CPU, one chunk for small vocabularies. On a GPU 2^28 (1 GiB: 2048 tokens of
# a 2^17 vocabulary): each chunk adds its W gradient into a float32 (V, D) buffer, and at 512
# tokens per chunk those 8 passes over 0.8 GB made the paper-1.5b step 8 % slower than the
# unchunked loss on an H200 (bench/RESULTS.md, GPU section); 2 chunks cost ~1 ms.
_CE_CHUNK_ELEMENTS = 1 << 26
_CUDA_CE_CHUNK_ELEMENTS = 1 << 28


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` without materialising the (N, V) logits.

    The forward walks chunks of tokens: float32 logits of one chunk, their log-sum-exp, the
    loss, and already the gradients (softmax − one-hot, times the chunk's h or W), which it
    keeps for the backward — so the full-vocabulary float32 logits (4096 × 2^17 × 4 B = 2 GiB
    at the paper's 1.5B shape, plus their gradient) never exist, at no extra matmul. Under
    autocast the matmuls run in its dtype, like the readout they replace; the loss and softmax
    are float32.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        dev = h.device.type
        dt = (
            torch.get_autocast_dtype(dev)
            if torch.is_autocast_enabled(dev)
            else (torch.promote_types(h.dtype, weight.dtype))
        )
        with torch.autocast(dev, enabled=False):
            hc, W = h.to(dt), weight.to(dt)
            N, V = hc.shape[0], W.shape[0]
            valid = targets != ignore_index
            safe = torch.where(valid, targets, 0)
            n = valid.sum()
            budget = _CUDA_CE_CHUNK_ELEMENTS if h.is_cuda else _CE_CHUNK_ELEMENTS
            chunk = max(1, budget // V)
            f = torch.promote_types(dt, torch.float32)  # float32 (float64 stays float64)
            loss = torch.zeros((), dtype=f, device=h.device)
            grad_h = torch.empty_like(hc)
            grad_w = torch.zeros(W.shape, dtype=f, device=h.device)
            for a in range(0, N, chunk):
                b = min(N, a + chunk)
                logits = (hc[a:b] @ W.T).to(f)
                lse = logits.logsumexp(-1)
                t, v = safe[a:b], valid[a:b]
                loss += torch.where(v, lse - logits.gather(1, t[:, None]).squeeze(1), 0).sum()
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                p[torch.arange(b - a, device=h.device), t] -= 1
                p = p.mul_(v[:, None]).to(dt)  # ignored targets: no gradient
                torch.mm(p, W, out=grad_h[a:b])
                grad_w += (p.T @ hc[a:b]).to(f)
        ctx.save_for_backward(grad_h, grad_w, n)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_out / n
        return ((grad_h * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None, None)


def linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100
) -> Tensor:
    """``F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=...)`` (mean over
    the targets not ignored; NaN when there are none), computed in chunks of tokens so the
    full logits are never stored. h: (..., D), weight: (V, D), targets: (...)."""
    return _LinearCrossEntropy.apply(
        h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), ignore_index
    )
