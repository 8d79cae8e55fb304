"""LoRA fine-tuning through PEFT (``train.lora_rank > 0``).

The decoder's linear maps named by ``train.lora_targets`` get low-rank adapters
W + (α/r)·B·A (Hu et al., 2021) from PEFT's ``inject_adapter_in_model``, so a large
converted model fine-tunes with a few trainable matrices. The latent path's new weights —
the encoder (blocks, ζ, bit readout) and the post-sampler — are not in the source model and
train in full; so does the injection block (the one decoder block whose keys/values read
x + r, paper Algorithm 2) unless ``train.lora_injection = "lora"``. Every other weight is
frozen. A and B are drawn here from an explicit generator (B = 0, so at step 0 the model is
exactly the base model); PEFT's own init would use torch's global RNG.

Checkpoints stay plain safetensors under freeformer's names: the frozen base weights as
always, plus ``<module>.lora_A`` (r × in) and ``<module>.lora_B`` (out × r) per adapted
module. :func:`merged_state` folds them into the base weights with torch alone, so
generate / validate / eval / export read a LoRA run without PEFT; training and exact resume
re-attach the adapters (:func:`attach`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from freeformer.errors import CheckpointError, UserError

LORA_TARGETS = ("wq", "wkv", "wo", "w_in", "w_out")
"""Linear maps of a decoder block: attention (query, fused key/value, output) and SwiGLU
(fused gate/up, down)."""
LORA_INJECTION = ("full", "lora")
_PARENT = {"wq": "attn", "wkv": "attn", "wo": "attn", "w_in": "mlp", "w_out": "mlp"}
_ADAPTER = "default"
_CKPT_KEY = re.compile(r"^(.*)\.lora_([AB])$")


def _import_peft():
    try:
        import peft
    except ImportError:
        raise UserError("train.lora_rank > 0 needs PEFT: pip install 'freeformer[lora]'") from None
    return peft


def parse_targets(text: str) -> tuple[str, ...]:
    """``"wq,wkv,wo"`` → the names, each one of :data:`LORA_TARGETS` (ValueError otherwise)."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in LORA_TARGETS]
    if bad or not names:
        raise ValueError(bad[0] if bad else text)
    return names


def _lora_blocks(model: nn.Module, injection: str) -> list[int]:
    c = model.config
    full = c.latent and injection == "full"  # a baseline has no injection block
    return [i for i in range(c.n_layers) if not (full and i == c.inject_layer)]


def target_regex(model: nn.Module, targets: tuple[str, ...], injection: str) -> str:
    """A PEFT ``target_modules`` regex matching exactly the decoder's chosen linears (a name
    list would also match the encoder's blocks, whose names end the same way)."""
    blocks = "|".join(str(i) for i in _lora_blocks(model, injection))
    mods = "|".join(f"{_PARENT[t]}\\.{t}" for t in targets)
    return rf"blocks\.({blocks})\.({mods})"


def full_prefixes(model: nn.Module, injection: str) -> tuple[str, ...]:
    """Parameters that train in full next to the adapters: the latent path's new weights and,
    with ``injection = "full"``, the injection block."""
    c = model.config
    if not c.latent:
        return ()
    out = ("encoder.", "post_sampler.")
    return out + ((f"blocks.{c.inject_layer}.",) if injection == "full" else ())


def attach(model: nn.Module, tc: Any, state: dict[str, torch.Tensor] | None = None) -> None:
    """Give ``model`` the adapters ``tc`` (a TrainConfig) asks for and freeze the rest; with
    ``state`` (a checkpoint's tensors) load the adapters from it. No-op when lora_rank = 0."""
    if tc.lora_rank == 0:
        return
    peft = _import_peft()
    targets = parse_targets(tc.lora_targets)
    cfg = peft.LoraConfig(
        r=tc.lora_rank,
        lora_alpha=tc.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=target_regex(model, targets, tc.lora_injection),
    )
    peft.inject_adapter_in_model(cfg, model)
    full = full_prefixes(model, tc.lora_injection)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith(full))
    g = torch.Generator().manual_seed(tc.seed + 2_000_003)
    with torch.no_grad():
        for _name, mod in sorted(_lora_modules(model).items()):
            a, b = mod.lora_A[_ADAPTER].weight, mod.lora_B[_ADAPTER].weight
            # PEFT's default: A ~ U(±1/√in) (kaiming_uniform with a = √5), B = 0.
            bound = 1 / math.sqrt(a.shape[1])
            a.copy_((torch.rand(a.shape, generator=g) * 2 - 1) * bound)
            b.zero_()
    if state is not None:
        _load_adapters(model, state)


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    }


def _load_adapters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    mods = _lora_modules(model)
    have = {k for k in state if _CKPT_KEY.match(k)}
    want = {f"{n}.lora_{ab}" for n in mods for ab in "AB"}
    if have != want:
        odd = sorted(have ^ want)[0]
        raise CheckpointError(
            f"checkpoint adapters do not match train.lora_* ({odd!r} is "
            f"{'missing' if odd in want else 'unexpected'})"
        )
    with torch.no_grad():
        for n, m in mods.items():
            for ab, mod in (("A", m.lora_A[_ADAPTER]), ("B", m.lora_B[_ADAPTER])):
                t = state[f"{n}.lora_{ab}"]
                if t.shape != mod.weight.shape:
                    raise CheckpointError(
                        f"checkpoint tensor {n}.lora_{ab} has shape "
                        f"{tuple(t.shape)}, train.lora_rank implies "
                        f"{tuple(mod.weight.shape)}"
                    )
                mod.weight.copy_(t)


def checkpoint_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's names → freeformer's: ``X.base_layer.weight`` → ``X.weight``,
    ``X.lora_A.default.weight`` → ``X.lora_A`` (identity without adapters)."""
    out = {}
    for k, t in state.items():
        k = k.replace(".base_layer.", ".")
        k = re.sub(rf"\.lora_([AB])\.{_ADAPTER}\.weight$", r".lora_\1", k)
        out[k] = t
    return out


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors without the adapters (the frozen base model)."""
    return {k: t for k, t in state.items() if not _CKPT_KEY.match(k)}


def merged_state(
    state: dict[str, torch.Tensor], run_config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Plain model tensors with every adapter folded in: W + (α/r)·B·A (torch only)."""
    adapters = {k for k in state if _CKPT_KEY.match(k)}
    if not adapters:
        return state
    alpha = run_config.get("train", {}).get("lora_alpha")
    if alpha is None:
        raise CheckpointError(
            "the checkpoint holds LoRA adapters but its config has no train.lora_alpha"
        )
    out = base_state(state)
    for k in sorted(adapters):
        module, ab = _CKPT_KEY.match(k).groups()
        if ab == "B":
            continue
        a, b = state[k], state.get(f"{module}.lora_B")
        w = out.get(f"{module}.weight")
        if b is None or w is None:
            raise CheckpointError(f"checkpoint adapter {k} has no lora_B or base weight")
        scale = alpha / a.shape[0]
        out[f"{module}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out
