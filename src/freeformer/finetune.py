"""Fine-tuning setup: starting a run from another run's weights (``train.init_from``) and
training only part of the model (``train.trainable``).

The latent path of a converted pretrained decoder is new, the rest pretrained; these are
the names that tell them apart, used by the optimizer's parameter groups
(``train.latent_lr_scale``) and by freezing.
"""

from __future__ import annotations

import math
from pathlib import Path

from freeformer.checkpoint import Checkpoint, load_checkpoint, load_run_tokenizer
from freeformer.errors import CheckpointError, ConfigError
from freeformer.latent import bit_balance_kl, free_bits_loss
from freeformer.model import FreeTransformer, ModelOutput
from freeformer.runconfig import RunConfig, TrainConfig

# The latent path's weights that a converted pretrained model does not have: the encoder
# (its blocks, ζ, the bit readout) and the post-sampler. The injection block is a decoder
# block of the source model, so it is not among them.
NEW_LATENT_PREFIXES = ("encoder.", "post_sampler.")


def latent_path_prefixes(model: FreeTransformer) -> tuple[str, ...]:
    """Parameter-name prefixes of the latent path: the encoder, the post-sampler and the
    injection block, the one block whose keys/values read x + r (paper Algorithm 2)."""
    return ("encoder.", "post_sampler.", f"blocks.{model.config.inject_layer}.")


def set_trainable(model: FreeTransformer, trainable: str) -> None:
    """``"all"``: every weight trains. ``"latent"``: only the latent path does; the rest is
    frozen (requires_grad False), so it gets no gradient, no optimizer state and no decay."""
    keep = latent_path_prefixes(model) if trainable == "latent" else ("",)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(keep))


def load_init_checkpoint(cfg: RunConfig) -> Checkpoint | None:
    """The checkpoint named by ``train.init_from``, checked against the run's [model] section."""
    src = cfg.train.init_from
    if not src:
        return None
    ck = load_checkpoint(src)
    saved, own = ck.state["config"]["model"], cfg.model.to_dict()
    diff = [k for k in own if saved.get(k) != own[k]]
    if diff:
        k = diff[0]
        more = f" (and {len(diff) - 1} more field(s) differ)" if len(diff) > 1 else ""
        raise CheckpointError(
            f"--init-from {src}: model.{k} = {own[k]!r} in this run's config but "
            f"{saved.get(k)!r} in the checkpoint{more}; set --model.{k}={saved.get(k)} or make "
            "[model] equal the checkpoint's config.json"
        )
    return ck


def check_same_tokenizer(init: Checkpoint, data_dir: Path) -> None:
    """Data prepared with another tokenizer than the initial weights' would train on
    meaningless ids without any error; refuse it."""
    from freeformer.data.tokenizer import load_tokenizer

    run_dir = init.path.parent.parent
    if not (run_dir / "tokenizer").is_dir():
        return  # the source run has no tokenizer to compare with (synthetic task)
    a, b = load_run_tokenizer(init), load_tokenizer(data_dir)
    # Same vocabulary and ids; the document separator may differ (prepare with the
    # tokenizer.json file ends documents with <|endoftext|>, with the directory with the
    # source's own EOS), both are ids the model knows.
    same = type(a) is type(b) and a.vocab_size == b.vocab_size
    if same and hasattr(a, "hf"):
        same = a.hf.get_vocab(with_added_tokens=True) == b.hf.get_vocab(
            with_added_tokens=True
        ) and a.encode(_PROBE) == b.encode(_PROBE)
    if not same:
        raise ConfigError(
            f"the data in {data_dir} was prepared with another tokenizer than "
            f"the --init-from run's; prepare it with --tokenizer "
            f"{run_dir / 'tokenizer'}"
        )


_PROBE = "def f(x):\n    return x  # Ünïcödé, 中文, emoji 🙂\n\tThe end. 12345"


def latent_warmup(model: FreeTransformer, step: int, tc: TrainConfig) -> float | None:
    """Apply the opt-in latent warm-up schedules for optimizer step ``step`` (0-based).

    ``train.latent_ramp_steps`` = N: r is multiplied by min(1, step / N) — 0 at step 0, so
    a post-sampler drawn at the residual stream's scale leaves the source model's function
    intact until the decoder has had steps to adapt to it. ``train.free_bits_warmup_steps``
    = M: returns the free-bits threshold κ_step in nats, H bits at step 0 (no KL penalised)
    falling linearly to model.free_bits at step M; None (the model's κ) otherwise.
    Deterministic in ``step``, so a resumed run continues the same schedule.
    """
    c = model.config
    if not c.latent:
        return None
    if tc.latent_ramp_steps:
        model.post_sampler.r_scale = min(1.0, step / tc.latent_ramp_steps)
    if tc.free_bits_warmup_steps and step < tc.free_bits_warmup_steps:
        frac = step / tc.free_bits_warmup_steps
        return (c.latent_bits + frac * (c.free_bits - c.latent_bits)) * math.log(2.0)
    return None


def opt_in_latent_loss(out: ModelOutput, tc: TrainConfig, free_bits_nats: float | None) -> None:
    """Rewrite ``out.loss`` (and ``out.kl_loss``) with the opt-in terms, in place: the KL
    warm-up's threshold ``free_bits_nats`` (from ``latent_warmup``) instead of the model's κ,
    and ``train.code_balance_weight`` × ``latent.bit_balance_kl``. Both off: the paper's
    loss, untouched."""
    if free_bits_nats is not None and out.kl_tokens is not None:
        out.kl_loss = free_bits_loss(out.kl_tokens, free_bits_nats)
        out.loss = out.ce + out.kl_loss
    if tc.code_balance_weight and out.bit_logits is not None:
        out.loss = out.loss + tc.code_balance_weight * bit_balance_kl(out.bit_logits)
