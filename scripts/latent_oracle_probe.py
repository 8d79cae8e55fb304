"""Can a converted decoder learn to read Z at all? (docs/latent-study.md, "Oracle codes")

The codes are pinned to a fixed hash of the *next* token — an oracle carrying H bits about
each target — so the encoder plays no part; the model is fine-tuned on the CE with those
codes. Validation CE with the oracle codes, with the same codes shuffled across positions,
and with prior codes: a decoder that reads Z shows oracle ≪ shuffled. A study, not a
benchmark: it prints one JSON line per evaluation.

    python scripts/latent_oracle_probe.py RUN_DIR --data DIR [--steps 100] [--ramp 30]
        [--latent-lr-scale 100] [--trainable all]

``--handoff K`` turns the probe into a candidate recipe (not the paper's procedure): for the
first K steps the decoder trains on oracle codes while the encoder runs on the same tokens
and learns to predict the oracle's bits (binary cross-entropy; the sampled codes are forced
to the oracle's through the sampler's uniforms, so Eq. 8's gradient flows too); from step K
on, the paper's objective (CE + free bits at the model's κ) with the encoder's own samples.
Each evaluation then also reports ``freeformer validate``'s figures (CE with prior and
encoder codes, the KL split).

``--oracle`` picks the map from the next token to its code. ``hash`` (default): a fixed random
permutation of the vocabulary mod 2^H — easy for the decoder (a code row can raise its ~V/2^H
tokens' logits) but, for the encoder, a memorised random function of the token. ``pca``: bit
h = [the next token's input embedding, projected on the embedding table's h-th principal
direction, lies above that projection's median over training tokens] — a linear function of
the embedding, which the encoder's linear bit readout can compute once it attends to the next
position, and a code that groups similar tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from freeformer.checkpoint import load_model
from freeformer.data.loader import TokenWindows
from freeformer.finetune import latent_warmup, set_trainable
from freeformer.latent import codes_to_bits
from freeformer.optim import build_optimizer, lr_at
from freeformer.runconfig import TrainConfig
from freeformer.validation import evaluate as validate


def evaluate(model, val, perm, seed: int = 1) -> dict[str, float]:
    model.eval()
    out = {}
    with torch.no_grad():
        for name in ("oracle", "shuffled", "prior"):
            total = 0.0
            for x, y in val:
                codes = perm[y]
                if name == "shuffled":
                    g = torch.Generator().manual_seed(seed)
                    flat = codes.flatten()
                    codes = flat[torch.randperm(flat.numel(), generator=g)].view_as(codes)
                latents = "prior" if name == "prior" else codes
                g = torch.Generator().manual_seed(seed + 1)
                total += float(model(x, y, latents=latents, generator=g).ce)
            out[name] = total / len(val)
    model.train()
    return out


def pca_codes(emb: torch.Tensor, n_bits: int, batches) -> torch.Tensor:
    """Token id → code whose bit h says which side of its median (over the tokens of
    ``batches``, so each bit is balanced on data) the embedding's projection on the h-th
    principal direction of the embedding table falls."""
    centred = emb.float() - emb.float().mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    proj = centred @ v[:n_bits].T  # (V, H)
    seen = torch.cat([y.flatten() for _, y in batches])
    bits = (proj > proj[seen].median(0).values).long()
    return (bits << torch.arange(n_bits)).sum(-1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a converted Free Transformer run directory")
    ap.add_argument("--data", required=True, help="prepared data (the source's tokenizer)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--ramp", type=int, default=30, help="train.latent_ramp_steps")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--latent-lr-scale", type=float, default=100.0)
    ap.add_argument("--trainable", default="all", choices=["all", "latent"])
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--handoff", type=int, default=0, help="oracle steps before the encoder")
    ap.add_argument("--oracle", default="hash", choices=["hash", "pca"], help="next token → code")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.run, "cpu")
    c = model.config
    tc = TrainConfig(
        max_steps=args.steps,
        lr=args.lr,
        warmup_steps=min(10, args.steps),
        batch_size=2,
        seq_len=256,
        trainable=args.trainable,
        latent_lr_scale=args.latent_lr_scale,
        latent_ramp_steps=min(args.ramp, args.steps),
    )
    set_trainable(model, tc.trainable)
    opt = build_optimizer(model, tc)
    train = TokenWindows(args.data, "train", tc.seq_len, tc.batch_size, 0, 0, 1)
    if args.oracle == "hash":  # a fixed random map from token ids to codes (the same for every run)
        perm = torch.randperm(c.vocab_size, generator=torch.Generator().manual_seed(0)) % c.n_codes
    else:
        perm = pca_codes(model.tok_emb.weight.detach(), c.latent_bits, train.fixed_batches(50))
    val = TokenWindows(args.data, "val", tc.seq_len, tc.batch_size, 0, 0, 1).fixed_batches(4)
    print(json.dumps({"step": 0, **evaluate(model, val, perm)}), flush=True)
    gen, cpu = torch.Generator().manual_seed(1), torch.device("cpu")
    t0 = time.time()
    for step in range(tc.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc) * g["lr_scale"]
        latent_warmup(model, step, tc)  # the ramp on r, as training applies it
        x, y = train.next_batch()
        if not args.handoff:
            out = model(x, y, latents=perm[y], return_logits=False)
            loss = out.ce
        elif step < args.handoff:
            bits = codes_to_bits(perm[y], c.latent_bits)
            # u = 0 sets a bit, u = 1 clears it: the encoder's sample is the oracle's code.
            out = model(x, y, bit_noise=1 - bits, return_logits=False)
            assert torch.equal(out.codes, perm[y])
            loss = out.ce + F.binary_cross_entropy_with_logits(out.bit_logits, bits)
        else:
            out = model(x, y, generator=gen, return_logits=False)
            loss = out.loss  # the paper's: CE + free bits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == tc.max_steps:
            row = {
                "step": step + 1,
                "train_ce": float(out.ce.detach()),
                "s": round(time.time() - t0),
            }
            if args.handoff:
                row.update(
                    validate(model, val, latent=True, n_bits=c.latent_bits, k=2, seed=2, device=cpu)
                )
            print(json.dumps({**row, **evaluate(model, val, perm)}), flush=True)


if __name__ == "__main__":
    main()
