"""The opt-in latent warm-up schedules (freeformer.finetune.latent_warmup): r ramped in from
0, so a post-sampler at the residual scale leaves step 0 at the source model's function, and
free bits that start at H bits (nothing penalised) and fall to the model's κ."""

import math

import pytest
import torch
from resume import assert_same_final_weights, train_then_resume

from freeformer.checkpoint import load_model
from freeformer.data.synthetic import SyntheticBatches
from freeformer.distributed import DistInfo
from freeformer.errors import ConfigError
from freeformer.finetune import latent_warmup
from freeformer.latent import free_bits_loss
from freeformer.runconfig import load_run_config
from freeformer.train import global_bit_noise, train


def cfg_with(**train_kv):
    kv = {"progress": "false", "eval_every": "0", "log_every": "1", "ckpt_every": "0"}
    kv.update({k: str(v) for k, v in train_kv.items()})
    # κ far below the KL at init, so the free-bits hinge is active without the warm-up.
    over = [f"train.{k}={v}" for k, v in kv.items()] + ["model.free_bits=0.001"]
    return load_run_config(preset="debug", overrides=over)


@pytest.fixture(scope="module")
def loud_source(tmp_path_factory):
    """A run whose post-sampler is far from 0, so r changes the function."""
    d = tmp_path_factory.mktemp("warm") / "source"
    train(cfg_with(max_steps=2), d, quiet=True)
    return d


def test_schedules_at_their_ends():
    tc = cfg_with(max_steps=20, latent_ramp_steps=10, free_bits_warmup_steps=8).train
    model, _ = None, None
    from freeformer.model import FreeTransformer

    model = FreeTransformer(cfg_with().model)
    H, kappa = model.config.latent_bits, model.config.free_bits
    assert latent_warmup(model, 0, tc) == pytest.approx(H * math.log(2))
    assert model.post_sampler.r_scale == 0.0
    assert latent_warmup(model, 4, tc) == pytest.approx((H + 0.5 * (kappa - H)) * math.log(2))
    assert model.post_sampler.r_scale == pytest.approx(0.4)
    assert latent_warmup(model, 8, tc) is None  # the model's κ from step M on
    latent_warmup(model, 10, tc)
    assert model.post_sampler.r_scale == 1.0


def test_ramped_first_step_is_the_function_without_r(loud_source, tmp_path):
    """With the ramp, step 1's loss is computed with r = 0: the loss of the same weights
    with the post-sampler zeroed; and the KL warm-up leaves the loss equal to the CE."""
    cfg = cfg_with(
        init_from=str(loud_source), max_steps=3, latent_ramp_steps=3, free_bits_warmup_steps=3
    )
    train(cfg, tmp_path / "ft", quiet=True)
    ref, _ = load_model(loud_source)
    assert ref.post_sampler.weight.abs().max() > 0.01
    x, y = SyntheticBatches(cfg.train.batch_size, cfg.train.seed, 0, 1).next_batch()
    noise = global_bit_noise(
        cfg, torch.Generator().manual_seed(cfg.train.seed + 1), DistInfo(), torch.device("cpu")
    )
    with torch.no_grad():
        loud = ref.train()(x, y, bit_noise=noise)
        ref.post_sampler.weight.zero_()
        quiet = ref(x, y, bit_noise=noise)
    import json

    first = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(float(loud.ce) - float(quiet.ce)) > 5e-5  # r matters at full scale
    assert first["ce"] == pytest.approx(float(quiet.ce), abs=1e-6)
    assert first["loss"] == pytest.approx(first["ce"], abs=1e-7)  # κ_0 = H bits: no penalty
    assert float(free_bits_loss(quiet.kl_tokens, cfg.model.free_bits_nats)) > 1e-4


