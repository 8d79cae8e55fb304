"""Claims that one-line bugs used to break silently (issue 21): each test here fails when its
bug is applied alone (the break for each is recorded in docs/testing.md)."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from freeformer import FreeTransformer, ModelConfig
from freeformer import checkpoint as ckpt_mod
from freeformer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from freeformer.cli import main
from freeformer.data.loader import TokenWindows
from freeformer.data.prepare import prepare
from freeformer.generate import generate, sample
from freeformer.latent import bit_matrix
from freeformer.runconfig import build_run_config, load_run_config
from freeformer.train import evaluate, train_step

CFG = ModelConfig.preset("debug")
LOG2 = math.log(2.0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------
# generate: EOS stops each row on its own
# ---------------------------------------------------------------------------------------
def test_eos_pads_each_row_from_its_own_first_eos_and_only_then():
    model = FreeTransformer(CFG, seed=0).eval()
    T0, n = 4, 12
    p = torch.randint(0, CFG.vocab_size, (4, T0), generator=gen(5))
    z = torch.zeros(T0 + n, dtype=torch.long)
    ref = generate(model, p, n, temperature=0, latents=z)  # greedy, rows independent
    new = ref[:, T0:]

    def first_eos(row, eos):
        hits = (new[row] == eos).nonzero()
        return int(hits[0]) if len(hits) else None

    # An EOS id that ends the rows at different steps and that some row never emits.
    for eos in new[0].tolist():
        firsts = [first_eos(r, eos) for r in range(len(p))]
        ends = {f for f in firsts if f is not None}
        if None in firsts and min(ends) < n - 2:
            break
    else:
        pytest.fail(f"no EOS candidate separates the rows of {new.tolist()}")
    expected = ref.clone()
    for r, f in enumerate(firsts):
        if f is not None:
            expected[r, T0 + f :] = eos
    out = generate(model, p, n, temperature=0, latents=z, eos_id=eos)
    assert out.shape == expected.shape, (out.shape, firsts)  # stops only when all rows ended
    assert torch.equal(out, expected), (out.tolist(), expected.tolist())

    # When every row has emitted it, generation stops early (all rows padded to the last).
    every = [r for r in range(len(p)) if first_eos(r, int(new[r, 1])) is not None]
    assert every
    p2 = p[every[:1]].repeat(2, 1)
    eos2 = int(new[every[0], 1])
    out2 = generate(model, p2, n, temperature=0, latents=z, eos_id=eos2)
    stop = first_eos(every[0], eos2)
    assert out2.shape[1] == T0 + stop + 1 and (out2[:, -1] == eos2).all()


# ---------------------------------------------------------------------------------------
# generate: temperature divides the logits
# ---------------------------------------------------------------------------------------
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_frequencies_follow_the_tempered_softmax(temperature):
    n = 40_000
    s = sample(LOGITS.expand(n, -1), temperature=temperature, generator=gen(0))
    counts = torch.bincount(s, minlength=5).double()
    expected = (LOGITS.double() / temperature).softmax(-1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # χ² with 4 degrees of freedom: P(χ² > 18.47) = 0.001. The draw is fixed by the seed;
    # T·logits instead of logits/T gives χ² in the thousands at both temperatures.
    assert chi2 < 18.47, (chi2, counts.tolist(), expected.tolist())


def test_tempered_top_k_renormalises_the_kept_tokens():
    n = 40_000
    s = sample(LOGITS.expand(n, -1), temperature=0.5, top_k=3, generator=gen(1))
    counts = torch.bincount(s, minlength=5).double()
    assert counts[3:].sum() == 0
    expected = (LOGITS[:3].double() / 0.5).softmax(-1) * n
    chi2 = float(((counts[:3] - expected) ** 2 / expected).sum())
    assert chi2 < 13.82, (chi2, counts.tolist())  # 2 d.o.f., P = 0.001


# ---------------------------------------------------------------------------------------
# validation: ELBO = CE(encoder codes) + KL, KL in bits exactly
# ---------------------------------------------------------------------------------------
def enumerated_kl_nats(bit_logits: torch.Tensor) -> torch.Tensor:
    """KL(Q(Z_t) || uniform) per position by summing over all 2^H codes (float64)."""
    H = bit_logits.shape[-1]
    bits = bit_matrix(H, torch.float64)  # (2^H, H)
    logp = torch.nn.functional.logsigmoid(bit_logits.double())
    logq = torch.nn.functional.logsigmoid(-bit_logits.double())
    log_Q = logp @ bits.T + logq @ (1 - bits).T  # (..., 2^H)
    return (log_Q.exp() * (log_Q + H * LOG2)).sum(-1)


def tiny_latent_model(scale):
    cfg = ModelConfig.preset("debug", latent_bits=3)
    model = FreeTransformer(cfg, seed=0).eval()
    with torch.no_grad():  # a posterior far from uniform, so the KL term is large
        model.encoder.readout.weight.mul_(scale)
    return cfg, model


def test_kl_bits_is_the_exact_kl_per_token_in_bits_and_elbo_adds_it():
    cfg, model = tiny_latent_model(30.0)
    x = torch.randint(0, cfg.vocab_size, (3, 7), generator=gen(2))
    y = torch.randint(0, cfg.vocab_size, (3, 7), generator=gen(3))
    v = evaluate(
        model,
        [(x, y)],
        latent=True,
        n_bits=cfg.latent_bits,
        k=2,
        seed=0,
        device=torch.device("cpu"),
    )
    with torch.no_grad():
        bit_logits = model(x).bit_logits
    kl_nats = float(enumerated_kl_nats(bit_logits).mean())
    assert kl_nats > 0.5  # far from the prior: a missing or mis-scaled term shows
    assert v["kl_bits"] == pytest.approx(kl_nats / LOG2, rel=1e-5)
    assert v["elbo"] == pytest.approx(v["ce_encoder"] + kl_nats, rel=1e-5)


def test_elbo_is_ce_under_the_encoder_codes_plus_kl_on_a_deterministic_posterior():
    # Saturated bit logits (|L| > 40): the encoder's draw is its sign pattern whatever the
    # generator, so CE(encoder codes) is computed here without replaying any random stream.
    cfg, model = tiny_latent_model(1e4)
    x = torch.randint(0, cfg.vocab_size, (2, 6), generator=gen(4))
    y = torch.randint(0, cfg.vocab_size, (2, 6), generator=gen(5))
    with torch.no_grad():
        L = model(x).bit_logits
        assert L.abs().min() > 40
        codes = ((L > 0).long() << torch.arange(cfg.latent_bits)).sum(-1)
        ce = float(model(x, y, latents=codes).ce)
    kl = float(enumerated_kl_nats(L).mean())
    v = evaluate(
        model,
        [(x, y)],
        latent=True,
        n_bits=cfg.latent_bits,
        k=3,
        seed=7,
        device=torch.device("cpu"),
    )
    assert v["ce_encoder"] == pytest.approx(ce, rel=1e-5)
    assert v["kl_bits"] == pytest.approx(kl / LOG2, rel=1e-5)
    assert v["elbo"] == pytest.approx(ce + kl, rel=1e-5)


# ---------------------------------------------------------------------------------------
# runconfig: every override applies, whether or not the TOML has its section
# ---------------------------------------------------------------------------------------
OVERRIDES = {
    "model": ("model.n_layers=6", "n_layers", 6),
    "train": ("train.max_steps=7", "max_steps", 7),
    "data": ("data.path=somewhere", "path", "somewhere"),
}


@pytest.mark.parametrize("section", list(OVERRIDES))
@pytest.mark.parametrize("toml_has_section", [True, False])
def test_override_applies_whether_or_not_the_toml_has_its_section(section, toml_has_section):
    # Every other section is given in the file, so only `section` may be missing.
    raw = {"data": {"source": "none"}} if section != "data" else {"train": {"seq_len": 65}}
    if toml_has_section:
        raw.setdefault(section, {})
    text, key, value = OVERRIDES[section]
    cfg = build_run_config(raw, [text])
    assert getattr(getattr(cfg, section), key) == value


def test_cli_override_of_a_section_missing_from_the_file(tmp_path):
    path = tmp_path / "only_model.toml"
    path.write_text('[model]\npreset = "debug"\n')
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert (
            main(
                [
                    "config",
                    "--config",
                    str(path),
                    "--train.max_steps=7",
                    "--train.seq_len=65",
                    "--data.path=elsewhere",
                ]
            )
            == 0
        )
    text = buf.getvalue()
    assert "max_steps = 7\n" in text and 'path = "elsewhere"\n' in text


# ---------------------------------------------------------------------------------------
# train_step: clipping acts before the step
# ---------------------------------------------------------------------------------------
def _gradient(model, x, y, noise):
    model.zero_grad(set_to_none=True)
    model(x, y, bit_noise=noise, return_logits=False).loss.backward()  # as train_step does
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("clip", [0.0, 1e-3, 1e6])
def test_clipping_scales_the_update_when_the_norm_exceeds_the_clip(clip):
    cfg = load_run_config(
        preset="debug", overrides=[f"train.grad_clip={clip}", "train.batch_size=2"]
    )
    # float64, so that the float32 rounding of parameters near 1 (norm weights) does not
    # hide a 1000-times smaller update.
    model = FreeTransformer(cfg.model, seed=0).double()
    x = torch.randint(0, cfg.model.vocab_size, (2, 9), generator=gen(0))
    y = torch.randint(0, cfg.model.vocab_size, (2, 9), generator=gen(1))
    noise = torch.rand(2, 9, cfg.model.latent_bits, generator=gen(2))
    g = _gradient(model, x, y, noise)
    norm = float(torch.linalg.vector_norm(torch.stack([t.norm() for t in g.values()])))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # update = −lr · (clipped) gradient
    model.zero_grad(set_to_none=True)
    m = train_step(model, opt, x, y, noise, 1, cfg.train, contextlib.nullcontext())
    factor = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
    if clip == 1e-3:
        assert factor < 1e-2  # the norm is far above the clip: the update must shrink
    if clip > 0:
        assert float(m["grad_norm"]) == pytest.approx(norm, rel=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            p.detach() - before[n],
            -lr * factor * g[n],
            rtol=1e-6,
            atol=1e-12,
            msg=lambda s, n=n: f"{n}: {s}",
        )


# ---------------------------------------------------------------------------------------
# resume refuses a changed seed, batch size or sequence length
# ---------------------------------------------------------------------------------------
def check_error(capsys, argv, match):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    errors = [ln for ln in err.splitlines() if ln.startswith("freeformer: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    assert match in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume") / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "debug",
                "--out",
                str(d),
                "--train.max_steps=2",
                "--train.eval_every=0",
                "--train.batch_size=4",
                "--quiet",
            ]
        )
        == 0
    )
    return d


@pytest.mark.parametrize(
    "flag,want",
    [("--train.seed=5", "train.seed = 5"), ("--train.batch_size=8", "train.batch_size = 8")],
)
def test_resume_refuses_a_changed_seed_or_batch_size(synthetic_run, capsys, flag, want):
    before = sorted(p.name for p in (synthetic_run / "checkpoints").iterdir())
    log = (synthetic_run / "metrics.jsonl").read_text()
    err = check_error(
        capsys,
        ["train", "--resume", str(synthetic_run), flag, "--train.max_steps=4", "--quiet"],
        want,
    )
    assert "cannot resume" in err
    # Nothing was trained or written.
    assert sorted(p.name for p in (synthetic_run / "checkpoints").iterdir()) == before
    assert (synthetic_run / "metrics.jsonl").read_text() == log


def test_resume_refuses_a_changed_sequence_length(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    data = tmp_path / "data"
    prepare([src], data, val_fraction=0.0, seed=0, show_progress=False)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "debug",
                "--out",
                str(run),
                "--data.source=files",
                f"--data.path={data}",
                "--model.vocab_size=257",
                "--train.seq_len=32",
                "--train.batch_size=2",
                "--train.max_steps=1",
                "--train.eval_every=0",
                "--train.eval_batches=1",
                "--quiet",
            ]
        )
        == 0
    )
    check_error(
        capsys,
        ["train", "--resume", str(run), "--train.seq_len=16", "--train.max_steps=2", "--quiet"],
        "train.seq_len = 16",
    )
    assert [c.name for c in list_checkpoints(run)] == ["step_00000001"]


# ---------------------------------------------------------------------------------------
# data/loader: seeds are independent streams
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    rng = np.random.default_rng(3)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz .,"))
    (root / "src").mkdir()
    for i in range(10):
        (root / "src" / f"d{i}.txt").write_text("".join(rng.choice(letters, size=400)))
    prepare([root / "src"], root / "data", val_fraction=0.0, seed=0, show_progress=False)
    return root / "data"


def test_seeds_are_independent_streams_not_shifted_copies(data_dir):
    seeds, steps = range(4), 6
    batches = {}
    for seed in seeds:
        w = TokenWindows(data_dir, "train", seq_len=8, batch_size=4, seed=seed)
        for step in range(steps):
            batches[seed, step] = w.next_batch()[0]
    for (sa, ia), xa in batches.items():
        for (sb, ib), xb in batches.items():
            if sa < sb:
                assert not torch.equal(xa, xb), f"seed {sa} step {ia} == seed {sb} step {ib}"
    # Windows shared between two seeds' streams are chance coincidences, not whole batches.
    starts = {s: {tuple(r.tolist()) for i in range(steps) for r in batches[s, i]} for s in seeds}
    shared = max(len(starts[a] & starts[b]) for a in seeds for b in seeds if a < b)
    assert shared <= 2, shared


# ---------------------------------------------------------------------------------------
# checkpoint: a save interrupted mid-write is never what resume loads
# ---------------------------------------------------------------------------------------
class _Crash(BaseException):
    pass


def test_checkpoint_interrupted_mid_write_is_never_chosen(tmp_path, monkeypatch):
    model = FreeTransformer(CFG, seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"config": {"model": CFG.to_dict(), "train": {}, "data": {}}}
    save_checkpoint(tmp_path, 1, model_state=weights, state=state)

    real = ckpt_mod._save_tensors

    def half_write(tensors, path):  # the process dies halfway through the weights file
        real(tensors, path)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        raise _Crash

    # A crash (power loss, SIGKILL) runs no clean-up code: nothing gets removed.
    monkeypatch.setattr(ckpt_mod, "_save_tensors", half_write)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(_Crash):
        save_checkpoint(tmp_path, 2, model_state=weights, state=state)
    monkeypatch.undo()

    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    ck = load_checkpoint(tmp_path)  # what `train --resume` and `generate RUN` load
    assert ck.step == 1
    assert all(torch.equal(ck.model_state[k], weights[k]) for k in weights)
    # The next save of that step succeeds over the leftover and becomes the newest.
    save_checkpoint(tmp_path, 2, model_state=weights, state=state)
    assert load_checkpoint(tmp_path).step == 2


def test_resume_after_a_crash_mid_checkpoint_continues_from_the_last_complete_one(
    tmp_path, monkeypatch
):
    cfg = load_run_config(
        preset="debug",
        overrides=[
            "train.max_steps=4",
            "train.ckpt_every=2",
            "train.eval_every=0",
            "train.batch_size=2",
            "train.progress=false",
            "train.log_every=1",
        ],
    )
    from freeformer.train import train

    real = ckpt_mod._save_tensors
    calls = []

    def crash_at_step_4(tensors, path):
        calls.append(path)
        real(tensors, path)
        if "00000004" in path.parent.name:
            path.write_bytes(path.read_bytes()[:100])
            raise _Crash

    monkeypatch.setattr(ckpt_mod, "_save_tensors", crash_at_step_4)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda *a, **k: None)
    run = tmp_path / "run"
    with pytest.raises(_Crash):
        train(cfg, run, quiet=True)
    monkeypatch.undo()
    assert load_checkpoint(run).step == 2
    res = train(cfg, run, resume=True, quiet=True)
    assert res.step == 4 and load_checkpoint(run).step == 4
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]  # steps 3-4 re-done once, then the final validation


def test_a_concurrent_writer_of_the_same_out_is_one_clear_error(tmp_path):
    """Two `convert`/`export` runs to one --out: the one that finishes second says so in one
    line, leaves the first one's directory intact and removes its own temporary."""
    from freeformer.errors import CheckpointError

    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="another process"):
        with ckpt_mod.atomic_directory(out) as tmp:
            (tmp / "mine").write_text("x")
            out.mkdir()  # the other process renamed its directory into place first
            (out / "theirs").write_text("y")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert not list(tmp_path.glob(".run.tmp-*"))
