"""Generation: cached = uncached, latent handling, sampling filters, EOS."""

import pytest
import torch

from freeformer import FreeTransformer, ModelConfig
from freeformer.errors import DataError
from freeformer.generate import decode_stream, generate, new_cache, prefill_prompt, sample

CFG = ModelConfig.preset("debug")


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def model():
    return FreeTransformer(CFG, seed=0).eval()


def prompt(B=3, T=5):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=gen(42))


@pytest.mark.parametrize("prefill", ["encoder", "prior"])
def test_cached_sampling_logits_equal_uncached_forward(prefill):
    """Every logit row generation samples from (prefill, then each cached decode step) equals
    the uncached forward: the prefill's against a forward over the prompt drawing its codes
    with the same generator (the encoder's posterior, or the prior), the decode steps'
    against the whole sequence with every code pinned. The model listens to Z, so a wrong
    code anywhere moves the logits far beyond the tolerance."""
    model = listening_model()
    p = prompt()
    rows = []
    hook = model.register_forward_hook(lambda mod, args, out: rows.append(out.logits[:, -1]))
    out, codes = generate(model, p, 12, prefill=prefill, generator=gen(0), return_latents=True)
    hook.remove()
    assert out.shape == (3, 17) and codes.shape == (3, 17) and torch.equal(out[:, :5], p)
    assert len(rows) == 12  # the prefill and 11 decode steps (the last token is not fed back)
    ref = model(p, latents=None if prefill == "encoder" else "prior", generator=gen(0))
    assert torch.equal(codes[:, :5], ref.codes)  # the same draws give the same prompt codes
    torch.testing.assert_close(rows[0], ref.logits[:, -1], rtol=1e-5, atol=1e-4)
    full = model(out, latents=codes).logits  # uncached, every code pinned
    torch.testing.assert_close(torch.stack(rows, 1), full[:, 4:-1], rtol=1e-5, atol=1e-4)
    # The codes matter to these logits: one changed prompt code moves them.
    other = codes.clone()
    other[:, 2] = (other[:, 2] + 1) % CFG.n_codes
    assert (model(out, latents=other).logits[:, 4:-1] - full[:, 4:-1]).abs().max() > 0.1


def test_chunked_prefill_with_cache_equals_full_forward(model):
    x = prompt(B=2, T=14)
    codes = torch.randint(0, CFG.n_codes, (2, 14), generator=gen(1))
    full = model(x, latents=codes).logits
    cache = new_cache(model, 2, 14)
    parts = [
        model(x[:, a:b], latents=codes[:, a:b], cache=cache).logits
        for a, b in ((0, 6), (6, 7), (7, 14))
    ]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_prefill_codes_come_from_encoder_over_prompt(model):
    p = prompt()
    _, codes = generate(model, p, 3, temperature=0, generator=gen(5), return_latents=True)
    ref = model(p, generator=gen(5)).codes  # encoder over the prompt, same generator state
    assert torch.equal(codes[:, :5], ref)


def listening_model():
    """A Free Transformer whose decoder listens to Z: the injection block's attention output
    (the only path from r) dominates the residual stream and the readout is sharp."""
    m = FreeTransformer(CFG, seed=0).eval()
    with torch.no_grad():
        m.blocks[CFG.inject_layer].attn.wo.weight.mul_(300)
        m.head.weight.mul_(30)
    return m


def check_group_follows_shared_codes(m):
    """A group of rows sharing one Z (Figure 4's green groups), sampled at temperature 1:
    the same codes and draws give the same group; other codes, with the same draws, change
    every row; and every token is the one sampled from the uncached logits with Z pinned."""
    p = prompt(B=1).expand(4, -1)
    z1 = torch.randint(0, CFG.n_codes, (1, 17), generator=gen(3))
    z2 = torch.randint(0, CFG.n_codes, (1, 17), generator=gen(4))
    a = generate(m, p, 12, latents=z1, generator=gen(9))
    assert torch.equal(a, generate(m, p, 12, latents=z1, generator=gen(9)))
    g, seq = gen(9), p
    for _ in range(12):
        logits = m(seq, latents=z1[0, : seq.shape[1]]).logits[:, -1]
        seq = torch.cat([seq, sample(logits, generator=g)[:, None]], 1)
    assert torch.equal(seq, a)
    b = generate(m, p, 12, latents=z2, generator=gen(9))
    assert (a != b).any(1).all(), "a row of the group did not follow the shared codes"


def test_shared_latents_steer_every_sampled_row():
    check_group_follows_shared_codes(listening_model())


def test_shared_latent_check_fails_for_a_model_that_ignores_z():
    deaf = listening_model()
    with torch.no_grad():
        deaf.post_sampler.weight.zero_()  # r = 0: the baseline's logits (test_model.py)
    with pytest.raises(AssertionError, match="did not follow"):
        check_group_follows_shared_codes(deaf)


