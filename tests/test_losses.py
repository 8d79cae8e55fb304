"""The chunked readout + cross-entropy equals the plain one, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from freeformer import FreeTransformer, ModelConfig, layers
from freeformer.layers import linear_cross_entropy


@pytest.mark.parametrize("chunk_elements", [1 << 26, 3 * 50])  # one chunk; 3 tokens a chunk
def test_linear_cross_entropy_equals_plain_in_float64(monkeypatch, chunk_elements):
    monkeypatch.setattr(layers, "_CE_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (2, 7), generator=g)
    t[0, 2] = t[1, 6] = -100  # ignored targets: neither counted nor differentiated
    got = linear_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(3 * got, (h, w))
    ref = F.cross_entropy(F.linear(h, w).flatten(0, 1), t.flatten(), ignore_index=-100)
    rh, rw = torch.autograd.grad(3 * ref, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)


def test_model_loss_without_logits_equals_with_logits():
    """Training's path (return_logits=False) gives the same loss and gradients as the
    logits path, and stores no logits."""
    cfg = ModelConfig.preset("debug")
    x = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    y[:, -2:] = -100
    grads = []
    for return_logits in (True, False):
        m = FreeTransformer(cfg, seed=0)
        out = m(x, y, generator=torch.Generator().manual_seed(2), return_logits=return_logits)
        out.loss.backward()
        assert (out.logits is None) == (not return_logits)
        grads.append((out.loss.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
