"""The latent path against brute-force references (paper Eq. 4, 5, 8)."""

import math

import pytest
import torch
import torch.nn.functional as F
from dense_reference import check_mapper_against_dense_float64, dense_mapper

import freeformer.latent as latent
from freeformer.latent import (
    PostSampler,
    binary_mapper,
    bit_matrix,
    codes_to_bits,
    free_bits_loss,
    kl_per_token,
    sample_codes,
    uniform_codes,
)


@pytest.mark.parametrize("H,N,D", [(3, 5, 4), (6, 17, 8), (12, 9, 5)])
def test_mapper_matches_dense_formulation_float64(H, N, D, monkeypatch):
    # Small chunk budgets force several token chunks and several code chunks.
    monkeypatch.setattr(latent, "_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(latent, "_CODE_CHUNK_BITS", 2)
    g = torch.Generator().manual_seed(H)
    logits = (3 * torch.randn(N, H, generator=g, dtype=torch.float64)).requires_grad_()
    table = torch.randn(1 << H, D, generator=g, dtype=torch.float64).requires_grad_()
    r, codes = binary_mapper(logits, table, torch.Generator().manual_seed(1))
    assert torch.equal(r, table[codes])  # forward is a row lookup
    w = torch.randn(N, D, generator=g, dtype=torch.float64)
    gl, gt = torch.autograd.grad((r * w).sum(), (logits, table))

    logits2 = logits.detach().clone().requires_grad_()
    table2 = table.detach().clone().requires_grad_()
    r2 = dense_mapper(logits2, table2, codes)
    torch.testing.assert_close(r2, r.detach(), rtol=0, atol=1e-12)
    gl2, gt2 = torch.autograd.grad((r2 * w).sum(), (logits2, table2))
    torch.testing.assert_close(gl, gl2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gt, gt2, rtol=1e-10, atol=1e-12)


def test_mapper_gradient_batched_shape_and_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 8, generator=g).requires_grad_()
    table = torch.randn(256, 16, generator=g).requires_grad_()
    r, codes = binary_mapper(logits, table, g)
    assert r.shape == (2, 7, 16) and codes.shape == (2, 7)
    w = torch.randn(2, 7, 16, generator=g)
    (r * w).sum().backward()
    l64 = logits.detach().double().requires_grad_()
    t64 = table.detach().double().requires_grad_()
    (dense_mapper(l64, t64, codes) * w.double()).sum().backward()
    torch.testing.assert_close(logits.grad, l64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(table.grad, t64.grad.float())


def test_mapper_gradient_no_underflow_for_extreme_logits():
    # |L| = 60: per-code probabilities reach e^-960, far below float32's range; the
    # gradient must stay finite and match the float64 dense reference.
    H = 16
    g = torch.Generator().manual_seed(3)
    logits = (60 * torch.randn(4, H, generator=g).sign()).requires_grad_()
    table = torch.randn(1 << H, 8, generator=g).requires_grad_()
    r, codes = binary_mapper(logits, table, g)
    w = torch.randn(4, 8, generator=g)
    (r * w).sum().backward()
    assert torch.isfinite(logits.grad).all()
    l64 = logits.detach().double().requires_grad_()
    (dense_mapper(l64, table.detach().double(), codes) * w.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), l64.grad, rtol=1e-4, atol=1e-20)


def test_kl_matches_enumeration():
    H = 5
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(6, H, generator=g, dtype=torch.float64)
    bits = bit_matrix(H, torch.float64)
    logQ = F.logsigmoid(logits) @ bits.T + F.logsigmoid(-logits) @ (1 - bits).T  # (6, 32)
    brute = (logQ.exp() * (logQ - math.log(2**-H))).sum(-1)  # Σ_z Q log(Q / P)
    torch.testing.assert_close(kl_per_token(logits).double(), brute, rtol=1e-5, atol=1e-6)
    assert kl_per_token(torch.zeros(3, H)).abs().max() < 1e-6  # uniform posterior
    assert kl_per_token(torch.full((1, H), 50.0)).item() == pytest.approx(H * math.log(2), rel=1e-4)


