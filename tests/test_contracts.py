"""Small contracts that mutation testing (scripts/mutation.sh, docs/testing.md) showed no
other test held: each test here kills at least one mutant that survived the suite."""

import pytest
import torch

from freeformer import FreeTransformer, ModelConfig
from freeformer.errors import ConfigError, DataError
from freeformer.generate import generate, new_cache
from freeformer.layers import KVCache

CFG = ModelConfig.preset("debug")


# -- generate ---------------------------------------------------------------------------
def test_kv_cache_takes_the_models_dtype_and_device_unless_told():
    model = FreeTransformer(CFG, seed=0).double()
    cache = new_cache(model, 2, 8)
    assert len(cache.layers) == CFG.n_layers and cache.pos == 0
    for layer in cache.layers:
        assert layer.k.dtype == layer.v.dtype == torch.float64
        assert layer.k.shape == (2, CFG.n_kv_heads, 8, CFG.head_dim)
    assert (
        KVCache(model.config, 1, 4, dtype=torch.float16, device="cpu").layers[0].k.dtype
        == torch.float16
    )
    with torch.device("meta"):
        meta = FreeTransformer(CFG)
    assert new_cache(meta, 1, 4).layers[0].v.device.type == "meta"


def _support(logits, **kw):
    """Indices with non-zero probability in the distribution ``sample`` draws from."""
    from unittest import mock

    from freeformer.generate import sample

    with mock.patch("torch.multinomial", wraps=torch.multinomial) as spy:
        sample(logits[None], generator=torch.Generator().manual_seed(0), **kw)
    return (spy.call_args.args[0][0] > 0).nonzero().flatten().tolist()


def test_top_p_one_keeps_every_token_even_when_float32_mass_rounds_to_one():
    # P(token 1) = e^-30 ≈ 1e-13: in float32 the mass before it is exactly 1.0.
    assert _support(torch.tensor([30.0, 0.0]), top_p=1.0) == [0, 1]


def test_top_p_stops_at_the_token_whose_preceding_mass_equals_p_exactly():
    # Four tokens of mass 1/4 (exact in binary): {0, 1} already hold p = 0.5.
    assert len(_support(torch.zeros(4), top_p=0.5)) == 2
    assert len(_support(torch.zeros(4), top_p=0.5000001)) == 3


@pytest.fixture(scope="module")
def model():
    return FreeTransformer(CFG, seed=0).eval()


