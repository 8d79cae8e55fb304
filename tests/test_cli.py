"""The command line: each user mistake is one line on stderr, exit 2, nothing half-written."""

import json
import shutil

import pytest
import torch

from freeformer.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "run"
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
                "--quiet",
            ]
        )
        == 0
    )
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (d / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 30)
    return d


def check_error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    # Progress bars may precede it; the error itself is exactly one line, the last.
    errors = [ln for ln in err.splitlines() if ln.startswith("freeformer: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    err = errors[0]
    assert match.lower() in err.lower(), err
    return err


def test_train_and_generate_from_run(run_dir, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--prompt",
                "K>",
                "-n",
                "2",
                "--max-new-tokens",
                "10",
                "--shared-latent",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "K>" in out
    assert main(["validate", str(run_dir), "--batches", "1", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "ce(prior codes)" in out and "k=2" in out  # the estimate says its sample count


def test_shared_latent_flag_gives_every_sample_one_code_sequence(run_dir, capsys, monkeypatch):
    import freeformer.generate

    seen = []
    real = freeformer.generate.generate

    def spy(model, prompt, n, **kw):
        seen.append((prompt.shape, kw.get("latents")))
        return real(model, prompt, n, **kw)

    monkeypatch.setattr(freeformer.generate, "generate", spy)
    for flag in (["--shared-latent"], []):
        assert (
            main(
                [
                    "generate",
                    str(run_dir),
                    "--prompt",
                    "K>",
                    "-n",
                    "3",
                    "--max-new-tokens",
                    "6",
                    "--seed",
                    "3",
                    *flag,
                ]
            )
            == 0
        )
    capsys.readouterr()
    (shape, shared), (_, independent) = seen
    assert shape[0] == 3 and independent is None  # without the flag: codes per sample
    assert shared.shape == (1, shape[1] + 6)  # one sequence for every position, all samples


def test_prepare_then_train_on_files(tmp_path, corpus, capsys):
    data = tmp_path / "data"
    assert main(["prepare", str(corpus), "--out", str(data), "--val-fraction", "0.2"]) == 0
    assert "train" in capsys.readouterr().out
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
                "--train.max_steps=2",
                "--train.eval_every=0",
                "--quiet",
            ]
        )
        == 0
    )
    assert (run / "tokenizer").is_dir()
    assert (
        main(
            ["generate", str(run), "--prompt", "def", "--max-new-tokens", "5", "--temperature", "0"]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("def")


BAD_TRAIN = [
    (["train"], "--preset"),
    (["train", "--preset", "nope"], "unknown preset"),
    (["train", "--config", "/nonexistent.toml"], "not found"),
    (["train", "--preset", "debug", "--train.max_steps=abc"], "expected int"),
    (["train", "--preset", "debug", "--train.bogus=1"], "unknown key train.bogus"),
    (["train", "--preset", "debug", "--optim.lr=1"], "unknown config section"),
    (["train", "--preset", "debug", "--model.dim=-5"], "model.dim"),
    (["train", "--preset", "debug", "--model.n_heads=5"], "n_heads"),
    (["train", "--preset", "debug", "--train.dist=mpi"], "train.dist"),
    (["train", "--preset", "debug", "--train.lr=-1"], "train.lr"),
    (["train", "--preset", "debug", "--train.seq_len=64"], "65 for the synthetic task"),
    (["train", "--preset", "debug", "--data.source=files"], "data.path"),
    (
        [
            "train",
            "--preset",
            "debug",
            "--data.source=files",
            "--data.path=/nonexistent",
            "--train.seq_len=32",
        ],
        "/nonexistent",
    ),
    (["train", "--preset", "debug", "--model.free_bits=1/0"], "expected float"),
    (["train", "--preset", "debug", "--train.micro_batch_size=3"], "micro_batch_size"),
    (["train", "--preset", "debug", "--model.latent_embedding=onehot"], "latent_embedding"),
    (["train", "--preset", "debug", "--train.max_steps"], "needs a value"),
]


@pytest.mark.parametrize("argv,match", BAD_TRAIN)
def test_bad_train_input(tmp_path, capsys, argv, match):
    out = tmp_path / "never"
    check_error(capsys, [*argv, "--out", str(out)] if "--out" not in argv else argv, match)
    assert not out.exists()  # nothing half-written


def test_malformed_and_unknown_config(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndim = 3")
    check_error(capsys, ["train", "--config", str(bad)], "not valid TOML")
    bad.write_text("[optimizer]\nlr = 1\n")
    check_error(capsys, ["train", "--config", str(bad)], "unknown config section")
    bad.write_text('[model]\npreset = "debug"\ndepth = 3\n')
    check_error(capsys, ["train", "--config", str(bad)], "depth")
    bad.write_text('[model]\npreset = "debug"\n[train]\nbatch_size = "big"\n')
    check_error(capsys, ["train", "--config", str(bad)], "train.batch_size")


def test_existing_run_needs_resume(run_dir, capsys):
    check_error(capsys, ["train", "--preset", "debug", "--out", str(run_dir)], "--resume")


def test_resume_errors(run_dir, tmp_path, capsys):
    check_error(capsys, ["train", "--resume", str(tmp_path)], "not a run directory")
    check_error(
        capsys,
        ["train", "--resume", str(run_dir), "--model.dim=64", "--model.n_heads=4"],
        "model config differs",
    )


def test_vocab_mismatch_with_data(tmp_path, corpus, capsys):
    data = tmp_path / "data"
    assert main(["prepare", str(corpus), "--out", str(data)]) == 0
    check_error(
        capsys,
        [
            "train",
            "--preset",
            "debug",
            "--out",
            str(tmp_path / "r"),
            "--data.source=files",
            f"--data.path={data}",
            "--train.seq_len=32",
        ],
        "vocab_size",
    )


def test_prepare_errors(tmp_path, capsys):
    check_error(
        capsys, ["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "missing"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    check_error(capsys, ["prepare", str(empty), "--out", str(tmp_path / "o")], "empty")
    assert not (tmp_path / "o").exists()


def test_checkpoint_errors(run_dir, tmp_path, capsys):
    check_error(capsys, ["generate", str(tmp_path / "nope"), "--prompt", "A>"], "does not exist")
    check_error(capsys, ["generate", str(tmp_path), "--prompt", "A>"], "no checkpoint")
    check_error(capsys, ["generate", str(run_dir), "--prompt", "hello"], "alphabet")
    check_error(capsys, ["generate", str(run_dir), "--prompt", "A>", "-n", "0"], "-n")
    check_error(capsys, ["validate", str(run_dir), "--k", "0"], "--k")
    # A corrupted copy (one flipped byte) and a truncated copy are refused.
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    ck = sorted((bad / "checkpoints").iterdir())[-1]
    raw = bytearray((ck / "model.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (ck / "model.safetensors").write_bytes(bytes(raw))
    check_error(capsys, ["generate", str(bad), "--prompt", "A>"], "sha256")
    (ck / "model.safetensors").write_bytes(bytes(raw[:100]))
    check_error(capsys, ["generate", str(bad), "--prompt", "A>"], "truncated")
    (ck / "state.json").write_text("{not json")
    check_error(capsys, ["generate", str(bad), "--prompt", "A>"], "corrupted")


def test_mismatched_checkpoint_weights(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    bad = tmp_path / "mismatch"
    shutil.copytree(run_dir, bad)
    ck = sorted((bad / "checkpoints").iterdir())[-1]
    state = json.loads((ck / "state.json").read_text())
    state["config"]["model"]["dim"] = 64  # claims another shape than its weights
    state["config"]["model"]["mlp_hidden"] = 192
    (ck / "state.json").write_text(json.dumps(state))
    err = check_error(capsys, ["generate", str(bad), "--prompt", "A>"], "shape")
    # The line names a tensor of the file, the shape it has there, and the shape the
    # checkpoint's (claimed) config needs.
    from freeformer import FreeTransformer, ModelConfig

    w = load_file(str(ck / "model.safetensors"))
    name = err.split("'")[1]
    with torch.device("meta"):
        want = FreeTransformer(ModelConfig.from_dict(state["config"]["model"])).state_dict()
    assert name in w and tuple(w[name].shape) != tuple(want[name].shape)
    assert (
        f"has shape {tuple(w[name].shape)}, the model expects {tuple(want[name].shape)}" in err
    ), err


def test_plot_runs(run_dir, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_error(capsys, ["plot", str(tmp_path), "--out", str(out)], "not a run directory")


def test_help_everywhere(capsys):
    for cmd in (
        "train",
        "config",
        "validate",
        "generate",
        "prepare",
        "plot",
        "synthetic",
        "eval",
        "compare",
    ):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "freeformer" in capsys.readouterr().out


def test_config_prints_a_round_trippable_toml(tmp_path, capsys):
    assert main(["config", "--preset", "synthetic", "--model.free_bits=1/8"]) == 0
    text = capsys.readouterr().out
    assert "free_bits = 0.125" in text and "[train]" in text
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main(["config", "--config", str(path)]) == 0
    assert capsys.readouterr().out == text
    check_error(capsys, ["config", "--preset", "debug", "--model.nope=1"], "unknown key")


def test_static_flag_decodes_the_same_text(run_dir, capsys):
    """`generate --static` (fixed-shape steps; a CUDA graph on a GPU) prints what eager
    decoding prints for the same seed."""
    outs = []
    for flag in ([], ["--static"]):
        capsys.readouterr()
        assert (
            main(
                [
                    "generate",
                    str(run_dir),
                    "--prompt",
                    "K>",
                    "-n",
                    "2",
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "12",
                    "--seed",
                    "3",
                    *flag,
                ]
            )
            == 0
        )
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "--- sample" in outs[0]
