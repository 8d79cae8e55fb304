"""What the latent carries, without generating from the prior ("reconstruction").

Figure 4 reads the latent through prior samples: a shared Z is drawn from the uniform prior
and the decoder decides what it means. This diagnostic reads it from the other side. For
held-out sequences of the training distribution, the encoder (the posterior Q(Z | S)) draws
a code per position; those codes are pinned and the sequence is regenerated from its
2-character prompt. What the regenerated sequence shares with its source is what Z carried:

- ``position_match``: fraction of sources whose regenerated target starts at the source's
  position (invalid regenerations count as misses). Chance level, with nothing in Z, is
  about 1/57.
- ``noise_jaccard``: mean Jaccard index of the '!' body positions of source and
  regeneration (over valid regenerations; chance about 0.03).
- ``validity``: fraction of regenerations that parse as valid.

Alongside, the posterior's KL per token (bits) is split by what the token at that position
is used to predict. The code at position t enters the decoder at t and first helps predict
token t+1 (the decoder is causal), so a position is classed by token t+1:

- ``prompt``: t = 0 (predicting '>');
- ``blank before target`` / ``blank after target``: token t+1 is '_' before / after the
  target run (a code spread over the blanks before the target is how a position code
  cheaper than one token can work under token-wise free bits);
- ``noise``: token t+1 is '!' (inside the target too, except at its start);
- ``target start``: token t+1 is the first character of the target run, noised or not
  (where a one-token position code lives);
- ``target rest``: the other target characters that are not '!'.

The KL is then split (:func:`freeformer.diagnostics.kl_split`) into what the codes say about the sequence
and what they say about nothing: averaged over sequences,
KL(Q(Z_t | S) || P) = I(S; Z_t) + KL(Q̄_t || P), where Q̄_t = E_S Q(Z_t | S) is the aggregate
posterior at position t. Token-wise free bits leave KL below κ unpenalised, so the second
term — a posterior concentrated on the same codes whatever the sequence — costs nothing in
training, yet it is exactly how far the prior samples drawn at generation are from anything
the decoder saw in training.

Everything is a function of the model, the number of sequences and a generator.
"""

from __future__ import annotations

from typing import Any

import torch

from freeformer.data.synthetic import (
    BODY,
    NOISE,
    PROMPT_LEN,
    TARGET_LEN,
    decode,
    parse,
    sample_annotated,
)
from freeformer.diagnostics import LOG2, kl_split
from freeformer.errors import DataError
from freeformer.experiments.scoring import jaccard
from freeformer.generate import generate

KINDS = (
    "prompt",
    "blank before target",
    "blank after target",
    "noise",
    "target start",
    "target rest",
)
# Sequences whose posteriors estimate the aggregate posterior (at least this many).
DECOMPOSITION_N = 1000


