"""Where can a converted decoder read Z through the paper's injection? (docs/latent-study.md)

With the paper's injection r_t enters only the keys/values of one block, so position t reads
its own code only through the attention weight it puts on itself. This study prints, for
every block of a run's decoder, the mean attention weight that positions ≥ 8 put on
themselves (the largest over heads, and the mean over heads), on the first token, and on the
previous token (largest over heads), over held-out windows. A block with a strongly
self-attending head is one whose keys/values a pretrained decoder can read r_t through from
the first step; `freeformer convert --inject-layer I` puts the injection there.

    python scripts/attention_self_mass.py RUN_DIR --data DIR [--batches 4]
"""

from __future__ import annotations

import argparse
import math

import torch

from freeformer import layers
from freeformer.checkpoint import load_model
from freeformer.data.loader import TokenWindows


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run directory (e.g. a converted model)")
    ap.add_argument("--data", required=True, help="prepared data (the run's tokenizer)")
    ap.add_argument("--batches", type=int, default=4, help="validation batches of 2 × 256")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = load_model(args.run, "cpu")
    val = TokenWindows(args.data, "val", 256, 2, 0, 0, 1).fixed_batches(args.batches)
    m = attention_mass(model, val)
    print("block  self max (head)  self mean  first token mean  previous max")
    for i, (d, f, p) in enumerate(m):
        print(
            f"{i:5d}  {d.max():.3f} ({d.argmax().item()})  {d.mean():.3f}  {f.mean():.3f}  {p.max():.3f}"
        )


if __name__ == "__main__":
    main()
