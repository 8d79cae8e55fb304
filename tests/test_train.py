"""Training: resume = uninterrupted, honest validation maths, schedule, configs."""

import itertools
import json
import math

import pytest
import torch
from resume import assert_same_final_weights, train_then_resume

import freeformer.runtime as runtime_mod
from freeformer import FreeTransformer, ModelConfig
from freeformer.checkpoint import list_checkpoints
from freeformer.metrics import LatentMonitor
from freeformer.optim import lr_at, param_groups
from freeformer.runconfig import TrainConfig, available_presets, load_run_config
from freeformer.runtime import autocast, resolve_precision
from freeformer.train import train
from freeformer.validation import evaluate


def debug_cfg(**train):
    overrides = [f"train.{k}={v}" for k, v in {"progress": "false", **train}.items()]
    return load_run_config(preset="debug", overrides=overrides)


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_identical_to_uninterrupted(tmp_path, precision):
    # bf16: CPU autocast, what precision=auto picks on CPUs with native bf16 matmuls.
    cfg = debug_cfg(
        max_steps=12, ckpt_every=6, eval_every=6, log_every=1, keep_last=5, precision=precision
    )
    full, cut = train_then_resume(cfg, tmp_path, keep_step=6)
    a, b = records(full), records(cut)
    assert len(a) == len(b) and [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "kl_bits", "lr", "ce_prior", "nll_is"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)  # exact, not approximate
    assert_same_final_weights(full, cut)


def test_training_reduces_loss_and_writes_run(tmp_path):
    cfg = debug_cfg(max_steps=30, log_every=5, eval_every=0, ckpt_every=0, lr=0.01)
    res = train(cfg, tmp_path / "run", quiet=True)
    recs = [r for r in records(tmp_path / "run") if r.get("kind") != "val"]
    assert recs[-1]["ce"] < recs[0]["ce"] - 0.5
    assert {"step", "loss", "ce", "kl_bits", "lr", "tokens"} <= set(recs[0])
    assert res.step == 30 and res.tokens == 30 * 8 * 65
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["dim"] == 32 and saved["train"]["max_steps"] == 30
    assert len(list_checkpoints(tmp_path / "run")) == 1  # only the final one


def test_keep_last_prunes_old_checkpoints(tmp_path):
    cfg = debug_cfg(max_steps=8, ckpt_every=2, keep_last=2, eval_every=0)
    train(cfg, tmp_path / "r", quiet=True)
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step_00000006", "step_00000008"]


def exact_nll(model, x, y, n_bits):
    """−log P(S)/T by enumerating every latent sequence (tiny H and T only)."""
    B, T = x.shape
    logps = []
    for z in itertools.product(range(1 << n_bits), repeat=T):
        codes = torch.tensor(z).expand(B, T)
        with torch.no_grad():
            logits = model(x, latents=codes).logits
        lp = torch.log_softmax(logits.double(), -1).gather(-1, y[..., None]).squeeze(-1).sum(1)
        logps.append(lp - T * n_bits * math.log(2))
    return float(-(torch.logsumexp(torch.stack(logps), 0)).sum() / (B * T))


def test_importance_sampled_nll_matches_enumeration():
    cfg = ModelConfig.preset("debug", latent_bits=1, free_bits=0.5)
    model = FreeTransformer(cfg, seed=0).eval()
    with torch.no_grad():  # a position-dependent posterior far from uniform, yet with every
        model.encoder.readout.weight.mul_(15)  # latent sequence still sampled at k = 400
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, 4), generator=g)
    y = torch.randint(0, cfg.vocab_size, (2, 4), generator=g)
    exact = exact_nll(model, x, y, 1)
    v = evaluate(model, [(x, y)], latent=True, n_bits=1, k=400, seed=0, device=torch.device("cpu"))
    assert v["nll_is"] == pytest.approx(exact, abs=0.01)
    assert v["nll_is_prior"] == pytest.approx(exact, abs=0.01)
    assert v["elbo"] >= exact - 1e-4  # the ELBO is an upper bound on −log P(S)/T
    assert v["kl_bits"] > 0.02  # Q ≠ prior, so the log Q − log P terms matter