def token_kinds(tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(n, 65) index into :data:`KINDS` for each input position t of ``tokens`` (n, 66),
    classed by token t+1 (see the module docstring); ``start`` (n,) is the target start."""
    n = tokens.shape[0]
    nxt = tokens[:, 1:]  # token t+1 for t = 0..64
    body_idx = torch.arange(-1, BODY, dtype=torch.long)[None].expand(n, -1)  # body index of t+1
    off = body_idx - start[:, None]
    kinds = torch.empty_like(nxt)
    kinds[:] = KINDS.index("target rest")
    kinds[(off < 0) & (nxt != NOISE)] = KINDS.index("blank before target")
    kinds[(off >= TARGET_LEN) & (nxt != NOISE)] = KINDS.index("blank after target")
    kinds[off == 0] = KINDS.index("target start")
    kinds[(nxt == NOISE) & (off != 0)] = KINDS.index("noise")
    kinds[:, 0] = KINDS.index("prompt")
    return kinds


@torch.no_grad()
def reconstruction(
    model, n: int, generator: torch.Generator, *, temperature: float = 1.0
) -> dict[str, Any]:
    """Reconstruction scores and per-kind KL of a Free Transformer on ``n`` fresh sequences.

    ``generator`` drives the source sequences, the posterior draws and the regeneration.
    Returns ``position_match``, ``noise_jaccard``, ``validity``, ``kl_bits`` (mean per token)
    and ``kl_bits_by_kind`` ({kind: mean bits}, over the positions of that kind).
    """
    c = model.config
    if not c.latent:
        raise DataError("reconstruction needs a Free Transformer (latent = true), not a baseline")
    if n < 1:
        raise DataError(f"reconstruction needs n ≥ 1 sequences, got {n}")
    was_training = model.training
    model.eval()
    src = sample_annotated(n, generator)
    tokens = src.tokens
    x = tokens[:, :-1]  # (n, 65): what the encoder sees in training
    out = model(x, generator=generator)
    kl_bits = out.kl_tokens / LOG2  # (n, 65)
    # Position 65's code would only predict a 67th character: draw it from the prior.
    last = torch.randint(0, c.n_codes, (n, 1), generator=generator)
    codes = torch.cat([out.codes, last], dim=1)  # (n, 66)
    regen = generate(
        model,
        tokens[:, :PROMPT_LEN],
        BODY,
        temperature=temperature,
        latents=codes,
        generator=generator,
    )
    model.train(was_training)

    kinds = token_kinds(tokens, src.start)
    # The aggregate posterior needs more sequences than the regeneration does (its estimate
    # is biased by n): an encoder-only pass over fresh ones.
    more = sample_annotated(max(0, DECOMPOSITION_N - n), generator).tokens[:, :-1]
    logits = (
        out.bit_logits
        if more.shape[0] == 0
        else torch.cat([out.bit_logits, model(more, generator=generator).bit_logits])
    )
    split = kl_split(logits)
    by_kind = {}
    for i, name in enumerate(KINDS):
        sel = kinds == i
        by_kind[name] = float(kl_bits[sel].mean()) if bool(sel.any()) else None
    return {
        **score_reconstruction([decode(r) for r in tokens], [decode(r) for r in regen]),
        "kl_bits": float(kl_bits.mean()),
        "kl_bits_by_kind": by_kind,
        "information_bits": float(split["information"].mean()),
        "prior_mismatch_bits": float(split["mismatch"].mean()),
    }


def score_reconstruction(sources: list[str], regenerated: list[str]) -> dict[str, Any]:
    """``n``, ``validity``, ``position_match`` and ``noise_jaccard`` of regenerated strings
    against their (valid) sources; see the module docstring."""
    if len(sources) != len(regenerated) or not sources:
        raise DataError("score_reconstruction needs two non-empty lists of equal length")
    src = [parse(s) for s in sources]
    if not all(s.valid for s in src):
        raise DataError("every source of a reconstruction must be a valid task string")
    regen = [parse(s) for s in regenerated]
    valid = [(s, g) for s, g in zip(src, regen) if g.valid]
    n = len(src)
    return {
        "n": n,
        "validity": len(valid) / n,
        "position_match": sum(s.position == g.position for s, g in valid) / n,
        "noise_jaccard": (
            sum(jaccard(s.noise, g.noise) for s, g in valid) / len(valid) if valid else None
        ),
    }


def format_reconstruction(r: dict[str, Any]) -> str:
    """One line: the scores, then KL bits per kind."""
    nj = "—" if r["noise_jaccard"] is None else f"{r['noise_jaccard']:.2f}"
    kinds = ", ".join(
        f"{k} {'—' if v is None else f'{v:.3f}'}" for k, v in r["kl_bits_by_kind"].items()
    )
    split = ""
    if r.get("information_bits") is not None:
        split = (
            f" = information {r['information_bits']:.3f} + prior mismatch "
            f"{r['prior_mismatch_bits']:.3f}"
        )
    return (
        f"reconstruction from posterior codes (n={r['n']}): target position kept "
        f"{r['position_match']:.2f}, noise Jaccard {nj}, validity {r['validity']:.2f}; "
        f"KL {r['kl_bits']:.3f} bits/token{split}; by next token: {kinds}"
    )