def test_warmed_up_resume_is_bit_identical(loud_source, tmp_path):
    cfg = cfg_with(
        init_from=str(loud_source),
        max_steps=6,
        ckpt_every=3,
        keep_last=5,
        latent_ramp_steps=5,
        free_bits_warmup_steps=4,
    )
    assert_same_final_weights(*train_then_resume(cfg, tmp_path, keep_step=3))


def test_a_warm_up_longer_than_the_run_is_one_line():
    with pytest.raises(ConfigError, match="latent_ramp_steps"):
        cfg_with(max_steps=5, latent_ramp_steps=6)


def test_bit_balance_is_the_per_bit_aggregate_kl_and_bounds_the_mismatch():
    from freeformer.diagnostics import pooled_split
    from freeformer.latent import bit_balance_kl

    g = torch.Generator().manual_seed(0)
    L = torch.randn(6, 9, 5, generator=g) * 2 + torch.linspace(-1.5, 1.0, 5)
    q = torch.sigmoid(L.double()).reshape(-1, 5).mean(0)
    want = float((q * (2 * q).log() + (1 - q) * (2 * (1 - q)).log()).sum())
    got = float(bit_balance_kl(L))
    assert got == pytest.approx(want, rel=1e-5)
    assert got <= pooled_split(L)["mismatch_bits"] * math.log(2) + 1e-6
    # Every token the same sharp code: H·log 2; codes spread evenly: 0.
    same = torch.full((4, 8, 5), 30.0)
    assert float(bit_balance_kl(same)) == pytest.approx(5 * math.log(2), rel=1e-4)
    codes = torch.arange(32)
    spread = ((codes[:, None] >> torch.arange(5)) & 1).float() * 60 - 30
    assert float(bit_balance_kl(spread[None])) == pytest.approx(0.0, abs=1e-6)


def test_code_balance_weight_adds_lambda_times_the_term_to_the_loss(loud_source, tmp_path):
    import json

    from freeformer.latent import bit_balance_kl

    lam = 3.0
    cfg = cfg_with(init_from=str(loud_source), max_steps=1, code_balance_weight=lam)
    train(cfg, tmp_path / "ft", quiet=True)
    ref, _ = load_model(loud_source)
    x, y = SyntheticBatches(cfg.train.batch_size, cfg.train.seed, 0, 1).next_batch()
    noise = global_bit_noise(
        cfg, torch.Generator().manual_seed(cfg.train.seed + 1), DistInfo(), torch.device("cpu")
    )
    with torch.no_grad():
        out = ref.train()(x, y, bit_noise=noise)
    term = float(bit_balance_kl(out.bit_logits))
    assert term > 1e-4
    first = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(float(out.loss) + lam * term, abs=1e-5)


def test_a_warm_up_as_long_as_the_run_validates_the_saved_function(loud_source, tmp_path):
    """Ramp N = max_steps: the last step trains with r × (N−1)/N, but the final validation
    (and the checkpoint, used at scale 1) must be the model at full scale."""
    import json

    from freeformer.validation import evaluate

    cfg = cfg_with(init_from=str(loud_source), max_steps=2, latent_ramp_steps=2)
    train(cfg, tmp_path / "ft", quiet=True)
    model, _ = load_model(tmp_path / "ft")
    assert model.post_sampler.r_scale == 1.0
    from freeformer.train import build_data

    _, val = build_data(cfg, DistInfo())
    want = evaluate(
        model,
        val,
        latent=True,
        n_bits=6,
        k=cfg.train.importance_samples,
        seed=cfg.train.seed + 2,
        device=torch.device("cpu"),
    )
    lines = (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
    got = [json.loads(ln) for ln in lines if '"val"' in ln][-1]
    assert got["ce_prior"] == pytest.approx(want["ce_prior"], abs=1e-6)


def test_latent_options_on_a_baseline_are_one_line():
    with pytest.raises(ConfigError, match="code_balance_weight"):
        load_run_config(
            preset="debug", overrides=["model.latent=false", "train.code_balance_weight=1"]
        )