def test_generate_argument_bounds(model):
    p = torch.randint(0, CFG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(model, p, 0), p)  # zero new tokens: the prompt itself
    for bad in (-1, 2.5):
        with pytest.raises(DataError, match="max_new_tokens"):
            generate(model, p, bad)
    # Exactly max_seq_len positions are allowed; one more is refused before any forward.
    assert generate(model, p, CFG.max_seq_len - 5, temperature=0).shape == (2, CFG.max_seq_len)
    with pytest.raises(DataError, match=r"max_new_tokens \(124\) exceeds max_seq_len=128"):
        generate(model, p, CFG.max_seq_len - 4)
    z = torch.zeros(11, dtype=torch.long)
    greedy = generate(model, p, 6, temperature=0, latents=z)
    assert torch.equal(generate(model, p, 6, top_k=1, latents=z, generator=gen(1)), greedy)
    for top_p in (1e-6, 0.9, 1.0):  # (0, 1]
        assert generate(model, p, 3, top_p=top_p, generator=gen(2)).shape == (2, 8)
    for bad in (0.0, 1.5):
        with pytest.raises(DataError, match="top_p"):
            generate(model, p, 3, top_p=bad)
    with pytest.raises(DataError, match="top_k"):
        generate(model, p, 3, top_k=0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_generate_function_defaults_are_the_documented_ones(model, monkeypatch):
    import freeformer.generate as G
    from freeformer.generate import generate

    temps = []
    real = G.sample
    monkeypatch.setattr(G, "sample", lambda logits, t, *a: temps.append(t) or real(logits, t, *a))
    p = torch.randint(0, CFG.vocab_size, (2, 5), generator=gen(3))
    out = generate(model, p, 6, generator=gen(4))
    assert isinstance(out, torch.Tensor)  # return_latents=False
    assert temps == [1.0] * 6  # temperature=1.0
    explicit = generate(
        model, p, 6, temperature=1.0, prefill="encoder", generator=gen(4), return_latents=False
    )
    assert torch.equal(out, explicit)
    assert torch.equal(out, generate(model, p, 6, generator=gen(4)))


def test_a_1d_prompt_gives_row_0_of_the_batched_call(model):
    p = torch.randint(0, CFG.vocab_size, (5,), generator=gen(5))
    one, codes = generate(model, p, 6, generator=gen(6), return_latents=True)
    batch, bcodes = generate(model, p[None], 6, generator=gen(6), return_latents=True)
    assert one.shape == (11,) and codes.shape == (11,)
    assert torch.equal(one, batch[0]) and torch.equal(codes, bcodes[0])


def test_generation_builds_no_autograd_graph(model, monkeypatch):
    seen = []
    real = FreeTransformer.forward

    def spy(self, *a, **k):
        seen.append(torch.is_grad_enabled())
        return real(self, *a, **k)

    monkeypatch.setattr(FreeTransformer, "forward", spy)
    from freeformer.generate import generate

    generate(model, torch.zeros(1, 3, dtype=torch.long), 3, generator=gen(0))
    assert seen and not any(seen)


# -- latent -----------------------------------------------------------------------------
def test_a_bit_of_probability_zero_is_never_set_even_by_a_zero_uniform():
    from freeformer.latent import sample_codes

    # σ(−200) is 0 in float32, and 0.0 is a legal draw of a uniform on [0, 1).
    L = torch.tensor([[-200.0, 200.0, -200.0]])
    assert sample_codes(L, noise=torch.zeros(1, 3)).item() == 0b010


def test_mapper_backward_fills_its_preallocated_buffers_without_resizing():
    import warnings

    from freeformer.latent import binary_mapper

    g = torch.Generator().manual_seed(0)
    L = torch.randn(5, 3, generator=g, requires_grad=True)
    W = torch.randn(8, 4, generator=g, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when an out= buffer has the wrong shape
        r, _ = binary_mapper(L, W, generator=g)
        r.sum().backward()
    assert L.grad.shape == L.shape and torch.isfinite(L.grad).all()


# -- runconfig --------------------------------------------------------------------------
# What a run gets for every key its TOML leaves out (`freeformer config` prints them). A
# default changes every run that relies on it, so changing one must be a deliberate edit
# here too (and in the docs that quote it).
TRAIN_DEFAULTS = dict(
    max_steps=1000,
    batch_size=32,
    micro_batch_size=0,
    seq_len=256,
    lr=3e-4,
    min_lr_ratio=0.1,
    warmup_steps=100,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    seed=0,
    log_every=10,
    eval_every=200,
    eval_batches=8,
    importance_samples=4,
    ckpt_every=500,
    keep_last=3,
    dist="none",
    compile=False,
    activation_checkpointing=False,
    device="auto",
    precision="auto",
    threads=0,
    tensorboard=False,
    wandb=False,
    wandb_project="freeformer",
    progress=True,
    init_from="",
    trainable="all",
    latent_lr_scale=1.0,
    latent_ramp_steps=0,
    free_bits_warmup_steps=0,
    code_balance_weight=0.0,
    lora_rank=0,
    lora_alpha=16.0,
    lora_targets="wq,wkv,wo,w_in,w_out",
    lora_injection="full",
)


def test_run_config_defaults_are_the_documented_ones():
    import dataclasses

    from freeformer.runconfig import DataConfig, RunConfig, TrainConfig

    assert dataclasses.asdict(TrainConfig()) == TRAIN_DEFAULTS
    assert dataclasses.asdict(DataConfig()) == {"source": "synthetic", "path": ""}
    cfg = RunConfig(train=TrainConfig(seq_len=65))
    assert cfg.model == ModelConfig() and cfg.data == DataConfig()
    assert RunConfig(data=DataConfig(source="none")).train == TrainConfig()


def test_run_config_sections_are_frozen():
    import dataclasses

    from freeformer.runconfig import DataConfig, TrainConfig, load_run_config

    cfg = load_run_config(preset="debug")
    for obj, key in ((cfg, "train"), (cfg.train, "lr"), (cfg.data, "path")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, key, 1)
    assert TrainConfig.__dataclass_params__.frozen and DataConfig.__dataclass_params__.frozen


@pytest.mark.parametrize(
    "key,values",
    [
        ("dist", ["none", "ddp", "fsdp"]),
        ("device", ["auto", "cpu", "cuda"]),
        ("precision", ["auto", "fp32", "bf16"]),
        ("trainable", ["all", "latent"]),
    ],
)
def test_every_documented_choice_is_accepted(key, values):
    from freeformer.runconfig import TrainConfig

    for v in values:
        assert getattr(TrainConfig(**{key: v}), key) == v
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{key: "other"})
    want = f"train.{key} = 'other' is invalid: expected one of {', '.join(values)}"
    assert str(e.value).startswith(want), str(e.value)


def test_every_documented_data_source_is_accepted_and_nothing_else():
    from freeformer.runconfig import DataConfig

    for source in ("synthetic", "files", "stdlib", "none"):
        assert DataConfig(source=source, path="d").source == source
    for kwargs, want in [
        (
            dict(source="web"),
            "data.source = 'web' is invalid: expected one of synthetic, files, stdlib, none",
        ),
        (dict(path=3), "data.path = 3 is invalid: expected a string"),
        (dict(source="files"), "data.path = '' is invalid: expected a directory"),
        (dict(source="stdlib"), "data.path = '' is invalid: expected a directory"),
    ]:
        with pytest.raises(ConfigError) as e:
            DataConfig(**kwargs)
        assert str(e.value).startswith(want), str(e.value)


# Each TrainConfig number, at the edges of what it accepts, and the one line its refusal
# prints: "train.KEY = VALUE is invalid: expected WHAT".
POSITIVE_INT = "a positive integer"
NONNEG_INT = "an integer ≥ 0"
BOUNDS = {  # key: (accepted values, refused values, what the error expects)
    **{
        k: ([1, 7], [0, -1, 1.5, True], POSITIVE_INT)
        for k in (
            "max_steps",
            "batch_size",
            "seq_len",
            "eval_batches",
            "importance_samples",
            "keep_last",
            "log_every",
        )
    },
    **{
        k: ([0, 3], [-1, 1.5, "2", False], NONNEG_INT)
        for k in ("micro_batch_size", "warmup_steps", "eval_every", "ckpt_every", "seed", "threads")
    },
    "lr": ([1e-9, 5], [0, -1e-9, float("inf"), float("nan"), True], "a positive number"),
    "latent_lr_scale": ([1e-9, 3], [0, float("inf"), "1"], "a positive number"),
    "min_lr_ratio": ([0, 0.5, 1], [-1e-9, 1.0001, 1.5, float("nan"), "0.5"], "a number in [0, 1]"),
    "beta1": ([0, 0.999], [1, -0.1, float("inf")], "a number in [0, 1)"),
    "beta2": ([0, 0.999], [1, 1.5, -0.1], "a number in [0, 1)"),
    "weight_decay": ([0, 2.5], [-1e-9, float("inf")], "a number ≥ 0"),
    "grad_clip": ([0, 2.5], [-1e-9, float("nan")], "a number ≥ 0"),
    "init_from": (["", "runs/a"], [3, None], "a run directory or checkpoint path"),
    **{
        k: ([True, False], [1, "true", None], "true or false")
        for k in ("compile", "activation_checkpointing", "tensorboard", "wandb", "progress")
    },
}


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_train_config_accepts_exactly_its_documented_range(key):
    from freeformer.runconfig import TrainConfig

    ok, bad, expect = BOUNDS[key]
    for v in ok:
        assert getattr(TrainConfig(**{key: v}), key) == v
    for v in bad:
        with pytest.raises(ConfigError) as e:
            TrainConfig(**{key: v})
        msg = str(e.value)
        assert msg.startswith(f"train.{key} = {v!r} is invalid: expected {expect}"), msg
        assert "\n" not in msg


def test_run_config_cross_section_rules_name_the_field_and_the_fix():
    from freeformer.runconfig import DataConfig, RunConfig, TrainConfig

    debug = ModelConfig.preset("debug")
    files = DataConfig(source="none")
    for kwargs, want in [
        (
            dict(train=TrainConfig(seq_len=64)),
            "train.seq_len = 64 is invalid: expected 65 for the synthetic task",
        ),
        (
            dict(model=ModelConfig.preset("debug", vocab_size=28), train=TrainConfig(seq_len=65)),
            "model.vocab_size = 28 is invalid: expected ≥ 29 for the synthetic task",
        ),
        (
            dict(model=debug, train=TrainConfig(seq_len=129), data=files),
            "train.seq_len = 129 is invalid: expected ≤ model.max_seq_len = 128",
        ),
        (
            dict(
                model=debug.replace(latent=False),
                train=TrainConfig(trainable="latent", seq_len=64),
                data=files,
            ),
            "train.trainable = 'latent' is invalid: expected 'all' for a baseline",
        ),
    ]:
        with pytest.raises(ConfigError) as e:
            RunConfig(**kwargs)
        assert str(e.value).startswith(want), str(e.value)
    # The edges that are allowed.
    RunConfig(model=ModelConfig.preset("debug", vocab_size=29), train=TrainConfig(seq_len=65))
    RunConfig(model=debug, train=TrainConfig(seq_len=128), data=files)
    RunConfig(model=debug, train=TrainConfig(trainable="latent", seq_len=64), data=files)


# -- checkpoint -------------------------------------------------------------------------
def _weights():
    return {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}


STATE = {"config": {"model": CFG.to_dict(), "train": {}, "data": {}}}


def test_checkpoint_layout_format_and_default_pruning(tmp_path):
    import json

    from freeformer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    run = tmp_path / "not" / "yet" / "there"  # created on the first save
    for step in range(1, 6):
        final = save_checkpoint(run, step, model_state=_weights(), state=STATE)
    assert final == run / "checkpoints" / "step_00000005"
    assert [p.name for p in list_checkpoints(run)] == [f"step_0000000{i}" for i in (3, 4, 5)]
    # On-disk format 1: what older runs hold, and what load_checkpoint accepts.
    assert json.loads((final / "state.json").read_text())["format"] == 1
    # A checkpoint directory itself loads, not only a run directory.
    ck = load_checkpoint(run / "checkpoints" / "step_00000004")
    assert ck.step == 4 and torch.equal(ck.model_state["w"], _weights()["w"])
    # Another format, or not a JSON object, is refused in one line.
    from freeformer.errors import CheckpointError

    state = json.loads((final / "state.json").read_text())
    for bad in ({**state, "format": 2}, [state]):
        (final / "state.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="not a freeformer checkpoint of format 1"):
            load_checkpoint(run)


def test_optimizer_groups_naming_unknown_parameters_are_refused():
    from freeformer.checkpoint import unflatten_optimizer_state
    from freeformer.errors import CheckpointError

    t = {"w/exp_avg": torch.zeros(2)}
    ok = unflatten_optimizer_state(t, [{"params": ["w"], "lr": 1.0}], {"w"})
    assert torch.equal(ok["state"]["w"]["exp_avg"], torch.zeros(2))
    with pytest.raises(CheckpointError, match="unknown parameter 'v'"):
        unflatten_optimizer_state(t, [{"params": ["w", "v"], "lr": 1.0}], {"w"})
    with pytest.raises(CheckpointError, match="'x'"):
        unflatten_optimizer_state({"x/exp_avg": torch.zeros(1)}, [], {"w"})


def test_load_model_defaults_to_an_eval_mode_cpu_model_with_the_saved_weights(tmp_path):
    from freeformer.checkpoint import load_model, save_checkpoint

    model = FreeTransformer(CFG, seed=3)
    save_checkpoint(tmp_path, 1, model_state=model.state_dict(), state=STATE)
    loaded, ck = load_model(tmp_path)
    assert ck.step == 1 and not loaded.training
    for k, v in model.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.device.type == "cpu" and torch.equal(got, v), k


def test_weights_that_do_not_match_the_model_are_refused_naming_the_first_mismatch():
    from freeformer.checkpoint import load_model_state
    from freeformer.errors import CheckpointError

    model = FreeTransformer(CFG, seed=0)
    own = model.state_dict()
    first = next(iter(own))
    cases = [
        (
            {k: v for k, v in own.items() if k != first},
            f"missing {first!r}; 1 missing, 0 unexpected",
        ),
        (
            {**own, "extra.weight": torch.zeros(1)},
            "unexpected 'extra.weight'; 0 missing, 1 unexpected",
        ),
    ]
    for tensors, want in cases:
        with pytest.raises(CheckpointError) as e:
            load_model_state(model, tensors)
        assert str(e.value) == f"checkpoint does not match the model ({want})"


# -- data/loader ------------------------------------------------------------------------
def _token_dir(path, dtype, stream, vocab):
    """A prepared directory written by hand: one train shard of ``stream`` in ``dtype``."""
    import json

    import numpy as np

    path.mkdir()
    np.asarray(stream, dtype=dtype).tofile(path / "train_0.bin")
    (path / "manifest.json").write_text(
        json.dumps(
            {
                "format": 1,
                "vocab_size": vocab,
                "eos_id": vocab - 1,
                "dtype": dtype,
                "train": [{"file": "train_0.bin", "tokens": len(stream)}],
                "val": [],
            }
        )
    )
    return path


@pytest.mark.parametrize("dtype,vocab", [("uint16", 1 << 16), ("uint32", 100_000)])
def test_windows_read_both_shard_dtypes_exactly(tmp_path, dtype, vocab):
    from freeformer.data.loader import TokenWindows

    stream = [(i * 7919) % vocab for i in range(300)]  # ids up to the dtype's range
    w = TokenWindows(_token_dir(tmp_path / "d", dtype, stream, vocab), "train", 16, 4, seed=0)
    assert w.vocab_size == vocab and w.n_tokens == 300
    x, y = w.next_batch()
    for row_x, row_y in zip(x.tolist(), y.tolist()):  # real windows of the stream
        window = row_x + row_y[-1:]
        assert any(stream[i : i + 17] == window for i in range(300 - 16)), window


def test_a_manifest_of_another_format_is_refused_naming_both_formats(tmp_path):
    import json

    from freeformer.data.loader import load_manifest

    d = _token_dir(tmp_path / "d", "uint16", list(range(50)), 64)
    good = json.loads((d / "manifest.json").read_text())
    assert load_manifest(d)["dtype"] == "uint16"
    for bad, got in (({**good, "format": 2}, "2"), ([good], "None")):
        (d / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(DataError) as e:
            load_manifest(d)
        assert f"has format {got}, expected 1; re-run freeformer prepare" in str(e.value)


def test_token_windows_arguments_at_their_edges(tmp_path):
    from freeformer.data.loader import TokenWindows

    d = _token_dir(tmp_path / "d", "uint16", list(range(50)), 64)
    edge = dict(seq_len=1, batch_size=1, seed=0, rank=0, world_size=1)
    w = TokenWindows(d, "train", **edge)
    assert w.next_batch()[0].shape == (1, 1)
    for name, low in (
        ("seq_len", 1),
        ("batch_size", 1),
        ("seed", 0),
        ("world_size", 1),
        ("rank", 0),
    ):
        for bad in (low - 1, True, 1.0):
            with pytest.raises(ConfigError) as e:
                TokenWindows(d, "train", **{**edge, name: bad})
            assert str(e.value) == f"{name} must be an int >= {low}, got {bad!r}"


def _shards_dir(path, sizes, vocab=64, top=None):
    import json

    import numpy as np

    path.mkdir()
    shards, k = [], 0
    for i, n in enumerate(sizes):
        np.arange(k, k + n, dtype="uint16").__mod__(vocab - 1).tofile(path / f"t{i}.bin")
        shards.append({"file": f"t{i}.bin", "tokens": n})
        k += n
    if top is not None:  # the last token of the last shard becomes `top`
        a = np.fromfile(path / f"t{len(sizes) - 1}.bin", dtype="uint16")
        a[-1] = top
        a.tofile(path / f"t{len(sizes) - 1}.bin")
    (path / "manifest.json").write_text(
        json.dumps(
            {
                "format": 1,
                "vocab_size": vocab,
                "eos_id": vocab - 1,
                "dtype": "uint16",
                "train": shards,
                "val": [],
            }
        )
    )
    return path


def test_token_windows_stream_edges(tmp_path):
    from freeformer.data.loader import TokenWindows

    # Empty shards are skipped, not the end of the stream; EOS comes from the manifest.
    w = TokenWindows(_shards_dir(tmp_path / "a", [30, 0, 1, 30]), "train", 16, 2, seed=0)
    assert w.n_tokens == 61 and w.eos_id == 63 and w.vocab_size == 64
    # n_tokens = seq_len + 1 is one window; then every start in [0, n − seq_len) is drawn.
    d = _shards_dir(tmp_path / "b", [18])
    # (Token i of this stream is i, so a row's first token is its start.)
    assert set(TokenWindows(d, "train", 17, 8, seed=1).next_batch()[0][:, 0].tolist()) == {0}
    assert set(TokenWindows(d, "train", 16, 64, seed=0).next_batch()[0][:, 0].tolist()) == {0, 1}
    with pytest.raises(DataError) as e:
        TokenWindows(d, "train", 18, 1, seed=0)
    msg = str(e.value)
    assert "has 18 tokens, fewer than seq_len+1=19" in msg and "val_fraction" not in msg
    with pytest.raises(DataError) as e:
        TokenWindows(d, "val", 4, 1, seed=0)
    assert "has 0 tokens (prepared with val_fraction=0), fewer than seq_len+1=5" in str(e.value)
    import json

    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "val": m["train"]}))  # 18 val tokens
    with pytest.raises(DataError) as e:
        TokenWindows(d, "val", 18, 1, seed=0)
    assert "has 18 tokens, fewer" in str(e.value) and "val_fraction" not in str(e.value)
    # Ids must be < vocab_size; rank must be < world_size.
    with pytest.raises(DataError, match="token id 64 >= vocab_size 64"):
        TokenWindows(_shards_dir(tmp_path / "c", [20], top=64), "train", 4, 1, seed=0)
    with pytest.raises(ConfigError, match="rank=1 must be < world_size=1"):
        TokenWindows(d, "train", 4, 1, seed=0, rank=1, world_size=1)


