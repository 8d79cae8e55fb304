"""Likelihood estimators (freeformer.likelihood) against exact enumeration of every code."""

import itertools
import math

import pytest
import torch

from freeformer.config import ModelConfig
from freeformer.latent import uniform_codes
from freeformer.likelihood import (
    conditional_log_likelihood,
    log_likelihood,
    posterior_log_weights,
    prior_log_weights,
    token_log_probs,
)
from freeformer.model import IGNORE_INDEX, FreeTransformer
from freeformer.validation import evaluate


def z_matters(seed: int = 0, bits: int = 1) -> FreeTransformer:
    """H = ``bits`` (1 by default) and weights scaled so that the code sequence visibly changes the predictions:
    r large, the injection block's attention output (where r enters) and the readout
    amplified, and an encoder posterior far from uniform."""
    return z_matters_cfg(ModelConfig.preset("debug", latent_bits=bits), seed)


def z_matters_cfg(cfg: ModelConfig, seed: int = 0) -> FreeTransformer:
    m = FreeTransformer(cfg, seed=seed).eval()
    with torch.no_grad():
        m.post_sampler.weight.mul_(30)
        m.blocks[cfg.inject_layer].attn.wo.weight.mul_(300)
        (m.head.weight if m.head is not None else m.tok_emb.weight).mul_(20)
        m.encoder.readout.weight.mul_(15)
    return m


def enumerate_lp(model, x, y):
    """Token log-probs (2^(H·T), T) for every code sequence of a single row."""
    T = x.shape[1]
    Z = torch.tensor(list(itertools.product(range(model.config.n_codes), repeat=T)))
    with torch.no_grad():
        logits = model(x.expand(len(Z), -1), latents=Z).logits
    return token_log_probs(logits, y.expand(len(Z), -1)).double()


def exact_conditional(model, x, y, n_ctx):
    """log P(cont | ctx) and the old estimand log E_Z[P(cont | ctx, Z)], by enumeration."""
    lp = enumerate_lp(model, x, y)
    a, b = lp[:, : n_ctx - 1].sum(1), lp[:, n_ctx - 1 :].sum(1)
    exact = torch.logsumexp(a + b, 0) - torch.logsumexp(a, 0)
    return exact.item(), (torch.logsumexp(b, 0) - math.log(len(b))).item()


def exact_document(model, x, y):
    n = x.shape[1] * model.config.latent_bits  # log P(Z) = −H·T·log 2
    return (torch.logsumexp(enumerate_lp(model, x, y).sum(1), 0) - n * math.log(2)).item()


def spread(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std() / math.sqrt(len(t))).item()


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    m = z_matters()
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, m.config.vocab_size, (1, 8), generator=g)
    return m, seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("proposal", ["prior", "encoder"])
def test_conditional_estimate_converges_to_enumeration(tiny, proposal):
    model, x, y = tiny
    n_ctx = 4  # 4 context tokens (3 predicted), 4 continuation tokens; 2^7 code sequences
    exact, old = exact_conditional(model, x, y, n_ctx)
    ests = [conditional_log_likelihood(model, x, y, n_ctx, 2048, proposal=proposal,
                                       generator=torch.Generator().manual_seed(s)).item()
            for s in range(6)]  # fmt: skip
    mean, se = spread(ests)
    tol = 4 * se + 1e-3  # 4 standard errors of the mean; 1e-3 for the O(1/K) ratio bias
    print(f"{proposal}: {mean:.4f} ± {se:.4f}, exact {exact:.4f}, old estimand {old:.4f}")
    assert se < 0.01  # the tolerance is not vacuous
    assert abs(mean - exact) < tol
    # The codes matter: the old estimand log E_Z[P(cont | ctx, Z)] is far outside it.
    assert abs(old - exact) > 10 * tol


def right_padded(x, y, lens):
    """Rows of the first ``len`` tokens of x[0] / y[0], right-padded (ignored targets)."""
    xp = torch.zeros(len(lens), x.shape[1], dtype=torch.long)
    yp = torch.full((len(lens), x.shape[1]), IGNORE_INDEX)
    for i, n in enumerate(lens):
        xp[i, :n], yp[i, :n] = x[0, :n], y[0, :n]
    return xp, yp


def test_document_estimate_with_padding_converges_to_enumeration(tiny):
    """Right-padded rows of a batch (ignored targets) estimate each unpadded row's log P."""
    model, x, y = tiny
    lens = [7, 4]
    xp, yp = right_padded(x, y, lens)
    exact = torch.tensor([exact_document(model, x[:, :n], y[:, :n]) for n in lens])
    ests = torch.stack([log_likelihood(model, xp, yp, 2048,
                                       generator=torch.Generator().manual_seed(s))
                        for s in range(6)])  # fmt: skip
    mean, se = ests.mean(0), ests.std(0) / math.sqrt(len(ests))
    assert (se < 0.02).all()
    assert ((mean - exact).abs() < 4 * se + 1e-3).all()


