"""The optimizer and its schedule: AdamW over decay / no-decay parameter groups (the latent
path's new weights optionally at their own learning-rate scale), linear warmup then cosine
decay."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from freeformer.finetune import NEW_LATENT_PREFIXES
from freeformer.runconfig import TrainConfig


def param_groups(
    model: nn.Module, weight_decay: float, latent_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Decay matrices; no decay for norms, ζ, the token embedding and the post-sampler table
    (rows of a lookup table that most steps do not touch would only shrink).

    With ``latent_lr_scale`` ≠ 1 the latent path's new weights (``NEW_LATENT_PREFIXES``) get
    groups of their own whose ``lr_scale`` multiplies the scheduled lr. The groups depend on
    the model and these two numbers only, so a resumed run rebuilds them identically."""
    new = NEW_LATENT_PREFIXES if latent_lr_scale != 1.0 else ()
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (d, n): [] for n in (False, True) for d in (True, False)
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lookup = name.startswith(("tok_emb.", "post_sampler."))
        buckets[(p.dim() >= 2 and not lookup, bool(new) and name.startswith(new))].append(p)
    groups = []
    for (decay, is_new), params in buckets.items():
        if params or not is_new:  # the two base groups always exist, as before the option
            groups.append(
                {
                    "params": params,
                    "weight_decay": weight_decay if decay else 0.0,
                    "lr_scale": latent_lr_scale if is_new else 1.0,
                }
            )
    return groups


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        param_groups(model, tc.weight_decay, tc.latent_lr_scale),
        lr=tc.lr,
        betas=(tc.beta1, tc.beta2),
        fused=on_cuda or None,
    )


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio · lr``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.max_steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    floor = tc.min_lr_ratio * tc.lr
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * progress))
