"""Brute-force references shared by the CPU and CUDA tests (a plain module, not a test file)."""

import torch
import torch.nn.functional as F

from freeformer.latent import binary_mapper, bit_matrix


def dense_mapper(bit_logits, table, codes):
    """The paper's formulation, materialising one-hot and G: r = (Y + G − sg(G)) W (Eq. 8).

    Runs on the inputs' device and in their dtype (float64 for a reference)."""
    H = bit_logits.shape[-1]
    bits = bit_matrix(H, bit_logits.dtype, bit_logits.device)  # (2^H, H)
    logp, logq = F.logsigmoid(bit_logits), F.logsigmoid(-bit_logits)
    G = (logp @ bits.T + logq @ (1 - bits).T).exp()  # (..., 2^H)
    Y = F.one_hot(codes, 1 << H).to(bit_logits.dtype)
    return (Y + G - G.detach()) @ table


def check_mapper_against_dense_float64(device):
    """The mapper on ``device`` (float32) against the paper's dense formulation
    (one_hot + G − G.detach()) @ table evaluated in float64 on the CPU: forward and both
    gradients. (Shared: tests/test_latent.py runs it on the CPU, tests/test_cuda.py on CUDA.)"""
    H, N, D = 14, 300, 64
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(N, H, generator=g)
    table = torch.randn(1 << H, D, generator=g)
    w = torch.randn(N, D, generator=g)
    ld = logits.clone().to(device).requires_grad_()  # clone: on the CPU .to() would alias
    td = table.clone().to(device).requires_grad_()
    r, codes = binary_mapper(ld, td, torch.Generator(device=device).manual_seed(0))
    assert torch.equal(r, td[codes])  # forward: a row lookup
    (r * w.to(device)).sum().backward()
    l64, t64 = logits.double().requires_grad_(), table.double().requires_grad_()
    r64 = dense_mapper(l64, t64, codes.cpu())
    torch.testing.assert_close(r.detach().cpu().double(), r64.detach(), rtol=0, atol=1e-6)
    (r64 * w.double()).sum().backward()
    torch.testing.assert_close(ld.grad.cpu().double(), l64.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(td.grad.cpu().double(), t64.grad, rtol=1e-5, atol=1e-5)