@pytest.mark.parametrize("proposal", ["prior", "encoder"])
def test_estimates_with_several_bits_converge_to_enumeration(proposal):
    """H = 2 (the bit order of Q's codes matters): conditional and document estimates."""
    model = z_matters(seed=2, bits=2)
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(0, model.config.vocab_size, (1, 5), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]  # 4 positions: 4^4 code sequences
    exact, old = exact_conditional(model, x, y, 2)
    ests = [conditional_log_likelihood(model, x, y, 2, 2048, proposal=proposal,
                                       generator=torch.Generator().manual_seed(s)).item()
            for s in range(6)]  # fmt: skip
    mean, se = spread(ests)
    print(f"H=2 {proposal}: {mean:.4f} ± {se:.4f}, exact {exact:.4f}, old {old:.4f}")
    assert se < 0.05 and abs(mean - exact) < 4 * se + 1e-3
    assert abs(old - exact) > 3 * (4 * se + 1e-3)  # the old estimand fails the tolerance
    if proposal == "encoder":  # a posterior less peaked, for a usable spread at K = 2048
        with torch.no_grad():
            model.encoder.readout.weight.div_(3)
        exact = exact_document(model, x, y)
        ests = [log_likelihood(model, x, y, 2048, generator=torch.Generator().manual_seed(s))
                .item() for s in range(6)]  # fmt: skip
        mean, se = spread(ests)
        print(f"H=2 document: {mean:.4f} ± {se:.4f}, exact {exact:.4f}")
        assert se < 0.05 and abs(mean - exact) < 4 * se + 1e-3


def test_padding_changes_no_importance_weight():
    """With an encoder that ignores the tokens (its attention output zeroed, its posterior
    still far from uniform), padded rows with the same bit draws give the unpadded weights
    exactly: ignored targets and the codes after them contribute nothing."""
    model = z_matters(seed=1)
    with torch.no_grad():
        for b in model.encoder.blocks:
            b.attn.wo.weight.zero_()
        model.encoder.readout.weight.mul_(10)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 64, (n + 1,), generator=g) for n in (6, 3)]
    noise = torch.rand(2, 6, 1, generator=g)
    xp = torch.zeros(2, 6, dtype=torch.long)
    yp = torch.full((2, 6), IGNORE_INDEX)
    for i, s in enumerate(seqs):
        xp[i, : len(s) - 1], yp[i, : len(s) - 1] = s[:-1], s[1:]
    lw, lp, out = posterior_log_weights(model, xp, yp, bit_noise=noise)
    assert out.bit_logits.abs().min() > 0.5  # Q ≠ prior: the P/Q factors are not all 1
    for i, s in enumerate(seqs):
        n = len(s) - 1
        ref, _, _ = posterior_log_weights(
            model, s[None, :-1], s[None, 1:], bit_noise=noise[i : i + 1, :n]
        )
        assert lw[i].item() == pytest.approx(ref.item(), abs=1e-4)
    assert (lp[1, 3:] == 0).all()


@pytest.mark.parametrize("posterior", ["uniform", "constant"])
def test_validation_normalises_per_scored_token(posterior):
    """A padded batch gives the values of its unpadded rows. The decoder ignores the codes
    (r = 0), so every CE is exact; ``uniform``: Q = prior, so every estimate is exact;
    ``constant``: an encoder that ignores the tokens, with the same non-zero KL at every
    position — counting the padding's KL would change kl_bits and the ELBO."""
    cfg = ModelConfig.preset("debug")
    model = FreeTransformer(cfg).eval()
    with torch.no_grad():
        model.post_sampler.weight.zero_()
        if posterior == "uniform":
            model.encoder.readout.weight.zero_()
        else:
            for b in model.encoder.blocks:
                b.attn.wo.weight.zero_()
            model.encoder.readout.weight.mul_(30)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, cfg.vocab_size, (n + 1,), generator=g) for n in (9, 4)]
    xp = torch.zeros(2, 9, dtype=torch.long)
    yp = torch.full((2, 9), IGNORE_INDEX)
    for i, s in enumerate(seqs):
        xp[i, : len(s) - 1], yp[i, : len(s) - 1] = s[:-1], s[1:]
    kw = dict(latent=True, n_bits=cfg.latent_bits, k=2, seed=0, device=torch.device("cpu"))
    padded = evaluate(model, [(xp, yp)], **kw)
    rows = evaluate(model, [(s[None, :-1], s[None, 1:]) for s in seqs], **kw)
    keys = ["ce_prior", "ce_encoder", "elbo", "nll_is_prior", "kl_bits"]
    if posterior == "uniform":
        keys.append("nll_is")
        assert padded["kl_bits"] == pytest.approx(0, abs=1e-6)
    else:
        assert padded["kl_bits"] > 0.1
    for key in keys:
        assert padded[key] == pytest.approx(rows[key], abs=1e-5), key
    assert padded["is_samples"] == 2


