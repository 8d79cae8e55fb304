"""Where can a converted decoder read Z through the paper's injection? (docs/latent-study.md)

With the paper's injection r_t enters only the keys/values of one block, so position t reads
its own code only through the attention weight it puts on itself. This study prints, for
every block of a run's decoder, the mean attention weight that positions ≥ 8 put on
themselves (the largest over heads, and the mean over heads), on the first token, and on the
previous token (largest over heads), over held-out windows. A block with a strongly
self-attending head is one whose keys/values a pretrained decoder can read r_t through from
the first step; `freeformer convert --inject-layer I` puts the injection there.

The encoder's side (``--encoder``): to carry information about the next token, the encoder
(queries: the constant ζ rotated by RoPE; keys/values: x, non-causal) must attend to
position t+1. It prints each encoder head's mean weight on t+1, on t, and its attention
perplexity (keys effectively read), then the same for the best any constant query can do
by RoPE alone at the block's keys: q = β·R(+1)·k̄ per head (k̄ the mean unrotated key),
the query that peaks at offset +1 if keys were their mean.

    python scripts/attention_self_mass.py RUN_DIR --data DIR [--batches 4] [--encoder]
"""

from __future__ import annotations

import argparse
import math

import torch

from freeformer import layers
from freeformer.checkpoint import load_model
from freeformer.data.loader import TokenWindows
from freeformer.layers import apply_rope


def attention_mass(model, batches) -> torch.Tensor:
    """(n_layers, 3, n_heads): mean weight on self, on token 0, on the previous token."""
    rec: dict[int, list[torch.Tensor]] = {}
    orig = layers.Attention._attend

    def attend(self, q, k, v, mask, causal):
        T, d = q.shape[2], q.shape[3]
        kk = k.repeat_interleave(self.n_heads // self.n_kv_heads, 1)
        s = (q @ kk.transpose(-1, -2)) / math.sqrt(d)
        a = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        diag = torch.diagonal(a, dim1=-2, dim2=-1)[:, :, 8:].mean((0, 2))
        first = a[:, :, 8:, 0].mean((0, 2))
        prev = torch.diagonal(a, offset=-1, dim1=-2, dim2=-1)[:, :, 7:].mean((0, 2))
        rec.setdefault(id(self), []).append(torch.stack([diag, first, prev]))
        return orig(self, q, k, v, mask, causal)

    layers.Attention._attend = attend
    try:
        with torch.no_grad():
            for x, y in batches:  # prior codes; a converted run's r is 0 at step 0 anyway
                model(x, y, latents="prior" if model.config.latent else None)
    finally:
        layers.Attention._attend = orig
    return torch.stack([torch.stack(rec[id(b.attn)]).mean(0) for b in model.blocks])


def _next_self_perplexity(a: torch.Tensor) -> torch.Tensor:
    """(3, heads): mean weight on t+1, on t, and exp(entropy), positions 8..T-9."""
    T = a.shape[-1]
    nxt = torch.diagonal(a, offset=1, dim1=-2, dim2=-1)[:, :, 8 : T - 8].mean((0, 2))
    own = torch.diagonal(a, dim1=-2, dim2=-1)[:, :, 8 : T - 8].mean((0, 2))
    ent = -(a * a.clamp_min(1e-12).log()).sum(-1)[:, :, 8 : T - 8].mean((0, 2))
    return torch.stack([nxt, own, ent.exp()])


def encoder_mass(model, batches, betas=(1.0, 10.0, 100.0)) -> tuple[list[torch.Tensor], dict]:
    """Each encoder block's attention (rows of --encoder; block 0's queries are ζ, later
    blocks' come from the block before) and, per β, the ideal constant query's at block 0
    (see the module docstring)."""
    c = model.config
    blk, xs = model.encoder.blocks[0], []
    rec: dict[int, list] = {i: [] for i in range(len(model.encoder.blocks))}
    which = {id(b.attn): i for i, b in enumerate(model.encoder.blocks)}
    orig = layers.Attention._attend

    def attend(self, q, k, v, mask, causal):
        if id(self) in which:
            kk = k.repeat_interleave(self.n_heads // self.n_kv_heads, 1)
            rec[which[id(self)]].append(
                _next_self_perplexity(
                    ((q @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)
                )
            )
        return orig(self, q, k, v, mask, causal)

    hook = model.blocks[c.inject_layer].register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    layers.Attention._attend = attend
    try:
        with torch.no_grad():
            for x, y in batches:
                model(x, y)  # encoder codes: the encoder runs
    finally:
        layers.Attention._attend = orig
        hook.remove()
    at, ideal = blk.attn, {}
    with torch.no_grad():
        X = torch.cat(xs)
        B, T, _ = X.shape
        k = at.wkv(blk.attn_norm(X)).view(B, T, 2, at.n_kv_heads, at.head_dim)[:, :, 0]
        k = k.repeat_interleave(at.n_heads // at.n_kv_heads, 2)  # (B, T, h, hd) unrotated
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        q1 = apply_rope(k.mean((0, 1))[None], cos[1:2], sin[1:2])  # (1, h, hd): R(+1)·k̄
        kr = apply_rope(k, cos, sin).transpose(1, 2)
        for beta in betas:
            q = apply_rope((beta * q1).expand(T, -1, -1)[None], cos, sin).transpose(1, 2)
            a = ((q @ kr.transpose(-1, -2)) / math.sqrt(at.head_dim)).softmax(-1)
            ideal[beta] = _next_self_perplexity(a)
    return [torch.stack(r).mean(0) for r in rec.values()], ideal


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run directory (e.g. a converted model)")
    ap.add_argument("--data", required=True, help="prepared data (the run's tokenizer)")
    ap.add_argument("--batches", type=int, default=4, help="validation batches of 2 × 256")
    ap.add_argument("--encoder", action="store_true", help="the encoder's view of t+1 instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = load_model(args.run, "cpu")
    val = TokenWindows(args.data, "val", 256, 2, 0, 0, 1).fixed_batches(args.batches)
    if args.encoder:
        m, ideal = encoder_mass(model, val)
        print(f"uniform: {1 / 256:.3f} on any one of 256 keys")
        rows = [(f"encoder {i}" if len(m) > 1 else "encoder", v) for i, v in enumerate(m)] + [
            (f"ideal β {b:g}", v) for b, v in ideal.items()
        ]
        for name, v in rows:
            print(
                f"{name:>12}  t+1 max {v[0].max():.3f} mean {v[0].mean():.3f}  "
                f"t mean {v[1].mean():.3f}  perplexity mean {v[2].mean():.1f}"
            )
        return
    m = attention_mass(model, val)
    print("block  self max (head)  self mean  first token mean  previous max")
    for i, (d, f, p) in enumerate(m):
        print(
            f"{i:5d}  {d.max():.3f} ({d.argmax().item()})  {d.mean():.3f}  {f.mean():.3f}  {p.max():.3f}"
        )


if __name__ == "__main__":
    main()
