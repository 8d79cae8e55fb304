"""Fine-tuning: --init-from loads exactly the weights and nothing else; trainable = latent
freezes everything outside the latent path; bad inputs are one line."""

import json

import pytest
import torch
from resume import assert_same_final_weights, train_then_resume
from smollm2 import smollm2_gguf

from freeformer.checkpoint import list_checkpoints, load_checkpoint, load_model
from freeformer.cli import main
from freeformer.data.synthetic import SyntheticBatches
from freeformer.distributed import DistInfo
from freeformer.errors import CheckpointError, ConfigError
from freeformer.finetune import NEW_LATENT_PREFIXES, latent_path_prefixes, load_init_checkpoint
from freeformer.optim import build_optimizer, lr_at, param_groups
from freeformer.runconfig import load_run_config
from freeformer.train import build_model, global_bit_noise, train


def debug_cfg(**train_kv):
    kv = {"progress": "false", "eval_every": "0", **train_kv}
    return load_run_config(preset="debug", overrides=[f"train.{k}={v}" for k, v in kv.items()])


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") != "val"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained run: its weights differ from any seeded init."""
    d = tmp_path_factory.mktemp("ft") / "source"
    train(debug_cfg(max_steps=4, lr=0.01), d, quiet=True)
    return d


def in_latent_path(name, model):
    return name.startswith(latent_path_prefixes(model))


def test_init_from_loads_exactly_the_weights(source):
    cfg = debug_cfg(init_from=str(source), seed=7)  # another seed: its init would differ
    ref, _ = load_model(source)
    model = build_model(cfg, torch.device("cpu"), load_init_checkpoint(cfg))
    want = ref.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    x = torch.randint(0, cfg.model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    z = torch.randint(0, cfg.model.n_codes, (2, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.eval()(x, latents=z).logits, ref(x, latents=z).logits)


def test_fine_tune_starts_at_the_source_function_with_fresh_state(source, tmp_path):
    steps = 3
    cfg = debug_cfg(init_from=str(source), seed=7, max_steps=steps, log_every=1, ckpt_every=0)
    run = tmp_path / "ft"
    train(cfg, run, quiet=True)
    # Step 1's loss is computed before any update: it must be the source model's loss on the
    # run's first batch and latent draws.
    ref, _ = load_model(source)
    x, y = SyntheticBatches(cfg.train.batch_size, cfg.train.seed, 0, 1).next_batch()
    noise = global_bit_noise(
        cfg, torch.Generator().manual_seed(cfg.train.seed + 1), DistInfo(), torch.device("cpu")
    )
    with torch.no_grad():
        out = ref.train()(x, y, bit_noise=noise)
    recs = records(run)
    assert recs[0]["step"] == 1
    assert recs[0]["ce"] == pytest.approx(float(out.ce), abs=1e-6)
    assert recs[0]["loss"] == pytest.approx(float(out.loss), abs=1e-6)
    # Fresh schedule, step count, tokens and optimizer state (Adam's step = this run's steps).
    assert [r["lr"] for r in recs] == [pytest.approx(lr_at(s, cfg.train)) for s in range(steps)]
    ck = load_checkpoint(run)
    assert ck.step == steps and [p.name for p in list_checkpoints(run)] == ["step_00000003"]
    assert ck.state["tokens"] == steps * cfg.train.batch_size * cfg.train.seq_len
    adam_steps = {float(t) for k, t in ck.optimizer_tensors().items() if k.endswith("/step")}
    assert adam_steps == {float(steps)}
    src = load_checkpoint(source).model_state
    assert any(not torch.equal(ck.model_state[k], src[k]) for k in src)  # it did train
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["init_from"] == str(source)


def test_mismatched_model_field_is_one_line(source, tmp_path, capsys):
    from test_cli import check_error

    out = tmp_path / "never"
    err = check_error(
        capsys,
        [
            "train",
            "--preset",
            "debug",
            "--init-from",
            str(source),
            "--model.latent_bits=5",
            "--out",
            str(out),
        ],
        "model.latent_bits",
    )
    assert "= 5" in err and "6" in err
    assert not out.exists()
    check_error(
        capsys,
        ["train", "--preset", "debug", "--init-from", str(tmp_path / "nope"), "--out", str(out)],
        "does not exist",
    )
    check_error(
        capsys,
        ["train", "--preset", "debug", "--init-from", str(source), "--resume", str(source)],
        "give one of them",
    )
    assert not out.exists()
    with pytest.raises(CheckpointError, match=r"model\.dim .* \(and \d+ more"):
        load_init_checkpoint(
            load_run_config(preset="debug", overrides=["model.dim=64", f"train.init_from={source}"])
        )


def test_trainable_latent_changes_only_the_latent_path(source, tmp_path):
    cfg = debug_cfg(init_from=str(source), max_steps=3, lr=0.01, trainable="latent", warmup_steps=1)
    model = build_model(cfg, torch.device("cpu"), load_init_checkpoint(cfg))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {
        n for n, _ in model.named_parameters() if not in_latent_path(n, model)
    }
    assert any(
        n.startswith(f"blocks.{cfg.model.inject_layer}.")
        for n, p in model.named_parameters()
        if p.requires_grad
    )
    opt = build_optimizer(model, cfg.train)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}

    run = tmp_path / "ft"
    train(cfg, run, quiet=True)
    src, ck = load_checkpoint(source).model_state, load_checkpoint(run)
    for k, t in ck.model_state.items():
        if in_latent_path(k, model):
            assert not torch.equal(t, src[k]), k  # every latent-path tensor learned
        else:
            assert torch.equal(t, src[k]), k  # bit-identical
    assert all(in_latent_path(k.rpartition("/")[0], model) for k in ck.optimizer_tensors())


@pytest.mark.parametrize("trainable,scale", [("latent", 1.0), ("latent", 10.0), ("all", 10.0)])
def test_trainable_latent_resume_is_bit_identical(source, tmp_path, trainable, scale):
    cfg = debug_cfg(
        init_from=str(source),
        max_steps=6,
        ckpt_every=3,
        trainable=trainable,
        keep_last=5,
        latent_lr_scale=scale,
    )
    assert_same_final_weights(*train_then_resume(cfg, tmp_path, keep_step=3))


def test_latent_lr_scale_groups_only_the_new_latent_weights(source):
    """Scale ≠ 1: the encoder and post-sampler weights (and nothing else) sit in groups with
    lr_scale = scale; every weight keeps its weight decay; each trainable weight is in one
    group. The injection block, a pretrained decoder block, is not among them."""
    cfg = debug_cfg(init_from=str(source))
    model = build_model(cfg, torch.device("cpu"), load_init_checkpoint(cfg))
    names = {id(p): n for n, p in model.named_parameters()}

    def by_name(groups):
        out = {}
        for g in groups:
            for p in g["params"]:
                assert names[id(p)] not in out  # one group per weight
                out[names[id(p)]] = (g["weight_decay"], g["lr_scale"])
        return out

    one, ten = by_name(param_groups(model, 0.1)), by_name(param_groups(model, 0.1, 10.0))
    assert set(one) == set(ten) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n: wd for n, (wd, _) in ten.items()} == {n: wd for n, (wd, _) in one.items()}
    assert {s for _, s in one.values()} == {1.0}
    scaled = {n for n, (_, s) in ten.items() if s == 10.0}
    assert scaled == {n for n in ten if n.startswith(("encoder.", "post_sampler."))}
    assert {"encoder.zeta", "encoder.readout.weight", "post_sampler.weight"} <= scaled
    assert not any(n.startswith(f"blocks.{cfg.model.inject_layer}.") for n in scaled)
    assert {s for n, (_, s) in ten.items() if n not in scaled} == {1.0}
    assert NEW_LATENT_PREFIXES == ("encoder.", "post_sampler.")


