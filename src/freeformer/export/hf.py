"""freeformer run → Hugging Face model directory (``freeformer export``).

A baseline (``model.latent = false``) becomes a plain ``LlamaForCausalLM`` directory, or
``Qwen2ForCausalLM`` when it has Qwen2's q/k/v biases: no remote code, so every tool that
reads Llama / Qwen2 reads it. A Free Transformer becomes a ``model_type = "freeformer"``
directory whose configuration and modeling files (:mod:`.configuration_freeformer`,
:mod:`.modeling_freeformer`, copied beside the weights) need only torch and transformers:
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.

Weights are renamed by the one map :func:`freeformer.pretrained.convert.weight_table` that
``freeformer convert`` reads Hugging Face checkpoints with, walked the other way (split
where convert stacks: K/V of ``wkv``, gate/up of ``w_in``), so ``freeformer convert`` of an
exported directory gives back the run's tensors bit for bit. A configuration the target class
cannot express is refused in one line naming the field.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from freeformer.config import ModelConfig
from freeformer.errors import UserError

REMOTE_FILES = ("configuration_freeformer.py", "modeling_freeformer.py")


class ExportError(UserError, ValueError):
    """A run that cannot be exported as asked (inexpressible config, stray tensors, files)."""


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------
def to_hf_weights(
    state: dict[str, torch.Tensor], config: ModelConfig, arch: str
) -> dict[str, torch.Tensor]:
    """freeformer state dict → tensors under Hugging Face names for ``arch`` ("llama",
    "qwen2" or "freeformer"), the inverse of ``convert_weights``."""
    from freeformer.pretrained.convert import _template, weight_table

    table = weight_table(arch, config)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        template, i = _template(key)
        if template not in table:
            raise ExportError(
                f"checkpoint tensor {key} has no Hugging Face name in a {arch} "
                "model; export a plain checkpoint (LoRA adapters are merged "
                "first, see docs/export.md)"
            )
        names = [n.replace("{i}", i) if i is not None else n for n in table[template]]
        # convert stacks several sources along rows in this order: split them back.
        for name, part in zip(names, t.chunk(len(names), dim=0)):
            out[name] = part.detach().contiguous().clone()
    return out


def to_peft_adapter(
    state: dict[str, torch.Tensor], config: ModelConfig, arch: str, run_config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A LoRA run's adapters in PEFT's format for the exported module names: tensors
    (``base_model.model.<module>.lora_A.weight`` …) and adapter_config.json. Where freeformer
    fuses two maps (K/V in ``wkv``, gate/up in ``w_in``) the rows of B are split and A is
    shared: B·A split by rows is exactly the two maps' updates."""
    from freeformer.lora import _CKPT_KEY
    from freeformer.pretrained.convert import _template, weight_table

    table = weight_table(arch, config)
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for key in sorted(state):
        m = _CKPT_KEY.match(key)
        if m is None or m.group(2) != "A":
            continue
        module = m.group(1)
        a, b = state[key], state[f"{module}.lora_B"]
        template, i = _template(f"{module}.weight")
        names = [n.replace("{i}", i) if i is not None else n for n in table[template]]
        for name, b_part in zip(names, b.chunk(len(names), dim=0)):
            hf_module = name.removesuffix(".weight")
            modules.append(hf_module)
            tensors[f"base_model.model.{hf_module}.lora_A.weight"] = a.contiguous().clone()
            tensors[f"base_model.model.{hf_module}.lora_B.weight"] = b_part.contiguous().clone()
    rank = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank.pop(),
        "lora_alpha": run_config["train"]["lora_alpha"],
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": None,
        # Exact module names: a name list would also match the encoder's projections.
        "target_modules": "|".join(m.replace(".", r"\.") for m in sorted(modules)),
    }
    return tensors, cfg


# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------
def _decoder_config(mc: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": mc.vocab_size,
        "hidden_size": mc.dim,
        "intermediate_size": mc.mlp_hidden,
        "num_hidden_layers": mc.n_layers,
        "num_attention_heads": mc.n_heads,
        "num_key_value_heads": mc.n_kv_heads,
        "max_position_embeddings": mc.max_seq_len,
        "rms_norm_eps": mc.norm_eps,
        "rope_theta": mc.rope_theta,
        "tie_word_embeddings": mc.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_cache": True,
    }


def plain_arch(mc: ModelConfig) -> str:
    """The plain transformers family that computes this baseline, or a one-line refusal."""
    if mc.latent:
        raise ExportError(
            "model.latent = true: a Free Transformer needs its own modeling "
            "code (exported with trust_remote_code), not a plain Llama"
        )
    if mc.qkv_bias and mc.rope_scaling != "none":
        raise ExportError(
            f"model.rope_scaling = {mc.rope_scaling!r} with model.qkv_bias = "
            "true: no Qwen2 checkpoint uses Llama 3.1's RoPE scaling and "
            "freeformer does not claim Qwen2ForCausalLM computes it the same way"
        )
    return "qwen2" if mc.qkv_bias else "llama"


