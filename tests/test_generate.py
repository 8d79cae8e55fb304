"""Generation: cached = uncached, latent handling, sampling filters, EOS."""

import pytest
import torch

from freeformer import FreeTransformer, ModelConfig
from freeformer.errors import DataError
from freeformer.generate import KVCache, sample

CFG = ModelConfig.preset("debug")


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def model():
    return FreeTransformer(CFG, seed=0).eval()


def prompt(B=3, T=5):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=gen(42))


@pytest.mark.parametrize("prefill", ["encoder", "prior"])
def test_greedy_cached_equals_full_forward(model, prefill):
    p = prompt()
    out, codes = model.generate(p, 20, temperature=0, prefill=prefill, generator=gen(0),
                                return_latents=True)
    assert out.shape == (3, 25) and codes.shape == (3, 25)
    assert torch.equal(out[:, :5], p)
    # Re-run the whole sequence without a cache, with the same latents pinned: each
    # generated token is the argmax of the full forward at the position before it.
    logits = model(out, latents=codes).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), out[:, 5:])


def test_chunked_prefill_with_cache_equals_full_forward(model):
    x = prompt(B=2, T=14)
    codes = torch.randint(0, CFG.n_codes, (2, 14), generator=gen(1))
    full = model(x, latents=codes).logits
    cache = KVCache(model, 2, 14)
    parts = [model(x[:, a:b], latents=codes[:, a:b], cache=cache).logits
             for a, b in ((0, 6), (6, 7), (7, 14))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_prefill_codes_come_from_encoder_over_prompt(model):
    p = prompt()
    _, codes = model.generate(p, 3, temperature=0, generator=gen(5), return_latents=True)
    ref = model(p, generator=gen(5)).codes  # encoder over the prompt, same generator state
    assert torch.equal(codes[:, :5], ref)


def test_shared_latents_make_greedy_samples_identical(model):
    p = prompt(B=1).expand(4, -1)
    z = torch.randint(0, CFG.n_codes, (1, 5 + 12), generator=gen(3))
    out = model.generate(p, 12, temperature=1.0, latents=z, generator=gen(9))
    assert out.shape == (4, 17)
    greedy = model.generate(p, 12, temperature=0, latents=z)
    assert (greedy == greedy[0]).all()


def test_new_tokens_draw_fresh_uniform_codes(model):
    p = prompt(B=64, T=2)
    _, codes = model.generate(p, 30, generator=gen(0), return_latents=True)
    new = codes[:, 2:]
    assert new.min() >= 0 and new.max() < CFG.n_codes
    counts = torch.bincount(new.flatten(), minlength=CFG.n_codes).double()
    expected = new.numel() / CFG.n_codes
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120  # 63 dof: the 99.99% quantile is ≈ 111.5 + margin


def test_sampling_is_reproducible_with_generator(model):
    p = prompt()
    a = model.generate(p, 10, generator=gen(11))
    b = model.generate(p, 10, generator=gen(11))
    c = model.generate(p, 10, generator=gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_and_pads(model):
    p = prompt(B=2)
    # Find the greedy continuation, then declare its 3rd new token the EOS.
    ref = model.generate(p, 10, temperature=0, latents=torch.zeros(15, dtype=torch.long))
    eos = int(ref[0, 7])
    out = model.generate(p, 10, temperature=0, latents=torch.zeros(15, dtype=torch.long),
                         eos_id=eos)
    first = (out[0, 5:] == eos).nonzero()[0].item() + 5
    assert (out[0, first:] == eos).all()
    assert torch.equal(out[0, :first], ref[0, :first])


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(2000, -1)
    s = sample(logits, top_k=2, generator=gen(0))
    assert set(s.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.636, 0.234, 0.086, ...: top_p=0.8 keeps {0, 1}
    s = sample(logits, top_p=0.8, generator=gen(0))
    assert set(s.tolist()) == {0, 1}
    s = sample(logits, top_p=0.5, generator=gen(0))
    assert set(s.tolist()) == {0}
    s = sample(logits, generator=gen(0))
    freq = torch.bincount(s, minlength=5).double() / 2000
    assert (freq - probs).abs().max() < 0.04
    assert torch.equal(sample(logits[:3], temperature=0), torch.zeros(3, dtype=torch.long))


def test_baseline_generates_and_matches_its_forward():
    base = FreeTransformer(CFG.replace(latent=False)).eval()
    p = prompt()
    out, codes = base.generate(p, 8, temperature=0, return_latents=True)
    assert codes is None
    assert torch.equal(base(out).logits[:, 4:-1].argmax(-1), out[:, 5:])


def test_generate_bad_arguments(model):
    p = prompt()
    with pytest.raises(DataError, match="max_seq_len"):
        model.generate(p, CFG.max_seq_len)
    with pytest.raises(DataError, match="prefill"):
        model.generate(p, 2, prefill="posterior")
    with pytest.raises(DataError, match="latents cover"):
        model.generate(p, 2, latents=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(DataError, match="top_p"):
        model.generate(p, 2, top_p=1.5)
    with pytest.raises(DataError, match="temperature"):
        model.generate(p, 2, temperature=-1)
