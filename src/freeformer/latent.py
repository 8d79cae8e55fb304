"""The latent path of the Free Transformer (paper Section 3, Algorithm 2).

Encoder (non-causal blocks queried by a learned constant ζ, reading block L/2's output),
binary mapper (H Bernoulli bits → one of 2^H codes, with the paper's Eq. 8 gradient),
post-sampler (2^H × D table, or a linear map of ±1 bits as an ablation), the per-token KL
to the uniform prior in closed form, and the token-wise free-bits hinge.

Notation: L_{t,h} are the bit logits, p = σ(L), code d = Σ_h 2^h B_h (bit h has weight 2^h),
G_{t,d} = Π_h σ(±L_{t,h}) the probability of code d under independent bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeformer.errors import DataError
from freeformer.layers import Block, RMSNorm

# Budget, in elements, of each (tokens × codes) work buffer of the mapper backward. Three
# such buffers live at once, so 2^20 elements (4 MiB in float32) keep the extra memory far
# below the 64 MiB target at any N, H, D, while each matmul stays large enough to be fast.
_CHUNK_ELEMENTS = 1 << 20
_CODE_CHUNK_BITS = 10  # 1024 codes per chunk: W_j (1024 × D) is reused by every token row
# On a GPU the ~13 small kernels per chunk, not the GEMMs, set the time at the CPU's sizes
# (256 chunks per backward at T 4096, H 16): 4096 codes × 4096 tokens per chunk (64 MiB per
# float32 buffer, small next to a GPU step's activations) cut that to 16 chunks.
_CUDA_CHUNK_ELEMENTS = 1 << 24
_CUDA_CODE_CHUNK_BITS = 12


def mapper_chunks(n_tokens: int, n_bits: int, device: torch.device) -> tuple[int, int]:
    """(k, nt): the mapper backward's chunks, 2^k codes × nt tokens, on ``device``."""
    cuda = torch.device(device).type == "cuda"
    k = min(n_bits, _CUDA_CODE_CHUNK_BITS if cuda else _CODE_CHUNK_BITS)
    budget = _CUDA_CHUNK_ELEMENTS if cuda else _CHUNK_ELEMENTS
    return k, max(1, min(n_tokens, budget >> k))