def test_free_bits_hinge():
    kl = torch.tensor([0.1, 0.4, 1.0, 2.0], requires_grad=True)
    loss = free_bits_loss(kl, 0.5)
    assert loss.item() == pytest.approx((0 + 0 + 0.5 + 1.5) / 4)
    loss.backward()
    # Tokens under κ get no gradient: token-wise, not on the batch mean.
    assert kl.grad.tolist() == [0.0, 0.0, 0.25, 0.25]


def chi_square(counts, expected):
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_codes_follow_G():
    H, n = 3, 40000
    logits = torch.tensor([1.5, -0.7, 0.2])
    codes = sample_codes(logits.expand(n, H), torch.Generator().manual_seed(0))
    bits = bit_matrix(H)
    G = (F.logsigmoid(logits) @ bits.T + F.logsigmoid(-logits) @ (1 - bits).T).exp()
    counts = torch.bincount(codes, minlength=8).double()
    # 7 degrees of freedom: the 99.9% quantile is 24.3.
    assert chi_square(counts, n * G.double()) < 24.3


def test_prior_codes_uniform():
    H, n = 4, 32000
    codes = uniform_codes((n,), H, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(codes, minlength=16).double()
    assert codes.min() >= 0 and codes.max() < 16
    assert chi_square(counts, torch.full((16,), n / 16.0)) < 37.7  # 15 dof, 99.9%


def test_codes_bits_roundtrip():
    codes = torch.arange(64)
    bits = codes_to_bits(codes, 6)
    assert torch.equal((bits.long() * (1 << torch.arange(6))).sum(-1), codes)
    assert torch.equal(bits, bit_matrix(6))


def test_bits_embedding_gradient_is_eq8_for_linear_embedding():
    """For r linear in ±1 bits, Eq. 8's gradient equals the dense formula on its 2^H table."""
    H, D = 4, 3
    torch.manual_seed(0)
    ps = PostSampler(D, H, "bits").double()
    torch.nn.init.normal_(ps.weight)
    table = ((2 * bit_matrix(H, torch.float64) - 1) @ ps.weight.T).detach()  # (2^H, D)
    logits = torch.randn(5, H, dtype=torch.float64, requires_grad=True)
    r, codes = ps.sample(logits, torch.Generator().manual_seed(0))
    torch.testing.assert_close(r, table[codes])
    w = torch.randn(5, D, dtype=torch.float64)
    (g1,) = torch.autograd.grad((r * w).sum(), logits)
    l2 = logits.detach().clone().requires_grad_()
    (g2,) = torch.autograd.grad((dense_mapper(l2, table, codes) * w).sum(), l2)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(ps.embed(codes), table[codes])


def test_mapper_backward_under_bf16_autocast_uses_low_precision_products():
    """Under bf16 autocast only the S products are bf16: the gradient stays close (~2^-8)."""
    H, N, D = 12, 64, 32
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, H, generator=g)
    table = torch.randn(1 << H, D, generator=g)
    w = torch.randn(N, D, generator=g)
    grads = []
    for autocast in (False, True):
        lg = logits.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            r, _ = binary_mapper(lg, table, torch.Generator().manual_seed(1))
        (r.float() * w).sum().backward()
        grads.append(lg.grad)
    err = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert 0 < err < 2e-2


def test_mapper_backward_never_allocates_tokens_by_codes():
    """README: nothing of size tokens × 2^H is ever allocated. Every tensor the mapper's
    forward and backward create is recorded; the largest must stay within the chunk budget
    (or the 2^H × D table gradient), far below N × 2^H."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.max = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.max = max(self.max, t.numel())
            return out

    N, H, D = 4096, 12, 8
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, H, generator=g).requires_grad_()
    table = torch.randn(1 << H, D, generator=g).requires_grad_()
    w = torch.randn(N, D, generator=g)
    sizes = Sizes()
    with sizes:
        r, _ = binary_mapper(logits, table, torch.Generator().manual_seed(1))
        (r * w).sum().backward()
    budget = max(latent._CHUNK_ELEMENTS, table.numel())
    assert sizes.max <= budget < N * (1 << H) // 8, (sizes.max, budget)
    assert logits.grad.abs().sum() > 0


def test_mapper_matches_dense_float64_formulation_at_h14():
    """The check the CUDA suite runs, here on the CPU (H = 14: several code chunks)."""
    check_mapper_against_dense_float64("cpu")