def plain_config(mc: ModelConfig, arch: str) -> dict[str, Any]:
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        **_decoder_config(mc),
        "head_dim": mc.head_dim,
    }
    if mc.rope_scaling == "llama3":
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": mc.rope_factor,
            "low_freq_factor": mc.rope_low_freq_factor,
            "high_freq_factor": mc.rope_high_freq_factor,
            "original_max_position_embeddings": mc.rope_original_max_len,
        }
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=mc.n_layers)
    else:
        cfg.update(attention_bias=False, mlp_bias=False)
    return cfg


def freeformer_config(mc: ModelConfig) -> dict[str, Any]:
    from freeformer.pretrained.convert import FREEFORMER_FIELDS

    if mc.latent_injection != "kv":
        raise ExportError(
            f"model.latent_injection = {mc.latent_injection!r} (an opt-in variant) has no "
            "Hugging Face export yet; only the paper's 'kv' injection is exported"
        )
    if mc.encoder_window:
        raise ExportError(
            f"model.encoder_window = {mc.encoder_window} (an opt-in variant) has no Hugging "
            "Face export yet; only the paper's encoder (encoder_window = 0) is exported"
        )
    return {
        "architectures": ["FreeformerForCausalLM"],
        "model_type": "freeformer",
        "auto_map": {
            "AutoConfig": "configuration_freeformer.FreeformerConfig",
            "AutoModelForCausalLM": "modeling_freeformer.FreeformerForCausalLM",
        },
        **_decoder_config(mc),
        "rope_llama3": list(mc.rope_llama3) if mc.rope_llama3 is not None else None,
        **{k: getattr(mc, k) for k in FREEFORMER_FIELDS},
        "prefill_latents": "encoder",
    }


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------
def _write_tokenizer(tok: Any, mc: ModelConfig, out: Path) -> dict[str, int]:
    """tokenizer.json + a transformers tokenizer_config.json; returns the special ids."""
    from freeformer.checkpoint import write_json_atomic
    from freeformer.data.tokenizer import HFTokenizer

    if not isinstance(tok, HFTokenizer):
        return {}  # byte / synthetic vocabularies: no tokenizer.json to ship (docs/export.md)
    tok.hf.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tok.eos_token,
        "model_max_length": mc.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if tok.bos_token is not None:
        cfg.update(bos_token=tok.bos_token, add_bos_token=tok.add_bos)
    if tok.chat_template is not None:
        cfg["chat_template"] = tok.chat_template
    write_json_atomic(out / "tokenizer_config.json", cfg)
    ids = {"eos_token_id": tok.eos_id}
    if tok.bos_id is not None:
        ids["bos_token_id"] = tok.bos_id
    return ids


# ---------------------------------------------------------------------------------------
# Directory
# ---------------------------------------------------------------------------------------
def export(run: str | Path, out: str | Path, *, unmerged_lora: bool = False) -> Path:
    """Write the model of ``run`` (a run directory, its newest checkpoint, or a
    ``checkpoints/step_*`` directory) as a Hugging Face model directory ``out``.

    A LoRA run's adapters are folded into the weights; with ``unmerged_lora`` the weights
    are the run's without them (the base decoder, the fully trained latent path) and the
    adapters go to ``out/lora`` in PEFT's format (``PeftModel.from_pretrained``)."""
    from safetensors.torch import save_file

    from freeformer import __version__
    from freeformer.checkpoint import (
        atomic_directory,
        load_checkpoint,
        load_run_tokenizer,
        write_json_atomic,
    )

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; choose another --out")
    ck = load_checkpoint(run)
    mc = ck.model_config
    from freeformer.lora import base_state, merged_state

    adapters = None
    if unmerged_lora:
        if base_state(ck.model_state).keys() == ck.model_state.keys():
            raise ExportError(
                f"--unmerged-lora: {ck.path} holds no LoRA adapters (train.lora_rank = 0)"
            )
        state = base_state(ck.model_state)
    else:
        state = merged_state(ck.model_state, ck.state["config"])  # LoRA adapters folded in
    if mc.latent:
        arch, config = "freeformer", freeformer_config(mc)
    else:
        arch = plain_arch(mc)
        config = plain_config(mc, arch)
    tensors = to_hf_weights(state, mc, arch)
    if unmerged_lora:
        adapters = to_peft_adapter(ck.model_state, mc, arch, ck.state["config"])
    dtypes = {t.dtype for t in tensors.values()}
    config["torch_dtype"] = (
        str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    )
    tok = load_run_tokenizer(ck)

    with atomic_directory(out) as tmp:
        ids = _write_tokenizer(tok, mc, tmp)
        config.update(ids)
        config["freeformer_export"] = {
            "version": __version__,
            "checkpoint": str(ck.path),
            "step": ck.step,
        }
        write_json_atomic(tmp / "config.json", config)
        write_json_atomic(tmp / "generation_config.json", {**ids, "_from_model_config": True})
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if adapters is not None:
            (tmp / "lora").mkdir()
            write_json_atomic(tmp / "lora" / "adapter_config.json", adapters[1])
            save_file(
                adapters[0],
                str(tmp / "lora" / "adapter_model.safetensors"),
                metadata={"format": "pt"},
            )
        if arch == "freeformer":
            here = Path(__file__).parent
            for name in REMOTE_FILES:
                shutil.copyfile(here / name, tmp / name)
    return out