def test_latent_lr_scale_scales_the_first_adam_update(source, tmp_path):
    """One training step from the same weights, batch and draws: Adam's first update is
    ±lr per element (and decoupled decay is ∝ lr), so the new latent weights move exactly
    `scale` × as far, and every other weight moves exactly as with scale 1."""
    src = load_checkpoint(source).model_state
    moved = {}
    for scale in (1.0, 7.0):
        run = tmp_path / f"s{scale}"
        train(
            debug_cfg(
                init_from=str(source), max_steps=1, warmup_steps=1, lr=1e-3, latent_lr_scale=scale
            ),
            run,
            quiet=True,
        )
        got = load_checkpoint(run).model_state
        moved[scale] = {k: (got[k] - src[k]).double() for k in src}
    n_new = 0
    for k, d1 in moved[1.0].items():
        d7 = moved[7.0][k]
        if k.startswith(("encoder.", "post_sampler.")):
            assert d1.abs().max() > 0, k
            # atol: float32 rounding of weights ~1e-1 (one ulp ~1e-8); the steps are ~1e-3
            torch.testing.assert_close(
                d7, 7.0 * d1, rtol=1e-3, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
            )
            n_new += 1
        else:
            assert torch.equal(d7, d1), k
    assert n_new >= 3


def test_latent_lr_scale_is_validated(source, tmp_path, capsys):
    from test_cli import check_error

    for bad in ("0", "-1", "nan", "inf", "true", "big"):
        with pytest.raises(ConfigError, match="train.latent_lr_scale"):
            debug_cfg(latent_lr_scale=bad)
    check_error(
        capsys,
        [
            "train",
            "--preset",
            "debug",
            "--train.latent_lr_scale=0",
            "--out",
            str(tmp_path / "never"),
        ],
        "train.latent_lr_scale",
    )
    assert not (tmp_path / "never").exists()
    # A resumed run must rebuild the same param groups and rates: another scale is refused.
    run = tmp_path / "run"
    cfg = debug_cfg(init_from=str(source), max_steps=2, latent_lr_scale=5.0)
    train(cfg, run, quiet=True)
    with pytest.raises(CheckpointError, match="train.latent_lr_scale"):
        train(debug_cfg(init_from=str(source), max_steps=3), run, resume=True, quiet=True)