def test_validation_of_an_unused_latent_is_exact():
    cfg = ModelConfig.preset("debug")
    model = FreeTransformer(cfg).eval()
    with torch.no_grad():  # Q = uniform and r = 0: every estimate equals the true CE
        model.encoder.readout.weight.zero_()
        model.post_sampler.weight.zero_()
    x = torch.randint(0, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    v = evaluate(
        model,
        [(x[:, :-1], x[:, 1:])],
        latent=True,
        n_bits=cfg.latent_bits,
        k=3,
        seed=0,
        device=torch.device("cpu"),
    )
    assert v["kl_bits"] == pytest.approx(0, abs=1e-6)
    for key in ("ce_encoder", "elbo", "nll_is", "nll_is_prior"):
        assert v[key] == pytest.approx(v["ce_prior"], abs=1e-5)


def test_lr_schedule():
    tc = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(0.1)
    assert lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(10, tc) == pytest.approx(1.0)
    assert lr_at(55, tc) == pytest.approx(0.55)
    assert lr_at(100, tc) == pytest.approx(0.1)
    assert all(lr_at(s + 1, tc) <= lr_at(s, tc) for s in range(10, 100))


def test_param_groups_exclude_lookup_tables_and_norms():
    m = FreeTransformer(ModelConfig.preset("debug"))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"tok_emb.weight", "post_sampler.weight", "encoder.zeta", "norm.weight"} <= nd
    assert all(p.dim() >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_latent_monitor_warns_once_per_condition():
    mon = LatentMonitor(kappa_bits=1.0, n_bits=8, patience=3)
    assert [mon.update(s, 0.01) for s in range(3)][:2] == [None, None]
    assert mon.warned == {"low"}
    assert mon.update(4, 0.01) is None  # once
    assert all(mon.update(s, 0.5) is None for s in range(5))
    out = [mon.update(s, 6.0) for s in range(3)]
    assert out[2] is not None and "copying" in out[2]


@pytest.mark.parametrize("name", available_presets())
def test_every_shipped_config_parses(name):
    cfg = load_run_config(preset=name)
    assert cfg.train.seq_len <= cfg.model.max_seq_len
    assert set(available_presets()) >= {
        "debug",
        "synthetic",
        "stdlib-code",
        "paper-1.5b",
        "paper-8b",
        "paper-8b-1t",
    }


# The paper's token budgets (Section 4.2): 1.5B on 47B tokens; 8B on 200B, and on 1T tokens
# with κ = 1/2 bit for the long run.
PAPER_BUDGETS = {
    "paper-1.5b": ("paper-1.5b", 47e9),
    "paper-8b": ("paper-8b", 200e9),
    "paper-8b-1t": ("paper-8b", 1e12),
}


@pytest.mark.parametrize("name", sorted(PAPER_BUDGETS))
def test_paper_configs_train_the_papers_token_budget(name):
    shape, budget = PAPER_BUDGETS[name]
    cfg = load_run_config(preset=name)
    tc = cfg.train
    tokens = tc.max_steps * tc.batch_size * tc.seq_len  # optimizer steps × global batch tokens
    assert abs(tokens / budget - 1) < 0.01, (
        f"{name}: {tokens / 1e9:.1f}B tokens, paper {budget / 1e9:g}B"
    )
    assert cfg.model == ModelConfig.preset(shape)  # the paper's shape, κ = 1/2 bit
    assert cfg.model.free_bits == 0.5


def test_activation_checkpointing_gives_identical_gradients():
    from freeformer.distributed import checkpoint_activations

    cfg = ModelConfig.preset("debug")
    a, b = FreeTransformer(cfg, seed=0), FreeTransformer(cfg, seed=0)
    checkpoint_activations(b)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    noise = torch.rand(2, 16, cfg.latent_bits, generator=torch.Generator().manual_seed(1))
    for m in (a, b):
        m(x, x, bit_noise=noise).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


def test_auto_precision_is_bf16_only_where_measured_faster(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    wide, narrow = runtime_mod.CPU_BF16_MIN_DIM, runtime_mod.CPU_BF16_MIN_DIM // 2
    for native in (True, False):
        monkeypatch.setattr(runtime_mod, "bf16_native_cpu", lambda n=native: n)
        assert resolve_precision(cpu, "auto", wide) == ("bf16" if native else "fp32")
        assert resolve_precision(cpu, "auto", narrow) == "fp32"  # casts cost more than bf16 saves
        assert resolve_precision(cuda, "auto", narrow) == "bf16"
        for explicit in ("fp32", "bf16"):  # explicit choices are never overridden
            assert resolve_precision(cpu, explicit, narrow) == explicit
    monkeypatch.setattr(runtime_mod, "bf16_native_cpu", lambda: True)
    with autocast(cpu, "auto", wide):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast(cpu, "auto", narrow):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_ce_and_kl_stay_float32_under_cpu_bf16_autocast():
    F = torch.nn.functional
    cfg = ModelConfig.preset("debug", dim=128, n_heads=4, n_kv_heads=2)
    model = FreeTransformer(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with autocast(torch.device("cpu"), "bf16"):
        out = model(x, x, generator=torch.Generator().manual_seed(1))
    assert out.logits.dtype == torch.bfloat16  # autocast is on: the matmuls ran in bf16
    for v in (out.ce, out.kl, out.kl_loss, out.kl_tokens):
        assert v.dtype == torch.float32
    # Both equal their float64 evaluation on the (bf16-rounded) logits to float32 accuracy.
    ce64 = F.cross_entropy(out.logits.double().flatten(0, 1), x.flatten())
    torch.testing.assert_close(out.ce.double(), ce64, rtol=1e-6, atol=1e-6)
    L = out.bit_logits.double()  # KL_t = Σ_h (log 2 − h_b(σ(L_h))) in float64
    kl64 = (
        math.log(2) + torch.sigmoid(L) * F.logsigmoid(L) + torch.sigmoid(-L) * F.logsigmoid(-L)
    ).sum(-1)
    torch.testing.assert_close(out.kl_tokens.double(), kl64, rtol=1e-5, atol=1e-6)


def test_micro_batches_give_the_same_step_and_losses():
    """1, 2 and 4 micro-batches: same reported metrics and the same SGD step (lr = 1, no
    clipping, so the parameter change is exactly minus the averaged gradient)."""
    import contextlib

    from freeformer.train import train_step

    cfg = ModelConfig.preset("debug")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (8, 16), generator=g)
    y = torch.randint(0, cfg.vocab_size, (8, 16), generator=g)
    noise = torch.rand(8, 16, cfg.latent_bits, generator=g)
    tc = TrainConfig(batch_size=8, seq_len=16, grad_clip=0.0)
    init = FreeTransformer(cfg, seed=0).state_dict()
    results = {}
    for n in (1, 2, 4):
        m = FreeTransformer(cfg, seed=0)
        with torch.no_grad():  # KL per token over κ for part of the batch: the hinge is live
            m.encoder.readout.weight.mul_(60)
        metrics = train_step(
            m, torch.optim.SGD(m.parameters(), lr=1.0), x, y, noise, n, tc, contextlib.nullcontext()
        )
        results[n] = ({k: float(v) for k, v in metrics.items()}, m.state_dict())
    m1, s1 = results[1]
    assert m1["kl_loss"] > 0
    assert max(float((s1[k] - init[k]).abs().max()) for k in s1) > 1e-2
    for n in (2, 4):
        mn, sn = results[n]
        for k in ("loss", "ce", "kl", "kl_loss"):
            assert mn[k] == pytest.approx(m1[k], rel=1e-6), (n, k)
        for k in s1:
            torch.testing.assert_close(sn[k], s1[k], rtol=1e-5, atol=1e-7, msg=f"{n}: {k}")
