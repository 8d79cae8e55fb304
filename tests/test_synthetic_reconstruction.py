"""The reconstruction diagnostic and the Figure-4 sampling protocol of `freeformer synthetic`."""

import pytest
import torch

import freeformer.experiments.reconstruction as reconstruction_module
import freeformer.generate as generate_module
from freeformer.config import ModelConfig
from freeformer.data.synthetic import SEQ_LEN, encode, sample_annotated
from freeformer.errors import DataError
from freeformer.experiments.reconstruction import (
    KINDS,
    reconstruction,
    score_reconstruction,
    token_kinds,
)
from freeformer.experiments.synthetic import GROUP_SIZE, figure4_panel, sample_groups
from freeformer.model import FreeTransformer

#          prompt  body: 3 blanks, '!', 2 blanks, target at 6 with a noised 3rd letter, blanks
SOURCE = "K>" + "___!__" + "KK!KKKKK" + "_" * 48 + "!" + "_"
assert len(SOURCE) == SEQ_LEN


def small_model(**kw):
    cfg = ModelConfig.preset(
        "synthetic", dim=32, n_layers=2, n_heads=2, n_kv_heads=2, latent_bits=4, free_bits=1.0, **kw
    )
    return FreeTransformer(cfg, seed=0).eval()


def test_token_kinds_class_each_position_by_the_token_it_first_predicts():
    tokens = encode(SOURCE)[None]
    kinds = token_kinds(tokens, torch.tensor([6]))[0].tolist()
    name = [KINDS[k] for k in kinds]
    # Position t is classed by token t+1 = body index t-1.
    assert name[0] == "prompt"  # predicts '>'
    assert name[1:4] == ["blank before target"] * 3  # body 0..2
    assert name[4] == "noise"  # body 3 = '!'
    assert name[5:7] == ["blank before target"] * 2  # body 4..5
    assert name[7] == "target start"  # body 6
    assert name[8] == "target rest" and name[9] == "noise"  # body 7, body 8 = '!'
    assert name[10:15] == ["target rest"] * 5  # body 9..13
    assert name[15:63] == ["blank after target"] * 48
    assert name[63] == "noise" and name[64] == "blank after target"
    assert len(name) == SEQ_LEN - 1


def test_score_reconstruction_compares_regenerations_with_their_sources():
    moved = "K>" + "___!___" + "K" * 8 + "_" * 49  # target one to the right
    other_noise = "K>" + "______" + "K" * 8 + "_" * 45 + "!!" + "___"
    broken = "K>" + "KK" + "_" * 62
    r = score_reconstruction([SOURCE] * 4, [SOURCE, moved, other_noise, broken])
    assert r["validity"] == 0.75
    assert r["position_match"] == 0.5  # SOURCE and other_noise; moved and broken miss
    noise_src = {3, 8, 62}
    expected = (
        1.0
        + len({3} & noise_src) / len({3} | noise_src)
        + len({59, 60} & noise_src) / len({59, 60} | noise_src)
    ) / 3
    assert r["noise_jaccard"] == pytest.approx(expected)
    with pytest.raises(DataError):
        score_reconstruction([broken], [SOURCE])
    with pytest.raises(DataError):
        score_reconstruction([SOURCE], [])


def test_reconstruction_regenerates_from_the_posterior_codes(monkeypatch):
    """The regeneration is pinned to the encoder's codes of each source (plus one prior code
    for the unused last position), and the KL split covers every position once."""
    model = small_model()
    seen = {}
    real_generate = reconstruction_module.generate

    def spy(m, prompt, n, **kw):
        seen["latents"] = kw["latents"].clone()
        return real_generate(m, prompt, n, **kw)

    monkeypatch.setattr(reconstruction_module, "generate", spy)
    gen = torch.Generator().manual_seed(3)
    r = reconstruction(model, 16, gen)
    # Replay the same draws: sources, then the posterior, on a fresh generator.
    g2 = torch.Generator().manual_seed(3)
    src = sample_annotated(16, g2)
    with torch.no_grad():
        out = model(src.tokens[:, :-1], generator=g2)
    assert torch.equal(seen["latents"][:, :-1], out.codes)
    kinds = token_kinds(src.tokens, src.start)
    kl = out.kl_tokens / 0.6931471805599453
    weighted = sum(
        r["kl_bits_by_kind"][k] * int((kinds == i).sum())
        for i, k in enumerate(KINDS)
        if r["kl_bits_by_kind"][k] is not None
    )
    assert weighted / kl.numel() == pytest.approx(float(kl.mean()), rel=1e-5)
    assert r["kl_bits"] == pytest.approx(float(kl.mean()), rel=1e-6)
    with pytest.raises(DataError):
        reconstruction(FreeTransformer(model.config.replace(latent=False)), 4, gen)


def _capture_latents(monkeypatch, model):
    calls = []
    real_generate = generate_module.generate

    def spy(m, prompt, n, **kw):
        assert m is model
        calls.append(kw.get("latents"))
        return real_generate(m, prompt, n, **kw)

    monkeypatch.setattr(generate_module, "generate", spy)
    return calls


def test_independent_groups_draw_every_code_from_the_prior_per_sequence(monkeypatch):
    """Paper protocol: independent = a prior draw of the whole code sequence (prompt
    included) for each sequence; shared = one prior draw per group, pinned for the group."""
    model = small_model()
    calls = _capture_latents(monkeypatch, model)
    gen = torch.Generator().manual_seed(0)
    n = 3
    sample_groups(model, n, shared=False, gen=gen)
    z = calls[-1]
    assert z is not None and z.shape == (n * GROUP_SIZE, SEQ_LEN)  # prompt codes pinned too
    assert len({tuple(row) for row in z.tolist()}) == n * GROUP_SIZE
    sample_groups(model, n, shared=True, gen=gen)
    z = calls[-1].view(n, GROUP_SIZE, SEQ_LEN)
    assert torch.equal(z, z[:, :1].expand_as(z))
    assert len({tuple(row) for row in z[:, 0].tolist()}) == n
    calls.clear()
    panel = figure4_panel(model, gen)
    assert [c.shape[0] for c in calls] == [GROUP_SIZE, 1, 1]
    assert len(panel["independent"]) == GROUP_SIZE and len(panel["shared"]) == 2


def test_baseline_groups_pin_nothing(monkeypatch):
    model = FreeTransformer(small_model().config.replace(latent=False)).eval()
    calls = _capture_latents(monkeypatch, model)
    gen = torch.Generator().manual_seed(0)
    sample_groups(model, 2, shared=False, gen=gen)
    sample_groups(model, 2, shared=True, gen=gen)
    assert calls == [None, None]
