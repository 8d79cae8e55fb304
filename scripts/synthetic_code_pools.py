"""Which codes break a synthetic model's generation? (docs/synthetic/results.md, "The quick demo")

Figure 4's protocol draws every Z_t from the uniform prior; a model whose encoder emits codes
far from uniform (prior mismatch) meets codes at generation that it rarely saw in training.
This study generates from the model's own random prompts (20 groups of 5, temperature 1,
the protocol's) with the codes drawn from different pools and prints the validity of each:

- uniform: the prior (what `freeformer synthetic` scores);
- the most used codes holding 90 % of the encoder's aggregate posterior Q̄ (pooled over
  positions of 512 training sequences), uniformly; the rare codes beyond 99 %, uniformly;
- Q̄ pooled, i.i.d. per position; Q̄_t, the aggregate at each position, i.i.d. per position.

It also prints how many codes hold 90 % / 99 % of Q̄ and the post-sampler rows' norms.

    python scripts/synthetic_code_pools.py RUN_DIR      # e.g. runs/synthetic-quick/runs/kappa_2
"""

from __future__ import annotations

import argparse

import torch

from freeformer.checkpoint import load_model
from freeformer.data.synthetic import BODY, SEQ_LEN, decode, encode, random_prompt, sample_batch
from freeformer.experiments.scoring import aggregate
from freeformer.experiments.synthetic import GROUP_SIZE
from freeformer.generate import generate
from freeformer.likelihood import log_q

N_GROUPS = 20


def validity(model, codes_of) -> float:
    """Validity of N_GROUPS × GROUP_SIZE generations whose codes are ``codes_of(n, gen)``."""
    g = torch.Generator().manual_seed(7)
    prompts = [random_prompt(g) for _ in range(N_GROUPS)]
    tokens = torch.stack([encode(p) for p in prompts]).repeat_interleave(GROUP_SIZE, 0)
    z = codes_of(len(tokens), g)
    out = generate(model, tokens, BODY, temperature=1.0, latents=z, generator=g)
    s = [decode(r) for r in out.tolist()]
    groups = [s[i * GROUP_SIZE : (i + 1) * GROUP_SIZE] for i in range(N_GROUPS)]
    return aggregate(groups)["validity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a synthetic Free Transformer's run directory")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = load_model(a.run)
    H = model.config.latent_bits
    g = torch.Generator().manual_seed(123)
    x = sample_batch(512, g)
    with torch.no_grad():
        L = model(x[:, :-1], generator=g).bit_logits.float()  # (n, T, H)
    n, T, _ = L.shape
    lq = torch.stack([log_q(L, torch.full((n, T), k)) for k in range(1 << H)], -1)
    q_t = lq.exp().mean(0)  # (T, 2^H): Q̄_t
    q = q_t.mean(0)  # pooled Q̄
    order = q.argsort(descending=True)
    cum = q[order].cumsum(0)
    n90, n99 = int((cum < 0.90).sum()) + 1, int((cum < 0.99).sum()) + 1
    top, rare = order[:n90], order[n99:]
    norms = model.post_sampler.weight.norm(dim=-1)
    print(f"{a.run}: {n90} / {n99} of {1 << H} codes hold 90 % / 99 % of Q̄")
    print(f"post-sampler row norms, median: the 90 % codes {norms[top].median():.3f}", end="")
    print(f", the rare codes {norms[rare].median():.3f}" if len(rare) else "")

    def pool(codes):
        return lambda m, gen: codes[torch.randint(0, len(codes), (m, SEQ_LEN), generator=gen)]

    def from_q(m, gen):
        return torch.multinomial(q, m * SEQ_LEN, replacement=True, generator=gen).view(m, -1)

    def from_q_t(m, gen):  # positions past the encoded window reuse the last Q̄_t
        rows = torch.cat([q_t, q_t[-1:].expand(SEQ_LEN - T, -1)])
        return torch.multinomial(rows, m, replacement=True, generator=gen).T

    pools = {
        "uniform (the protocol)": pool(torch.arange(1 << H)),
        "the 90 % codes": pool(top),
        "the rare codes (beyond 99 %)": pool(rare) if len(rare) else None,
        "Q̄ pooled": from_q,
        "Q̄_t per position": from_q_t,
    }
    with torch.no_grad():
        for name, fn in pools.items():
            if fn is not None:
                print(f"validity, codes from {name}: {validity(model, fn):.2f}")


if __name__ == "__main__":
    main()