def test_trainable_is_validated():
    with pytest.raises(ConfigError, match="train.trainable"):
        debug_cfg(trainable="some")
    with pytest.raises(ConfigError, match="train.trainable"):
        load_run_config(preset="debug", overrides=["train.trainable=latent", "model.latent=false"])


def test_data_from_another_tokenizer_is_refused(tmp_path, capsys):
    from test_cli import check_error

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 30)
    byte, bpe = tmp_path / "byte", tmp_path / "bpe"
    assert main(["prepare", str(corpus), "--out", str(byte), "--val-fraction", "0.2"]) == 0
    assert (
        main(
            [
                "prepare",
                str(corpus),
                "--out",
                str(bpe),
                "--val-fraction",
                "0.2",
                "--tokenizer",
                "bpe:300",
            ]
        )
        == 0
    )
    common = [
        "--preset",
        "debug",
        "--data.source=files",
        "--model.vocab_size=300",
        "--train.seq_len=32",
        "--train.max_steps=2",
        "--train.eval_every=0",
        "--quiet",
    ]
    src = tmp_path / "src"
    assert main(["train", "--out", str(src), f"--data.path={bpe}", *common]) == 0
    out = tmp_path / "never"
    check_error(
        capsys,
        ["train", "--out", str(out), "--init-from", str(src), f"--data.path={byte}", *common],
        "another tokenizer",
    )
    assert not out.exists()
    ft = tmp_path / "ft"
    assert (
        main(["train", "--out", str(ft), "--init-from", str(src), f"--data.path={bpe}", *common])
        == 0
    )
    assert (ft / "tokenizer" / "tokenizer.json").read_text() == (
        src / "tokenizer" / "tokenizer.json"
    ).read_text()


@pytest.mark.realmodel
def test_smollm2_fine_tune_config_matches_conversion(tmp_path):
    """The shipped smollm2-135m-ft config fits what `freeformer convert` writes for the real
    SmolLM2-135M (Free Transformer and, with model.latent=false, baseline), and one
    trainable=latent step from it leaves the decoder outside the latent path untouched."""
    from freeformer.pretrained import convert

    gguf = smollm2_gguf()
    ft = convert(gguf, tmp_path / "ft")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"m{i}.py").write_text(
            f"def f{i}(x):\n    return [x * k for k in range({i})]\n" * 80
        )
    data = tmp_path / "data"
    assert (
        main(
            [
                "prepare",
                str(corpus),
                "--out",
                str(data),
                "--val-fraction",
                "0.25",
                "--tokenizer",
                str(ft / "tokenizer" / "tokenizer.json"),
            ]
        )
        == 0
    )
    over = [
        f"data.path={data}",
        "train.max_steps=1",
        "train.eval_batches=1",
        "train.importance_samples=1",
        "train.progress=false",
        "train.threads=1",
    ]
    cfg = load_run_config(
        preset="smollm2-135m-ft",
        overrides=[*over, f"train.init_from={ft}", "train.trainable=latent"],
    )
    assert load_init_checkpoint(cfg) is not None  # [model] equals the converted config
    run = tmp_path / "run"
    train(cfg, run, quiet=True)
    src, got = load_checkpoint(ft).model_state, load_checkpoint(run).model_state
    prefixes = ("encoder.", "post_sampler.", f"blocks.{cfg.model.inject_layer}.")
    assert all(torch.equal(got[k], src[k]) for k in src if not k.startswith(prefixes))
    assert not torch.equal(got["post_sampler.weight"], src["post_sampler.weight"])
    base = convert(gguf, tmp_path / "base", baseline=True)
    bcfg = load_run_config(
        preset="smollm2-135m-ft", overrides=[*over, f"train.init_from={base}", "model.latent=false"]
    )
    assert load_init_checkpoint(bcfg) is not None


def test_validate_batch_size_picks_the_fine_tune_windows(source, capsys):
    """`validate --batch-size` scores the windows a run with that batch size validates on,
    so a converted model and its fine-tuned run are compared on the same text."""
    from freeformer.validation import evaluate, format_val

    capsys.readouterr()
    assert main(["validate", str(source), "--batches", "2", "--batch-size", "3", "--k", "2"]) == 0
    got = capsys.readouterr().out.strip()
    cfg = debug_cfg()
    model, ck = load_model(source)
    val = SyntheticBatches(3, cfg.train.seed, 0, 1).fixed_batches(2)
    want = evaluate(
        model,
        val,
        latent=True,
        n_bits=cfg.model.latent_bits,
        k=2,
        seed=cfg.train.seed + 2,
        device=torch.device("cpu"),
    )
    assert got == format_val(ck.step, want)
    assert val[0][0].shape[0] == 3
