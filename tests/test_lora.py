"""LoRA fine-tuning through PEFT (train.lora_rank > 0): at init the model is exactly the base
model; only the adapters and the latent path train; checkpoints are plain safetensors that
resume bit-identically; merged adapters compute the unmerged model; export merges them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft", reason="LoRA goes through PEFT (the 'lora' extra)")

from resume import assert_same_final_weights, train_then_resume  # noqa: E402

from freeformer import lora  # noqa: E402
from freeformer.checkpoint import load_checkpoint, load_model  # noqa: E402
from freeformer.cli import main  # noqa: E402
from freeformer.errors import ConfigError  # noqa: E402
from freeformer.runconfig import load_run_config  # noqa: E402
from freeformer.train import build_model, load_init_checkpoint, train  # noqa: E402


def debug_cfg(**train_kv):
    kv = {"progress": "false", "eval_every": "0", **train_kv}
    return load_run_config(preset="debug", overrides=[f"train.{k}={v}" for k, v in kv.items()])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained run: its weights differ from any seeded init."""
    d = tmp_path_factory.mktemp("lora") / "source"
    train(debug_cfg(max_steps=4, lr=0.01), d, quiet=True)
    return d


def _inputs(cfg):
    x = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    z = torch.randint(0, cfg.model.n_codes, (2, 24), generator=torch.Generator().manual_seed(1))
    return x, z


@pytest.mark.parametrize("injection", ["full", "lora"])
def test_lora_at_init_is_the_base_model_and_freezes_the_rest(source, injection):
    cfg = debug_cfg(init_from=str(source), lora_rank=4, lora_injection=injection)
    base, _ = load_model(source)
    model = build_model(cfg, torch.device("cpu"), load_init_checkpoint(cfg))
    lora.attach(model, cfg.train)
    x, z = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, latents=z).logits, base(x, latents=z).logits)
    inject = f"blocks.{cfg.model.inject_layer}."
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    # Adapters on every decoder block's five linears (the injection block's only with "lora").
    blocks = cfg.model.n_layers - (injection == "full")
    assert len(adapters) == 2 * 5 * blocks
    assert not any(n.startswith("encoder.") for n in adapters)
    full = trainable - adapters
    want = {
        n
        for n, _ in model.named_parameters()
        if ".lora_" not in n
        and n.startswith(("encoder.", "post_sampler.") + ((inject,) if injection == "full" else ()))
    }
    assert full == want and want


def test_lora_trains_merges_resumes_and_exports(source, tmp_path):
    cfg = debug_cfg(
        init_from=str(source),
        lora_rank=4,
        lora_alpha=8,
        max_steps=6,
        ckpt_every=3,
        keep_last=5,
        lr=0.02,
        warmup_steps=1,
    )
    full, cut = train_then_resume(cfg, tmp_path, keep_step=3)
    ck, src = load_checkpoint(full), load_checkpoint(source).model_state
    st = ck.model_state
    # Plain names: the frozen base untouched, the adapters beside it, the latent path trained.
    assert "blocks.0.attn.wq.lora_A" in st and "blocks.0.attn.wq.lora_B" in st
    assert not any("base_layer" in k or ".default." in k for k in st)
    for k, t in lora.base_state(st).items():
        moved = not torch.equal(t, src[k])
        assert moved == k.startswith(
            ("encoder.", "post_sampler.", f"blocks.{cfg.model.inject_layer}.")
        ), k
    assert float(st["blocks.0.mlp.w_out.lora_B"].abs().max()) > 0  # the adapters learned
    # Optimizer state only for what trains (adapters under PEFT's names).
    assert all(
        ".lora_" in k or k.startswith(("encoder.", "post_sampler.", "blocks.2."))
        for k in ck.optimizer_tensors()
    )

    # Merged (load_model folds W + (α/r)·B·A) = unmerged (the PEFT-wrapped model).
    merged, _ = load_model(full)
    wrapped = build_model(cfg, torch.device("cpu"), load_init_checkpoint(cfg))
    from freeformer.checkpoint import load_model_state

    load_model_state(wrapped, lora.base_state(st))
    lora.attach(wrapped, cfg.train, st)
    x, z = _inputs(cfg)
    with torch.no_grad():
        a, b = merged(x, latents=z).logits, wrapped.eval()(x, latents=z).logits
        base = load_model(source)[0](x, latents=z).logits
    assert float((a - b).abs().max()) < 1e-5 * max(1.0, float(a.abs().max()))
    assert float((a - base).abs().max()) > 1e-3  # the comparison is not vacuous

    # Fine-tuning from a LoRA run starts from its merged weights.
    again = build_model(
        debug_cfg(init_from=str(full)),
        torch.device("cpu"),
        load_init_checkpoint(debug_cfg(init_from=str(full))),
    )
    assert all(torch.equal(t, merged.state_dict()[k]) for k, t in again.state_dict().items())

    assert_same_final_weights(full, cut)  # exact resume from step 3

    # Export folds the adapters: the exported weights are the merged model's.
    from freeformer.export import export

    out = export(full, tmp_path / "hf")
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    assert torch.equal(
        t["model.layers.0.self_attn.q_proj.weight"], merged.state_dict()["blocks.0.attn.wq.weight"]
    )

    # Unmerged: the base weights + PEFT's adapter files; PeftModel computes the merged model.
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    out = export(full, tmp_path / "hf-unmerged", unmerged_lora=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        plain = hf(x, latents=z).logits
        peft_model = PeftModel.from_pretrained(hf, out / "lora").eval()
        adapted = peft_model(input_ids=x, latents=z).logits
    assert float((adapted - a).abs().max()) < 1e-5 * max(1.0, float(a.abs().max()))
    assert float((plain - a).abs().max()) > 1e-3  # without the adapters it differs
    n_adapted = sum(".lora_A." in n for n, _ in peft_model.named_parameters())
    assert n_adapted == 7 * (cfg.model.n_layers - 1)  # q k v o gate up down, not the encoder


def test_lora_config_is_validated(capsys):
    for kv, needle in (
        (dict(lora_rank=-1), "train.lora_rank = -1"),
        (dict(lora_rank=4, lora_targets="wq,foo"), "train.lora_targets = 'wq,foo'"),
        (dict(lora_rank=4, trainable="latent"), "with train.lora_rank > 0"),
        (dict(lora_injection="half"), "train.lora_injection = 'half'"),
    ):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
            debug_cfg(**kv)
    assert main(["train", "--preset", "debug", "--train.lora_targets=wx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.lora_targets = 'wx'" in err and "\n" not in err