def test_loader_state_and_fixed_batches_contracts(tmp_path):
    from freeformer.data.loader import TokenWindows
    from freeformer.errors import CheckpointError

    d = _shards_dir(tmp_path / "a", [40])  # token i is i
    w = TokenWindows(d, "train", 4, 2, seed=3)
    assert set(w.state_dict()) == {"step", "seed", "split", "n_tokens", "seq_len", "batch_size"}
    w.load_state_dict({**w.state_dict(), "step": 0})
    for bad in (-1, True, 1.5):
        with pytest.raises(CheckpointError, match="step="):
            w.load_state_dict({**w.state_dict(), "step": bad})
    for key, other in (("split", "val"), ("n_tokens", 41), ("seed", 4)):
        with pytest.raises(DataError, match=f"{key}="):
            w.load_state_dict({**w.state_dict(), key: other})
    # Evaluation windows: evenly spread from the first token to the last, n ≥ 1 batches.
    fixed = TokenWindows(d, "train", 4, 2, seed=0).fixed_batches(3)
    rows = torch.cat([x for x, _ in fixed])
    ys = torch.cat([y for _, y in fixed])
    assert len(fixed) == 3 and rows[0, 0] == 0 and ys[-1, -1] == 39
    assert (rows[1:, 0] - rows[:-1, 0] >= 5).all()  # windows of 5 never overlap
    assert len(TokenWindows(d, "train", 4, 8, seed=0).fixed_batches(1)) == 1  # exactly fits
    ((_, y),) = TokenWindows(d, "train", 4, 2, seed=0).fixed_batches(1)  # two windows: the ends
    assert y[-1, -1] == 39
    for bad in (0, True):
        with pytest.raises(ConfigError, match="n_batches"):
            w.fixed_batches(bad)
    with pytest.raises(DataError, match="too few for one batch"):
        TokenWindows(d, "train", 4, 9, seed=0).fixed_batches(1)