# ---------------------------------------------------------------------------------------
# Codes and bits
# ---------------------------------------------------------------------------------------
def bit_matrix(
    n_bits: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """(2^n_bits, n_bits) matrix whose row d holds the bits of d (bit h has weight 2^h)."""
    d = torch.arange(1 << n_bits, device=device)
    return ((d[:, None] >> torch.arange(n_bits, device=device)) & 1).to(dtype)


def codes_to_bits(codes: Tensor, n_bits: int) -> Tensor:
    """Integer codes (...) → {0, 1} float bits (..., n_bits)."""
    return ((codes[..., None] >> torch.arange(n_bits, device=codes.device)) & 1).float()


def sample_codes(
    bit_logits: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> Tensor:
    """Draw B_h ~ Bernoulli(σ(L_h)) independently and return d = Σ_h 2^h B_h (int64).

    ``noise``: optional uniforms in [0, 1) of the logits' shape to use instead of fresh draws.
    """
    p = torch.sigmoid(bit_logits.detach().float())
    u = torch.rand(p.shape, generator=generator, device=p.device) if noise is None else noise
    bits = (u < p).long()
    weights = 1 << torch.arange(bit_logits.shape[-1], device=p.device)
    return (bits * weights).sum(-1)


def uniform_codes(
    shape: tuple[int, ...],
    n_bits: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Codes from the uniform prior P(Z_t) = 2^-H, independently per position."""
    return torch.randint(0, 1 << n_bits, shape, device=device, generator=generator)


def check_codes(
    codes: Tensor,
    n_bits: int,
    batch_size: int,
    length: int,
    device: torch.device | str | None = None,
    values: bool = True,
) -> Tensor:
    """Caller-given codes (B, T) or (T,) as int64 (B, T) on ``device``; a wrong dtype, shape
    or a code outside [0, 2^H) is a :class:`~freeformer.errors.DataError`.

    ``values=False`` skips the range check (a host sync) for codes already checked, as
    generation's decode steps are.
    """
    if codes.dtype not in (torch.int64, torch.int32):
        raise DataError(f"latent codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 1:
        codes = codes.expand(batch_size, -1)
    if tuple(codes.shape) != (batch_size, length):
        raise DataError(
            f"latent codes have shape {tuple(codes.shape)}; expected "
            f"({batch_size}, {length}) or ({length},)"
        )
    if values and not torch.compiler.is_compiling():
        n_codes = 1 << n_bits
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= n_codes:
            raise DataError(
                f"latent code {hi if hi >= n_codes else lo} is outside [0, 2^H={n_codes})"
            )
    return codes.to(device=device, dtype=torch.long)


# ---------------------------------------------------------------------------------------
# Binary mapper with the exact Eq. 8 gradient, never materialising tokens × 2^H
# ---------------------------------------------------------------------------------------
def _mapper_logit_grad(
    bit_logits: Tensor, table: Tensor, grad_r: Tensor, matmul_dtype: torch.dtype | None = None
) -> Tensor:
    """d loss / d L for r = W^T (Y + G − sg(G)), computed in chunks.

    For one token, with s_d = <W_d, dr> and u_d = s_d G_d, the exact gradient is
        dL_h = Σ_d u_d (b_h(d) − p_h) = Σ_{d: b_h(d)=1} u_d − p_h Σ_d u_d.
    Codes are split as d = j·2^k + c (k low bits c, high bits j), so G factorises as
    G_d = G_low(c) · g_high(j). Per code chunk j: S = dr W_j^T, U = S ⊙ G_low, and one thin
    matmul U @ [bits_low | 1] yields the low-bit sums and the chunk total, both then scaled
    by g_high(j); the high-bit sums follow from the chunk totals. Everything is float32 (or float64 when
    the inputs are), and G is formed as exp(log G) from log-sigmoids, so bf16 training
    never underflows G. Work: 2·N·2^H·D FLOPs (the S matmuls) + O(N·2^H·(k+1)).

    ``matmul_dtype`` (bf16 when the forward ran under bf16 autocast): only the S = dr W_j^T
    products use it, the table cast one code chunk at a time — the same trade as a bf16 LM
    head (relative error ~2^-8 on s_d); G, the sums and the result stay float32.
    """
    N, H = bit_logits.shape
    f = torch.promote_types(bit_logits.dtype, torch.float32)
    f = torch.promote_types(f, table.dtype)
    dev = bit_logits.device
    k, nt = mapper_chunks(N, H, dev)
    C, J = 1 << k, 1 << (H - k)

    L = bit_logits.to(f)
    log_p, log_q = F.logsigmoid(L), F.logsigmoid(-L)  # log σ(L), log σ(−L)
    p = torch.sigmoid(L)
    bl = bit_matrix(k, f, dev)  # (C, k)
    bl_sel = torch.cat([bl, 1 - bl], dim=1)  # (C, 2k): picks log p or log q
    bl_sum = torch.cat([bl, torch.ones(C, 1, dtype=f, device=dev)], dim=1)  # (C, k+1)
    bh = bit_matrix(H - k, f, dev)  # (J, H−k)
    bh_sel = torch.cat([bh, 1 - bh], dim=1)  # (J, 2(H−k))
    low = matmul_dtype is not None and matmul_dtype != f
    W = table if low else table.to(f)
    dr = grad_r.to(matmul_dtype if low else f)

    # Work buffers reused by every chunk (fresh 4 MiB blocks per chunk cost page faults).
    S_buf = torch.empty(nt, C, dtype=f, device=dev)
    S16_buf = torch.empty(nt, C, dtype=matmul_dtype, device=dev) if low else None
    R_buf = torch.empty(nt, k + 1, dtype=f, device=dev)
    out = torch.empty(N, H, dtype=f, device=dev)
    for t0 in range(0, N, nt):
        t1 = min(N, t0 + nt)
        n = t1 - t0
        lo = torch.cat([log_p[t0:t1, :k], log_q[t0:t1, :k]], dim=1)  # (n, 2k)
        hi = torch.cat([log_p[t0:t1, k:], log_q[t0:t1, k:]], dim=1)  # (n, 2(H−k))
        G_low = (lo @ bl_sel.T).exp_()  # (n, C)
        g_high = (hi @ bh_sel.T).exp_()  # (n, J)
        g = dr[t0:t1]
        S, R = S_buf[:n], R_buf[:n]
        S16 = S16_buf[:n] if low else None
        low_sums = torch.zeros(n, k + 1, dtype=f, device=dev)
        totals = torch.empty(n, J, dtype=f, device=dev)
        for j in range(J):
            if low:  # (CPU matmuls cannot return float32 from bf16 operands)
                torch.mm(g, W[j * C : (j + 1) * C].to(matmul_dtype).T, out=S16)
                S.copy_(S16)
            else:
                torch.mm(g, W[j * C : (j + 1) * C].T, out=S)  # s_d, d in chunk j
            torch.mm(S.mul_(G_low), bl_sum, out=R)  # Σ_c s_d G_low [b | 1]
            # g_high(j) is one scalar per token for the whole chunk: apply it to the
            # (n, k+1) reduction rather than to the (n, D) rows before the GEMM.
            low_sums.addcmul_(R, g_high[:, j : j + 1])
            totals[:, j] = R[:, k]
        totals.mul_(g_high)  # Σ_{d in chunk j} u_d
        high_sums = totals @ bh  # (n, H−k)
        total = low_sums[:, k:]  # Σ_d u_d
        out[t0:t1] = torch.cat([low_sums[:, :k], high_sums], dim=1) - p[t0:t1] * total
    return out


class _BinaryMapper(torch.autograd.Function):
    """Forward: r = W[d] (a row lookup). Backward: the gradient of W^T (Y + G − sg(G))."""

    @staticmethod
    def forward(ctx, bit_logits: Tensor, table: Tensor, codes: Tensor) -> Tensor:
        ctx.save_for_backward(bit_logits, table, codes)
        # Under low-precision autocast the rest of the model's matmuls are bf16: so are the
        # mapper backward's S products (the autocast state is gone by backward time).
        dev = table.device.type
        ctx.matmul_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return F.embedding(codes, table)

    @staticmethod
    def backward(ctx, grad_r: Tensor):
        bit_logits, table, codes = ctx.saved_tensors
        H, D = bit_logits.shape[-1], table.shape[1]
        g = grad_r.reshape(-1, D)
        grad_logits = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_logits = _mapper_logit_grad(bit_logits.reshape(-1, H), table, g, ctx.matmul_dtype)
            grad_logits = grad_logits.to(bit_logits.dtype).view_as(bit_logits)
        if ctx.needs_input_grad[1]:
            # G − sg(G) is exactly 0 in the forward value, so only the one-hot reaches W.
            grad_table = torch.zeros_like(table).index_add_(0, codes.reshape(-1), g.to(table.dtype))
        return grad_logits, grad_table, None


def binary_mapper(
    bit_logits: Tensor,
    table: Tensor,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample codes from the bit logits and embed them with the paper's Eq. 8 gradient.

    bit_logits: (..., H); table: (2^H, D). Returns ``(r, codes)`` with r: (..., D) equal to
    ``table[codes]`` in value, and gradients to both inputs equal to those of the dense
    ``(one_hot(codes) + G − G.detach()) @ table`` — without ever allocating tokens × 2^H.
    """
    H = bit_logits.shape[-1]
    if table.shape[0] != 1 << H:
        raise ValueError(f"table has {table.shape[0]} rows; 2^H = {1 << H} for H = {H} bit logits")
    codes = sample_codes(bit_logits, generator, noise)
    return _BinaryMapper.apply(bit_logits, table, codes), codes


# ---------------------------------------------------------------------------------------
# KL to the uniform prior and free bits (paper Eq. 4–5)
# ---------------------------------------------------------------------------------------
def kl_per_token(bit_logits: Tensor) -> Tensor:
    """KL(Q(Z_t | S) || uniform) in nats, in closed form: Σ_h (log 2 − h_b(σ(L_{t,h}))).

    Q factorises over bits and the uniform prior over 2^H codes is uniform over each bit,
    so the KL is a sum of per-bit terms. Computed in float32 from log-sigmoids (stable for
    large |L|; float64 logits stay float64, for the diagnostics). Shape: bit_logits (..., H)
    → (...).
    """
    L = bit_logits.to(torch.promote_types(bit_logits.dtype, torch.float32))
    p = torch.sigmoid(L)
    entropy = -(p * F.logsigmoid(L) + (1 - p) * F.logsigmoid(-L))
    return (math.log(2.0) - entropy).sum(-1)


def reaching_codes(scored: Tensor) -> Tensor:
    """(B, T) bool: positions up to each row's last scored target.

    Given the codes the decoder is causal, so the code at position t reaches every
    prediction ≥ t: exactly these positions' codes can change a scored token. Their KL
    belongs to the ELBO of the scored tokens even where their own target is ignored (a
    masked prompt); leaving it out would let the encoder hide the answer in the prompt's
    codes at no cost. Codes after the last scored target reach nothing and are left out.
    """
    return scored.flip(-1).int().cumsum(-1).flip(-1) > 0


def token_mean(values: Tensor, scored: Tensor | None = None) -> Tensor:
    """Per-token ``values`` summed over the positions whose code reaches a scored target
    (:func:`reaching_codes`) and divided by the number of scored targets — the
    cross-entropy's normalisation, so that ce + kl is the per-scored-token ELBO and padding
    never dilutes a term. All positions when ``scored`` is None. Like ``F.cross_entropy``,
    it is NaN when no position is scored."""
    if scored is None:
        return values.mean()
    return torch.where(reaching_codes(scored), values, 0).sum() / scored.sum()


def bit_balance_kl(bit_logits: Tensor) -> Tensor:
    """Σ_h KL(q̄_h || ½) in nats, q̄_h = the mean over every position of P(bit h = 1): how far
    each bit's *aggregate* is from the uniform prior's. A lower bound on the prior mismatch
    KL(Q̄ || uniform) (it ignores correlations between bits), cheap at any H. Used only by
    the opt-in ``train.code_balance_weight`` (not the paper's objective): it is 0 when the
    codes are spread evenly over tokens and H·log 2 when every token gets the same code —
    the collapse docs/latent-study.md measured."""
    q = torch.sigmoid(bit_logits.float()).reshape(-1, bit_logits.shape[-1]).mean(0)
    q = q.clamp(1e-6, 1 - 1e-6)
    return (q * torch.log(2 * q) + (1 - q) * torch.log(2 * (1 - q))).sum()


def free_bits_loss(kl_tokens: Tensor, kappa_nats: float, scored: Tensor | None = None) -> Tensor:
    """Token-wise free bits: (1/T) Σ_t max(0, KL_t − κ), normalised like the KL (see
    :func:`token_mean`). No β, no schedule (paper Section 3.3)."""
    return token_mean((kl_tokens - kappa_nats).clamp(min=0), scored)


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------
class LatentEncoder(nn.Module):
    """Non-causal blocks whose queries are a learned constant ζ and whose keys/values are x.

    ζ is the same for every position, but RoPE rotates the queries by their position, so
    the attention pattern — hence the posterior — differs by position (a ζ without position
    would give every token the same Q). Output: H bit logits per position. ``window`` W > 0
    (``ModelConfig.encoder_window``, an opt-in variant) masks position t's attention to keys
    t … t+W.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        hidden: int,
        eps: float,
        n_blocks: int,
        n_bits: int,
        qkv_bias: bool = False,
        window: int = 0,
    ) -> None:
        super().__init__()
        self.window = window  # 0: the paper (every position); W: positions t … t+W only
        self.zeta = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, n_kv_heads, hidden, eps, qkv_bias) for _ in range(n_blocks)
        )
        self.norm = RMSNorm(dim, eps)
        self.readout = nn.Linear(dim, n_bits, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        h = self.zeta.to(x.dtype).expand_as(x)
        mask = None
        if self.window:  # opt-in variant (ModelConfig.encoder_window): keys t … t+W
            d = torch.arange(x.shape[1], device=x.device)
            d = d[None, :] - d[:, None]
            mask = (d >= 0) & (d <= self.window)
        for block in self.blocks:
            # Every encoder block reads the decoder's x; its queries carry the encoder state.
            h = block(h, cos, sin, kv=x, causal=False, mask=mask)
        return self.readout(self.norm(h))


class PostSampler(nn.Module):
    """Code → D-vector r. "table": the paper's linear map of the one-hot (a 2^H × D table).
    "bits": r = W_b (2B − 1), linear in ±1 bits — an ablation with H × D parameters."""

    def __init__(self, dim: int, n_bits: int, kind: str) -> None:
        super().__init__()
        self.kind, self.n_bits = kind, n_bits
        shape = (1 << n_bits, dim) if kind == "table" else (dim, n_bits)
        self.weight = nn.Parameter(torch.zeros(shape))
        # A multiplier on r set only by training's latent warm-up (train.latent_ramp_steps);
        # 1 everywhere else. A float, not a buffer: checkpoints hold the paper's r.
        self.r_scale = 1.0

    def sample(
        self, bit_logits: Tensor, generator: torch.Generator | None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Posterior sample with the Eq. 8 gradient to the bit logits; returns (r, codes)."""
        if self.kind == "table":
            return binary_mapper(bit_logits, self.weight, generator, noise)
        codes = sample_codes(bit_logits, generator, noise)
        # For r linear in the bits, Σ_d G_d r(d) = W_b (2p − 1): Eq. 8's G − sg(G) term then
        # contributes exactly the gradient of the mean, so this is the same estimator.
        mean = (
            2 * torch.sigmoid(bit_logits.to(torch.promote_types(bit_logits.dtype, torch.float32)))
            - 1
        )
        s = 2 * codes_to_bits(codes, self.n_bits) - 1 + mean - mean.detach()
        return F.linear(s.to(self.weight.dtype), self.weight), codes

    def embed(self, codes: Tensor) -> Tensor:
        """r for given codes (prior draws or pinned codes); no gradient path to any encoder."""
        if self.kind == "table":
            return F.embedding(codes, self.weight)
        return F.linear(
            2 * codes_to_bits(codes, self.n_bits).to(self.weight.dtype) - 1, self.weight
        )