def test_validation_estimate_matches_enumeration_with_padding(tiny):
    """``evaluate``'s estimates on a padded batch: the total −log P of the unpadded rows per
    scored token, within the measured standard error."""
    model, x, y = tiny
    lens = [7, 3]
    xp, yp = right_padded(x, y, lens)
    exact = -sum(exact_document(model, x[:, :n], y[:, :n]) for n in lens) / sum(lens)
    vals = [evaluate(model, [(xp, yp)], latent=True, n_bits=1, k=256, seed=s,
                     device=torch.device("cpu")) for s in range(4)]  # fmt: skip
    for key in ("nll_is", "nll_is_prior"):
        mean, se = spread([v[key] for v in vals])
        print(f"{key} {mean:.5f} ± {se:.5f} (4 seeds, k = 256), exact {exact:.5f}")
        assert se < 0.01
        assert abs(mean - exact) < 4 * se + 1e-3


def test_prior_log_weights_are_log_p_of_s_under_uniform_codes(tiny):
    """The prior proposal's weight (validation's nll_is_prior) is log P(S | Z) for Z drawn
    uniformly — not under the encoder's codes, which would favour codes that explain S."""
    model, x, y = tiny
    x, y = x.expand(4, -1), y.expand(4, -1)
    lw, lp = prior_log_weights(model, x, y, generator=torch.Generator().manual_seed(5))
    z = uniform_codes(
        tuple(x.shape), model.config.latent_bits, generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        want = token_log_probs(model(x, latents=z).logits, y)
    assert torch.equal(lp, want) and torch.equal(lw, want.double().sum(-1))
    assert lw.dtype == torch.float64 and len(set(lw.tolist())) > 1  # the draws differ


@pytest.mark.parametrize("inject", ["kv", "residual"])
def test_draws_share_the_first_half_and_equal_separate_forwards(inject):
    """forward(draws=m) runs the first L/2 blocks and the encoder once and the rest on m·B
    rows: every output equals the plain forward over the m-times repeated batch with the same
    codes (prior) or the same uniforms (encoder) — what lets validation batch its k draws."""
    cfg = ModelConfig.preset("debug", latent_bits=3, latent_injection=inject)
    model = z_matters_cfg(cfg)
    g = torch.Generator().manual_seed(3)
    m, B, T = 4, 2, 9
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    codes = uniform_codes((m * B, T), cfg.latent_bits, generator=g)
    noise = torch.rand(m * B, T, cfg.latent_bits, generator=g)
    with torch.no_grad():
        want = model(x.repeat(m, 1), latents=codes).logits
        got = model(x, latents=codes, draws=m).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want = model(x.repeat(m, 1), y.repeat(m, 1), bit_noise=noise)
        got = model(x, y, bit_noise=noise, draws=m)
    for name in ("logits", "codes", "bit_logits", "kl_tokens", "kl", "ce"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
    # the draws differ from each other (the test would pass trivially if Z changed nothing)
    assert (got.logits[:B] - got.logits[B : 2 * B]).abs().max() > 1e-2
    lw, _, _ = posterior_log_weights(model, x, y, bit_noise=noise, draws=m)
    ref, _, _ = posterior_log_weights(model, x.repeat(m, 1), y.repeat(m, 1), bit_noise=noise)
    torch.testing.assert_close(lw, ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(Exception, match="bit_noise has shape"):
        model(x, bit_noise=noise[:B], draws=m)


@pytest.mark.parametrize("proposal", ["prior", "encoder"])
def test_estimates_do_not_depend_on_how_the_draws_are_batched(proposal):
    """max_rows splits the k draws into forwards of m draws each (likelihood.draw_chunks);
    the random stream is consumed in the same order, so every split gives the same numbers."""
    model = z_matters(bits=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    y = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)

    def both(max_rows):
        kw = dict(generator=torch.Generator().manual_seed(1), max_rows=max_rows)
        doc = log_likelihood(model, x, y, 8, **kw)
        kw["generator"] = torch.Generator().manual_seed(1)
        cond = conditional_log_likelihood(model, x, y, 4, 8, proposal=proposal, **kw)
        return doc, cond

    want = both(None)  # all 8 draws in one forward
    for max_rows in (7, 2, 1):  # 3 + 3 + 2 draws, 1 per forward, 1 per forward
        for a, b in zip(both(max_rows), want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
