"""The KL's split into information and prior mismatch (freeformer.diagnostics), checked
against brute-force enumeration, and the fields `freeformer validate --json` reports."""

import pytest
import torch

import freeformer.diagnostics as diag
from freeformer.diagnostics import kl_split, pooled_split


def _enumerated_split(L):
    """KL, mismatch and information (bits, per position) by brute force over every code."""
    n, T, H = L.shape
    codes = torch.arange(1 << H)
    bits = ((codes[:, None] >> torch.arange(H)) & 1).double()  # (C, H)
    p = torch.sigmoid(L.double())[:, :, None, :]  # (n, T, 1, H)
    q = torch.where(bits.bool(), p, 1 - p).prod(-1)  # (n, T, C)
    u = 1.0 / (1 << H)
    kl = (q * (q / u).log2()).sum(-1).mean(0)
    agg = q.mean(0)
    mism = (agg * (agg / u).log2()).sum(-1)
    return kl, mism, kl - mism


def _biased_logits(n=40, T=3, H=4, seed=0):
    # Posteriors that depend on the sequence *and* share a bias: both terms are non-zero.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, H, generator=g) * 2 + torch.linspace(-2.0, 1.5, H)


@pytest.mark.parametrize("chunk", [1024, 2])
def test_kl_splits_into_information_and_prior_mismatch(monkeypatch, chunk):
    monkeypatch.setattr(diag, "_CODE_CHUNK", chunk)
    L = _biased_logits()
    d = kl_split(L)
    kl, mism, info = _enumerated_split(L)
    torch.testing.assert_close(d["kl"], kl)
    torch.testing.assert_close(d["mismatch"], mism)
    torch.testing.assert_close(d["information"], info)
    assert (d["information"] > 0.1).all() and (d["mismatch"] > 0.1).all()
    # The same posterior whatever the sequence: all of the KL is mismatch, none information.
    same = kl_split(L[:1].expand(40, -1, -1))
    torch.testing.assert_close(same["information"], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(same["mismatch"], same["kl"])
    # Point masses spread evenly over the 16 codes: H bits of information, no mismatch.
    codes = torch.arange(16).repeat(3)
    point = ((((codes[:, None] >> torch.arange(4)) & 1) * 2 - 1) * 40.0)[:, None, :]
    d = kl_split(point)
    torch.testing.assert_close(d["information"], torch.full((1,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(d["mismatch"], torch.zeros(1, dtype=torch.float64))


def test_sampled_mismatch_agrees_with_enumeration():
    """Above ENUMERATE_BITS the mismatch is estimated from codes drawn from Q̄; on a case
    small enough to enumerate, the estimate is within its Monte-Carlo error of the truth."""
    L = _biased_logits(n=60, T=2, H=6, seed=1)
    exact = kl_split(L)
    g = torch.Generator().manual_seed(0)
    est = kl_split(L, enumerate_bits=0, samples=20_000, generator=g)
    torch.testing.assert_close(est["kl"], exact["kl"])
    assert (est["mismatch"] - exact["mismatch"]).abs().max() < 0.03, (est, exact)
    assert (exact["mismatch"] > 0.3).all()


def test_pooled_split_uses_one_aggregate_over_the_masked_tokens():
    L = _biased_logits(n=8, T=5, H=4, seed=2)
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[:, 3:] = False
    got = pooled_split(L, mask)
    kl, mism, info = _enumerated_split(L[:, :3].reshape(-1, 1, 4))
    assert got["tokens"] == 24
    assert got["kl_bits"] == pytest.approx(float(kl[0]))
    assert got["mismatch_bits"] == pytest.approx(float(mism[0]))
    assert got["information_bits"] == pytest.approx(float(info[0]))


def test_validate_json_reports_the_split_of_the_validation_posteriors(tmp_path, capsys):
    """`freeformer validate --json`: one object with the fields the latent study reads;
    information + mismatch is the posteriors' KL, and both equal pooled_split over the
    encoder's bit logits on the same validation windows."""
    import json

    from freeformer.checkpoint import load_model
    from freeformer.cli import main
    from freeformer.distributed import DistInfo
    from freeformer.likelihood import code_mask
    from freeformer.runconfig import RunConfig
    from freeformer.train import build_data

    run = tmp_path / "run"
    argv = ["train", "--preset", "debug", "--out", str(run), "--train.max_steps=3", "--quiet"]
    assert main(argv + ["--train.eval_every=0"]) == 0
    capsys.readouterr()
    assert main(["validate", str(run), "--batches", "2", "--k", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    for key in (
        "ce_prior",
        "ce_encoder",
        "kl_bits",
        "information_bits",
        "mismatch_bits",
        "nll_is_prior",
        "nll_is",
        "is_samples",
        "step",
        "tokens",
    ):
        assert key in got, key
    assert got["is_samples"] == 2 and got["step"] == 3
    assert got["information_bits"] + got["mismatch_bits"] == pytest.approx(got["kl_bits"], 1e-4)
    model, ck = load_model(run, "cpu")
    cfg = RunConfig.from_dict(dict(ck.state["config"]))
    import dataclasses

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batches=2))
    _, val = build_data(cfg, DistInfo())
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x).bit_logits[code_mask(y)] for x, y in val])
    want = pooled_split(logits)
    assert got["tokens"] == want["tokens"]
    assert got["information_bits"] == pytest.approx(want["information_bits"], abs=1e-5)
    assert got["mismatch_bits"] == pytest.approx(want["mismatch_bits"], abs=1e-5)
