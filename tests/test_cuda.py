"""CUDA checks (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""

import pytest
import torch
from dense_reference import check_mapper_against_dense_float64

from freeformer import FreeTransformer, ModelConfig
from freeformer.generate import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CFG = ModelConfig.preset("debug")


def test_init_is_identical_on_cpu_and_cuda():
    a = FreeTransformer(CFG, seed=4)
    b = FreeTransformer(CFG, seed=4).cuda()
    assert all(torch.equal(p, q.cpu()) for p, q in zip(a.parameters(), b.parameters()))


def test_greedy_cached_equals_full_forward_on_cuda():
    m = FreeTransformer(CFG).cuda().eval()
    p = torch.randint(0, CFG.vocab_size, (3, 5), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    out, codes = generate(m, p, 16, temperature=0, generator=g, return_latents=True)
    logits = m(out, latents=codes).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), out[:, 5:])


def test_mapper_on_cuda_matches_dense_float64_formulation():
    check_mapper_against_dense_float64("cuda")


def test_bf16_autocast_agrees_with_fp32():
    m = FreeTransformer(CFG.replace(dim=128, n_heads=4, n_kv_heads=2)).cuda()
    x = torch.randint(0, CFG.vocab_size, (4, 64), device="cuda")
    codes = torch.randint(0, CFG.n_codes, (4, 64), device="cuda")
    ref = m(x, x, latents=codes)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = m(x, x, latents=codes)
    assert abs(float(low.ce) - float(ref.ce)) < 0.02
    # The training path (encoder + mapper backward) runs under autocast with finite grads.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x, x, generator=torch.Generator(device="cuda").manual_seed(0))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("latent", [True, False])
def test_cuda_graph_decode_equals_eager_and_never_syncs(latent):
    """Static decoding replays one captured CUDA graph per token: greedy tokens equal the eager
    path's (fp32), sampling with one generator draws the same tokens, and a replayed step
    makes no host sync (sync debug mode raises on one)."""
    from freeformer.generate import generate, new_cache
    from freeformer.static_decode import StaticDecodeStep

    m = FreeTransformer(CFG.replace(latent=latent)).cuda().eval()
    p = torch.randint(0, CFG.vocab_size, (3, 5), device="cuda")
    for kw in (dict(temperature=0), dict(temperature=0.8, top_p=0.9)):
        a = generate(m, p, 24, generator=torch.Generator("cuda").manual_seed(0), **kw)
        b = generate(m, p, 24, generator=torch.Generator("cuda").manual_seed(0), static=True, **kw)
        assert torch.equal(a, b), kw
    cache = new_cache(m, 3, 16)
    m(p, latents="prior" if latent else None, cache=cache, last_logits_only=True)
    step = StaticDecodeStep(m, cache, 3, graph=True)
    tok = torch.zeros(3, 1, dtype=torch.long, device="cuda")
    codes = torch.zeros(3, 1, dtype=torch.long, device="cuda") if latent else None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            tok = step(tok, codes).argmax(-1, keepdim=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(cache.pos) == 9