def test_new_tokens_draw_fresh_uniform_codes(model):
    p = prompt(B=64, T=2)
    _, codes = generate(model, p, 30, generator=gen(0), return_latents=True)
    new = codes[:, 2:]
    assert new.min() >= 0 and new.max() < CFG.n_codes
    counts = torch.bincount(new.flatten(), minlength=CFG.n_codes).double()
    expected = new.numel() / CFG.n_codes
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120  # 63 dof: the 99.99% quantile is ≈ 111.5 + margin


def test_sampling_is_reproducible_with_generator(model):
    p = prompt()
    a = generate(model, p, 10, generator=gen(11))
    b = generate(model, p, 10, generator=gen(11))
    c = generate(model, p, 10, generator=gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_and_pads(model):
    p = prompt(B=2)
    # Find the greedy continuation, then declare its 3rd new token the EOS.
    ref = generate(model, p, 10, temperature=0, latents=torch.zeros(15, dtype=torch.long))
    eos = int(ref[0, 7])
    out = generate(
        model, p, 10, temperature=0, latents=torch.zeros(15, dtype=torch.long), eos_id=eos
    )
    first = (out[0, 5:] == eos).nonzero()[0].item() + 5
    assert (out[0, first:] == eos).all()
    assert torch.equal(out[0, :first], ref[0, :first])


def test_decode_stream_stops_per_row_and_when_every_row_is_done(model):
    """The one decode loop: it keeps running a row the caller finished (the batch steps
    together) and ends once every row is finished, without a step after the last token."""
    p = prompt(B=2)
    codes = torch.zeros(2, 5 + 8, dtype=torch.long)
    ref = generate(model, p, 8, temperature=0, latents=codes)
    cache = new_cache(model, 2, 5 + 8)
    logits = prefill_prompt(model, p, cache, codes[:, :5]).logits[:, -1]
    finished = torch.zeros(2, dtype=torch.bool)
    steps = []
    hook = model.register_forward_hook(lambda *a: steps.append(1))
    try:
        for t, nxt in enumerate(
            decode_stream(
                model, logits, cache, 8, lambda x: x.argmax(-1), codes=codes, finished=finished
            )
        ):
            assert torch.equal(nxt, ref[:, 5 + t])  # finished rows still follow the model
            finished[0] |= t == 1
            finished[1] |= t == 3
    finally:
        hook.remove()
    assert t == 3 and len(steps) == 3  # 4 tokens, 3 decode steps after the prefill


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
    out, codes = generate(base, p, 8, temperature=0, return_latents=True)
    assert codes is None
    assert torch.equal(base(out).logits[:, 4:-1].argmax(-1), out[:, 5:])


def test_generate_bad_arguments(model):
    p = prompt()
    with pytest.raises(DataError, match="max_seq_len"):
        generate(model, p, CFG.max_seq_len)
    with pytest.raises(DataError, match="prefill"):
        generate(model, p, 2, prefill="posterior")
    with pytest.raises(DataError, match="latents cover"):
        generate(model, p, 2, latents=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(DataError, match="top_p"):
        generate(model, p, 2, top_p=1.5)
    with pytest.raises(DataError, match="temperature"):
        generate(model, p, 2, temperature=-1)


@pytest.mark.parametrize("latent", [True, False])
def test_static_decode_equals_eager_decode(latent):
    """The fixed-shape decode step (the one a CUDA graph replays) computes what the eager
    cached step computes: every sampled-from logit row agrees, and greedy tokens are equal.
    On the CPU the static step runs without a graph; tests/test_cuda.py replays it."""
    model = listening_model() if latent else FreeTransformer(CFG.replace(latent=False), seed=0)
    p = prompt()
    z = torch.randint(0, CFG.n_codes, (3, 5 + 12), generator=gen(3)) if latent else None
    outs = []
    for static in (False, True):
        rows = []
        hook = model.register_forward_hook(
            lambda mod, a, o, rows=rows: rows.append(o.logits[:, -1].clone())
        )
        toks = generate(model, p, 12, temperature=0, latents=z, static=static)
        hook.remove()
        outs.append((toks, torch.stack(rows, 1)))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


def test_static_decode_masks_the_unwritten_cache():
    """The static step attends over the whole preallocated cache: positions not yet written
    must be masked and cleared (a zero weight times NaN is NaN). NaN planted in every fresh
    buffer changes nothing."""
    model = listening_model()
    p = prompt(B=2)
    z = torch.randint(0, CFG.n_codes, (2, 5 + 6), generator=gen(4))
    ref = generate(model, p, 6, temperature=0, latents=z, static=True)
    empty = torch.empty

    def planted(*a, **k):
        return empty(*a, **k).fill_(float("nan"))

    torch.empty, orig = planted, torch.empty
    try:
        got = generate(model, p, 6, temperature=0, latents=z, static=True)
    finally:
        torch.empty = orig
    assert torch.equal(got, ref)
