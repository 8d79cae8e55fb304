"""Model invariants: causality, encoder non-causality, matched baseline, injection point."""

import math

import pytest
import torch

from freeformer import FreeTransformer, ModelConfig
from freeformer.errors import ConfigError, DataError
from freeformer.model import IGNORE_INDEX

CFG = ModelConfig.preset("debug")


def tokens(B=2, T=12, seed=0, vocab=CFG.vocab_size):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_output_fields_and_loss_decomposition():
    m = FreeTransformer(CFG)
    x = tokens()
    out = m(x, x, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (2, 12, CFG.vocab_size)
    assert out.codes.shape == (2, 12) and out.kl_tokens.shape == (2, 12)
    torch.testing.assert_close(out.loss, out.ce + out.kl_loss)
    torch.testing.assert_close(out.kl, out.kl_tokens.mean())
    no_targets = m(x, generator=torch.Generator().manual_seed(0))
    assert no_targets.loss is None and no_targets.ce is None
    torch.testing.assert_close(no_targets.logits, out.logits)


def test_decoder_is_causal_given_pinned_latents():
    m = FreeTransformer(CFG)
    x = tokens(B=1, T=16)
    codes = torch.randint(0, CFG.n_codes, (1, 16), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, 9:] = (y[0, 9:] + 1) % CFG.vocab_size
    c2 = codes.clone()
    c2[0, 9:] = (c2[0, 9:] + 1) % CFG.n_codes
    a, b = m(x, latents=codes).logits, m(y, latents=c2).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4


def test_latent_code_changes_logits_from_its_position_on():
    m = FreeTransformer(CFG)
    x = tokens(B=1, T=10)
    codes = torch.zeros(1, 10, dtype=torch.long)
    c2 = codes.clone()
    c2[0, 6] = 5
    a, b = m(x, latents=codes).logits, m(x, latents=c2).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4


def encoder_logits(m, x):
    c = m.config
    T = x.shape[1]
    cos, sin = m.rope_cos[:T], m.rope_sin[:T]
    h = m.tok_emb(x)
    for b in m.blocks[: c.inject_layer]:
        h = b(h, cos, sin)
    return m.encoder(h, cos, sin)


@pytest.mark.parametrize("window", [1, 3])
def test_encoder_window_reads_positions_t_to_t_plus_w_only(window):
    """The opt-in window (ModelConfig.encoder_window = W): Z_t's posterior depends on tokens
    up to t + W and on none after; the paper's encoder (W = 0) reads all of them."""
    T, t = 16, 5
    x = tokens(B=1, T=T)
    for w in (window, 0):
        m = FreeTransformer(CFG.replace(encoder_window=w))
        base = encoder_logits(m, x)
        for s in range(t + 1, T):
            y = x.clone()
            y[0, s] = (y[0, s] + 1) % CFG.vocab_size
            moved = (encoder_logits(m, y)[0, t] - base[0, t]).abs().max()
            if w and s > t + w:
                assert moved == 0, (w, s)  # beyond the window: exactly nothing
            else:
                assert moved > 1e-6, (w, s)  # inside it (or the paper's encoder): visible


def test_encoder_is_non_causal_and_position_dependent():
    m = FreeTransformer(CFG)
    x = tokens(B=1, T=16)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % CFG.vocab_size
    a, b = encoder_logits(m, x), encoder_logits(m, y)
    # Changing the last token changes the posterior at the first position (it sees the future).
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-6
    # ζ is one constant query: with no rotation (cos = 1, sin = 0) every position gets the
    # same attention pattern, hence the same posterior; RoPE makes the posteriors differ.
    # Sharpen the encoder's attention (as training does; at init its logits are ~0.05 and
    # every position sees a near-uniform average).
    with torch.no_grad():
        m.encoder.blocks[0].attn.wq.weight.mul_(30)
    a = encoder_logits(m, x)
    T = x.shape[1]
    h = m.tok_emb(x)
    for blk in m.blocks[: CFG.inject_layer]:
        h = blk(h, m.rope_cos[:T], m.rope_sin[:T])
    flat = m.encoder(h, torch.ones_like(m.rope_cos[:T]), torch.zeros_like(m.rope_sin[:T]))[0]
    assert (flat - flat[0]).abs().max() < 1e-5
    e = a[0]
    assert (e - e[0]).abs().max() > 1e-3  # ≫ the float noise of the flat case


def test_training_forward_reports_kl_of_encoder_posterior():
    m = FreeTransformer(CFG)
    x = tokens()
    out = m(x, x, generator=torch.Generator().manual_seed(0))
    from freeformer.latent import kl_per_token

    torch.testing.assert_close(out.kl_tokens, kl_per_token(encoder_logits(m, x)))
    prior = m(x, x, latents="prior", generator=torch.Generator().manual_seed(0))
    assert prior.kl.item() == 0 and prior.kl_loss.item() == 0
    torch.testing.assert_close(prior.loss, prior.ce)


def hand_kl_nats(bit_logits):
    """Σ_h (log 2 − h_b(σ(L_h))) in float64, straight from the definition."""
    p = torch.sigmoid(bit_logits.double())
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    return (math.log(2) - entropy).sum(-1)


def spread_posteriors(m):
    """Make Q differ by position (sharp encoder attention dominating ζ) and KL_t span
    ≈ 0.2–1.2 nats, as a trained encoder's do; at init every position's KL is ≈ 0."""
    b = m.encoder.blocks[0]
    b.attn.wq.weight.mul_(30)
    b.attn.wo.weight.mul_(100)
    m.encoder.readout.weight.mul_(12)


def test_free_bits_loss_uses_kappa_in_nats():
    """κ = 1 bit is log 2 nats in the hinge (paper: "1/2 bit" = log(2)/2), exactly."""
    cfg = CFG.replace(free_bits=1.0)
    m = FreeTransformer(cfg)
    with torch.no_grad():  # spread the per-token KL across κ: some under, some over 1 bit
        spread_posteriors(m)
    x = tokens(B=4, T=16)
    out = m(x, x, generator=torch.Generator().manual_seed(0))
    kl = hand_kl_nats(out.bit_logits)
    torch.testing.assert_close(out.kl_tokens.double(), kl, rtol=1e-5, atol=1e-6)
    hinge_nats = (kl - math.log(2)).clamp(min=0).mean()
    hinge_bits_as_nats = (kl - 1.0).clamp(min=0).mean()  # the mistake this test guards
    assert (kl < math.log(2)).any() and (kl > 1.0).any()
    assert hinge_nats - hinge_bits_as_nats > 0.01
    torch.testing.assert_close(out.kl_loss.double(), hinge_nats, rtol=1e-5, atol=1e-7)
    assert cfg.free_bits_nats == math.log(2)


@pytest.mark.parametrize(
    "preset",
    [
        "debug",
        "synthetic",
        pytest.param("paper-1.5b", marks=pytest.mark.slow),
        pytest.param("paper-8b", marks=pytest.mark.slow),
    ],
)
def test_kl_at_init_is_far_below_kappa_at_every_width(preset):
    """A fixed-std readout on the RMS-normed encoder output gives bit logits of std ∝ √D and a
    KL at init above κ at the paper's widths (≈ 1.2 bits at D 1536, 3 bits at D 4096).
    The paper shapes run with 2 layers, a 256-token vocabulary and a narrow MLP: the bit
    logits are readout · RMSNorm(h), whose scale depends only on D and the readout's init."""
    over = {}
    if preset.startswith("paper"):
        over = dict(n_layers=2, vocab_size=256, max_seq_len=64, mlp_hidden=256)
    cfg = ModelConfig.preset(preset, **over)
    m = FreeTransformer(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(x, x, generator=torch.Generator().manual_seed(0))
    kl_bits = out.kl.item() / math.log(2)
    assert kl_bits < cfg.free_bits / 4, kl_bits
    assert 0.07 < out.bit_logits.std().item() < 0.13  # BIT_LOGIT_INIT_STD at every width
    assert out.kl_loss.item() == 0


def test_encoder_gets_gradient_from_the_first_step():
    m = FreeTransformer(CFG)
    x = tokens()
    m(x, x, generator=torch.Generator().manual_seed(0)).loss.backward()
    enc = m.encoder
    for name, p in [
        ("readout", enc.readout.weight),
        ("zeta", enc.zeta),
        ("wq", enc.blocks[0].attn.wq.weight),
        ("wkv", enc.blocks[0].attn.wkv.weight),
        ("blocks before the injection", m.blocks[0].attn.wkv.weight),
    ]:
        assert p.grad is not None and p.grad.abs().max() > 0, name


def scored_means(out, y, kappa_nats):
    """CE over the scored targets; KL and the token-wise hinge summed over every position up
    to the row's last scored target (those codes reach a scored token), all per scored target."""
    keep = y != IGNORE_INDEX
    reach = torch.zeros_like(keep)
    for b in range(y.shape[0]):
        last = int(keep[b].nonzero().max())
        reach[b, : last + 1] = True
    nll = torch.nn.functional.cross_entropy(
        out.logits.flatten(0, 1).float(), y.clamp(min=0).flatten(), reduction="none"
    ).view_as(y)
    kl, n = out.kl_tokens, keep.sum()
    return nll[keep].mean(), kl[reach].sum() / n, (kl[reach] - kappa_nats).clamp(min=0).sum() / n


def test_ignored_targets_leave_kl_and_hinge_like_the_cross_entropy():
    """CE per scored target; KL and hinge over the codes that reach a scored target (a masked
    prompt's codes condition the answer and pay their KL), per scored target; gradients too."""
    m = FreeTransformer(CFG.replace(free_bits=0.25))
    with torch.no_grad():  # per-token KL on both sides of κ, so the hinge is not 0 or all
        spread_posteriors(m)
    x = tokens(B=3, T=12)
    y = tokens(B=3, T=12, seed=1)
    y[0, 7:] = IGNORE_INDEX  # a right-padded row
    y[1, :4] = IGNORE_INDEX  # a masked prompt
    y[2, 5] = IGNORE_INDEX
    noise = torch.rand(3, 12, CFG.latent_bits, generator=torch.Generator().manual_seed(2))
    out = m(x, y, bit_noise=noise)
    ce, kl, hinge = scored_means(out, y, CFG.replace(free_bits=0.25).free_bits_nats)
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.kl_loss, hinge)
    assert hinge > 0
    # An unmasked mean would differ: the padded positions carry KL too …
    assert (out.kl - out.kl_tokens.mean()).abs() > 1e-3
    # … and so would dropping the masked prompt's codes (they reach the scored answer).
    keep = y != IGNORE_INDEX
    assert (out.kl - out.kl_tokens[keep].mean()).abs() > 1e-3
    # Gradients: the model's loss vs the hand-computed one, on the same graph.
    params = [p for p in m.parameters() if p.requires_grad]
    g_model = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    g_hand = torch.autograd.grad(ce + hinge, params, allow_unused=True)
    for a, b in zip(g_model, g_hand):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("latent", [False, True])
def test_right_padding_with_ignored_targets_changes_nothing_for_the_decoder(latent):
    """A padded batch gives the unpadded loss and gradients where no non-causal encoder runs
    (the baseline; a Free Transformer with pinned codes). With the encoder, padding is part
    of what the non-causal encoder reads (see FreeTransformer.forward): there the test above
    pins the masked terms down instead."""
    m = FreeTransformer(CFG.replace(latent=latent), seed=4)
    x, y = tokens(B=2, T=9), tokens(B=2, T=9, seed=1)
    pad = 5
    xp = torch.cat([x, tokens(B=2, T=pad, seed=3)], 1)
    yp = torch.cat([y, torch.full((2, pad), IGNORE_INDEX)], 1)
    codes = torch.randint(0, CFG.n_codes, (2, 9 + pad), generator=torch.Generator().manual_seed(5))
    kw = lambda T: {"latents": codes[:, :T]} if latent else {}  # noqa: E731
    results = []
    for xi, yi in ((x, y), (xp, yp)):
        m.zero_grad()
        out = m(xi, yi, **kw(xi.shape[1]))
        out.loss.backward()
        results.append(
            (out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        )
    (a, ga), (b, gb) = results
    for k in ("loss", "ce", "kl", "kl_loss"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=1e-6, atol=1e-7)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7, msg=n)


def test_padding_changes_the_encoders_posterior_at_real_positions():
    """The documented limit: the encoder is non-causal, so right-padding moves Q(Z | S)."""
    m = FreeTransformer(CFG)
    with torch.no_grad():
        m.encoder.blocks[0].attn.wq.weight.mul_(30)  # sharp attention, as after training
    x = tokens(B=1, T=9)
    xp = torch.cat([x, tokens(B=1, T=4, seed=3)], 1)
    a = m(x, generator=torch.Generator().manual_seed(0)).bit_logits
    b = m(xp, generator=torch.Generator().manual_seed(0)).bit_logits[:, :9]
    assert (a - b).abs().max() > 1e-4


def test_baseline_is_plain_decoder_with_matched_init():
    base = FreeTransformer(CFG.replace(latent=False), seed=7)
    ft = FreeTransformer(CFG, seed=7)
    assert base.encoder is None and base.post_sampler is None
    fts = ft.state_dict()
    for name, p in base.state_dict().items():
        assert torch.equal(p, fts[name]), name  # shared parameters identical at init
    assert set(fts) - set(base.state_dict()) == {
        n for n in fts if n.startswith(("encoder.", "post_sampler."))
    }
    # The baseline is embed → blocks (q = kv) → norm → readout, nothing else.
    x = tokens()
    T = x.shape[1]
    h = base.tok_emb(x)
    for b in base.blocks:
        h = b(h, base.rope_cos[:T], base.rope_sin[:T])
    ref = base.head(base.norm(h))
    torch.testing.assert_close(base(x).logits, ref, rtol=0, atol=0)


def test_zero_post_sampler_gives_baseline_logits():
    base = FreeTransformer(CFG.replace(latent=False), seed=3)
    ft = FreeTransformer(CFG, seed=3)
    with torch.no_grad():
        ft.post_sampler.weight.zero_()
    x = tokens()
    for latents in (None, "prior"):
        torch.testing.assert_close(ft(x, latents=latents).logits, base(x).logits, rtol=0, atol=0)


def rms(v, w, eps):
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(t, cos, sin):  # t: (B, T, h, hd); rotate (first half, second half) pairs
    a, b = t.chunk(2, -1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat([a * c - b * s, a * s + b * c], -1)


def hand_block(blk, xq, xkv, cos, sin, causal=True):
    """x + attn(q = norm(xq), kv = norm(xkv)) + mlp(norm(·)), written out: GQA attention
    with RoPE, SwiGLU — no call into the model's Block or Attention code."""
    eps = blk.attn_norm.eps
    B, T, D = xq.shape
    a = blk.attn
    nh, nkv, hd = a.n_heads, a.n_kv_heads, a.head_dim
    hq = rms(xq, blk.attn_norm.weight, eps)
    hkv = rms(xkv, blk.attn_norm.weight, eps)
    q = (hq @ a.wq.weight.T).view(B, T, nh, hd)
    k, v = (hkv @ a.wkv.weight.T).view(B, T, 2, nkv, hd).unbind(2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k, v = (t.repeat_interleave(nh // nkv, dim=2) for t in (k, v))
    att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    if causal:
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(B, T, D)
    x = xq + y @ a.wo.weight.T
    gate, up = (rms(x, blk.mlp_norm.weight, eps) @ blk.mlp.w_in.weight.T).chunk(2, -1)
    return x + (torch.nn.functional.silu(gate) * up) @ blk.mlp.w_out.weight.T


@pytest.mark.parametrize("latents", ["pinned", "encoder"])
def test_latent_enters_only_the_injection_blocks_keys_and_values(latents):
    """Paper Algorithm 2: block L/2+1 = x + attn(q = norm(x), kv = norm(x + r)) + mlp(...);
    r joins neither the residual stream nor the queries. The model's logits are rebuilt by
    hand from the injection block's input x and r = post_sampler[codes]."""
    m = FreeTransformer(CFG.replace(n_layers=6), seed=1)
    B, T = 2, 10
    x = tokens(B=B, T=T)
    seen = {}
    blk = m.blocks[m.config.inject_layer]
    with torch.no_grad():  # sharp attention and a large attention output, as after training:
        blk.attn.wq.weight.mul_(30)  # at init the pattern is near uniform whatever the
        blk.attn.wo.weight.mul_(30)  # queries, and a query leak would hide under atol
    hook = blk.register_forward_pre_hook(
        lambda mod, args: seen.update(x=args[0].detach().clone())
    )  # returns None: args kept
    codes = torch.randint(0, CFG.n_codes, (B, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = (
            m(x, latents=codes)
            if latents == "pinned"
            else m(x, generator=torch.Generator().manual_seed(0))
        )
    hook.remove()
    with torch.no_grad():
        cos, sin = m.rope_cos[:T], m.rope_sin[:T]
        r = m.post_sampler.weight[out.codes]
        assert r.abs().mean() > 0.5  # r at the residual's scale: a leak would show
        h = hand_block(blk, seen["x"], seen["x"] + r, cos, sin)
        for b in m.blocks[m.config.inject_layer + 1 :]:
            h = b(h, cos, sin)
        ref = m.head(m.norm(h))
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_blocks", [1, 2])
def test_encoder_is_zeta_queries_over_x_written_out(n_blocks):
    """Paper Algorithm 2: h = ζ repeated over T; each (non-causal) encoder block takes its
    queries from h and its keys/values from x, the output of block L/2; bit logits =
    readout(norm(h)). Deeper encoders (a choice the paper leaves open) read x in every block."""
    m = FreeTransformer(CFG.replace(encoder_layers=n_blocks), seed=2)
    with torch.no_grad():  # sharp, large attention so a wrong query or key input shows
        for b in m.encoder.blocks:
            b.attn.wq.weight.mul_(30)
            b.attn.wo.weight.mul_(30)
        m.encoder.zeta.normal_(generator=torch.Generator().manual_seed(0))
    x = tokens(B=2, T=11)
    T = x.shape[1]
    cos, sin = m.rope_cos[:T], m.rope_sin[:T]
    with torch.no_grad():
        out = m(x, generator=torch.Generator().manual_seed(0))
        h_dec = m.tok_emb(x)
        for b in m.blocks[: CFG.inject_layer]:
            h_dec = b(h_dec, cos, sin)
        h = m.encoder.zeta.expand_as(h_dec)
        for b in m.encoder.blocks:
            h = hand_block(b, h, h_dec, cos, sin, causal=False)
        e = m.encoder
        ref = rms(h, e.norm.weight, e.norm.eps) @ e.readout.weight.T
    torch.testing.assert_close(out.bit_logits, ref, rtol=1e-4, atol=1e-5)


def test_tied_embeddings_share_the_matrix():
    m = FreeTransformer(CFG.replace(tie_embeddings=True))
    assert m.head is None
    n_untied = FreeTransformer(CFG).num_params()
    assert n_untied - m.num_params() == CFG.vocab_size * CFG.dim


def test_init_is_deterministic_and_seed_dependent():
    a, b, c = (
        FreeTransformer(CFG, seed=1),
        FreeTransformer(CFG, seed=1),
        FreeTransformer(CFG, seed=2),
    )
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


def test_post_sampler_starts_at_residual_scale():
    # The latent path's init matters: a table far smaller than the activations is ignored.
    m = FreeTransformer(CFG)
    ratio = m.post_sampler.weight.std() / m.tok_emb.weight.std()
    assert 0.8 < ratio < 1.25


def test_bits_embedding_model_trains_a_step():
    m = FreeTransformer(CFG.replace(latent_embedding="bits"))
    assert m.post_sampler.weight.shape == (CFG.dim, CFG.latent_bits)
    x = tokens()
    out = m(x, x, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert m.encoder.readout.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(dim=30, n_heads=4), "n_heads"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layers=-2), "n_layers"),
        (dict(latent_bits=30), "latent_bits"),
        (dict(free_bits=-1), "free_bits"),
        (dict(free_bits=20), "free_bits"),
        (dict(inject_layer=0), "inject_layer"),
        (dict(inject_layer=4), "inject_layer"),
        (dict(latent_embedding="onehot"), "latent_embedding"),
        (dict(encoder_window=-1), "encoder_window"),
        (dict(encoder_window=True), "encoder_window"),
        (dict(dim="64"), "dim"),
        (dict(latent="yes"), "latent"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        CFG.replace(**bad)


def test_config_presets_and_derived_fields():
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.preset("nope")
    p15 = ModelConfig.preset("paper-1.5b")
    assert (
        p15.n_layers,
        p15.dim,
        p15.n_heads,
        p15.n_kv_heads,
        p15.tie_embeddings,
        p15.vocab_size,
        p15.latent_bits,
        p15.inject_layer,
    ) == (28, 1536, 12, 2, True, 2**17, 16, 14)
    p8 = ModelConfig.preset("paper-8b")
    assert (p8.n_layers, p8.dim, p8.n_heads, p8.n_kv_heads) == (32, 4096, 32, 8)
    assert ModelConfig(n_layers=6).inject_layer == 3
    assert ModelConfig(n_layers=6).replace(n_layers=12).inject_layer == 6  # re-derived
    assert ModelConfig(n_layers=6, inject_layer=2).replace(n_layers=12).inject_layer == 2
    assert ModelConfig(free_bits=0.5).free_bits_nats == pytest.approx(0.34657359)
    assert ModelConfig.from_dict(p15.to_dict()) == p15


def test_bad_inputs_are_clear_errors():
    m = FreeTransformer(CFG)
    with pytest.raises(DataError, match="outside"):
        m(torch.tensor([[1, 2, CFG.vocab_size]]))
    with pytest.raises(DataError, match="max_seq_len"):
        m(torch.zeros(1, CFG.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(DataError, match="integer"):
        m(torch.zeros(1, 4))
    with pytest.raises(DataError, match="latent code"):
        m(torch.zeros(1, 4, dtype=torch.long), latents=torch.full((4,), CFG.n_codes))
    with pytest.raises(DataError, match="shape"):
        m(torch.zeros(1, 4, dtype=torch.long), latents=torch.zeros(5, dtype=torch.long))
    with pytest.raises(DataError, match="baseline"):
        FreeTransformer(CFG.replace(latent=False))(
            torch.zeros(1, 4, dtype=torch.long), latents=torch.zeros(4, dtype=torch.long)
        )


def test_empty_construction_draws_no_init_and_loads_exactly(monkeypatch):
    """The one construction path for loading, resuming and converting: parameters allocated,
    never initialised, RoPE tables built; loading a state then gives the model back exactly."""
    from freeformer.checkpoint import model_from_state

    ref = FreeTransformer(CFG, seed=4).eval()
    x = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    want = ref(x, latents="prior", generator=torch.Generator().manual_seed(1)).logits

    def no_init(*a, **k):
        raise AssertionError("a random init was drawn only to be overwritten")

    monkeypatch.setattr(FreeTransformer, "init_weights", no_init)
    m = FreeTransformer.empty(CFG)
    assert torch.equal(m.rope_cos, ref.rope_cos) and torch.equal(m.rope_sin, ref.rope_sin)
    loaded = model_from_state(CFG, ref.state_dict()).eval()
    assert torch.equal(
        loaded(x, latents="prior", generator=torch.Generator().manual_seed(1)).logits, want
    )


def test_residual_injection_variant_adds_r_to_the_stream_entering_the_block():
    """model.latent_injection = "residual" (opt-in, not the paper): block L/2+1 is the
    ordinary block on x + r — queries, keys, values and skip path all see r; the paper's
    "kv" injection on the same weights gives other logits."""
    cfg = CFG.replace(n_layers=6, latent_injection="residual")
    m = FreeTransformer(cfg, seed=1)
    B, T = 2, 10
    x = tokens(B=B, T=T)
    seen = {}
    blk = m.blocks[cfg.inject_layer]
    hook = blk.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].detach()))
    codes = torch.randint(0, cfg.n_codes, (B, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = m(x, latents=codes)
        hook.remove()
        r = m.post_sampler.weight[codes]
        paper = FreeTransformer(CFG.replace(n_layers=6), seed=1)
        paper.load_state_dict(m.state_dict())
        xin = seen["x"] - r  # the hook saw the block's input, x + r
        cos, sin = m.rope_cos[:T], m.rope_sin[:T]
        h = hand_block(blk, xin + r, xin + r, cos, sin)
        for b in m.blocks[cfg.inject_layer + 1 :]:
            h = b(h, cos, sin)
        torch.testing.assert_close(out.logits, m.head(m.norm(h)), rtol=1e-4, atol=1e-5)
        assert (paper(x, latents=codes).logits - out.logits).abs().max() > 1e-2
        # Cached decoding equals the full forward under the variant too.
        from freeformer.generate import new_cache

        cache = new_cache(m, B, T)
        steps = [m(x[:, :4], latents=codes[:, :4], cache=cache).logits]
        for t in range(4, T):
            steps.append(m(x[:, t : t + 1], latents=codes[:, t : t + 1], cache=cache).logits)
        torch.testing.assert_close(torch.cat(steps, 1), out.logits, rtol=1e-5, atol=1e-5)
