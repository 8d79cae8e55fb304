"""Spread and bias of the likelihood estimators (freeformer.likelihood) on a trained model.

For validation sequences of a run, split into a context and a continuation:
  conditional  log P(cont | ctx), proposals ``prior`` and ``encoder`` (self-normalised IS);
  document     log P(S | first token), proposals ``prior`` (log-mean-exp of P(S | Z)) and
               ``encoder`` (the encoder over S: P(S|Z) P(Z) / Q(Z|S), validation's nll_is);
and, for comparison, the old unweighted estimand log (1/K) Σ_j P(cont | ctx, Z_j);
for K in --ks, each repeated --repeats times with different seeds. Reference: conditional,
the proposal whose two seeds agree better at --ref-k (both are consistent; the disagreements
are printed); document, the highest mean estimate found (each is low in expectation).
Reported per estimator and K, averaged over sequences: bias (mean − reference), sd (the
spread of one estimate), rmse, in nats per sequence.

  PYTHONPATH=src python scripts/likelihood_estimators.py RUN_DIR [--ctx 32 --cont 8]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from freeformer.checkpoint import load_model
from freeformer.distributed import DistInfo
from freeformer.latent import uniform_codes
from freeformer.likelihood import (
    conditional_log_likelihood,
    conditional_scores,
    log_likelihood,
    log_mean_exp,
    token_log_probs,
)
from freeformer.runconfig import RunConfig
from freeformer.train import build_data


@torch.no_grad()
def prior_document(model, x, y, k, generator, max_rows):
    """log (1/k) Σ_j P(S | Z_j), Z_j from the prior (rolling windows in ``prior`` mode)."""
    B, T = x.shape
    xs, ys = x.repeat(k, 1), y.repeat(k, 1)
    codes = uniform_codes((k * B, T), model.config.latent_bits, x.device, generator)
    out = []
    for s in range(0, k * B, max_rows):
        e = min(k * B, s + max_rows)
        out.append(token_log_probs(model(xs[s:e], latents=codes[s:e]).logits, ys[s:e]).sum(-1))
    return log_mean_exp(torch.cat(out).double().view(k, B), 0)


@torch.no_grad()
def unweighted(model, x, y, n_ctx, k, generator, max_rows):
    """The old, wrong estimand log (1/k) Σ_j P(cont | ctx, Z_j), Z_j from the prior."""
    B, T = x.shape
    xs, ys = x.repeat(k, 1), y.repeat(k, 1)
    codes = uniform_codes((k * B, T), model.config.latent_bits, x.device, generator)
    n = torch.full((k * B,), n_ctx)
    b = torch.cat(
        [
            conditional_scores(model, xs[s:e], ys[s:e], n[s:e], codes[s:e]).log_cont
            for s in range(0, k * B, max_rows)
            for e in [min(k * B, s + max_rows)]
        ]
    )
    return log_mean_exp(b.double().view(k, B), 0)


def estimate(kind, proposal, model, x, y, n_ctx, k, seed, max_rows):
    g = torch.Generator().manual_seed(seed)
    if proposal == "unweighted":
        return unweighted(model, x, y, n_ctx, k, g, max_rows)
    if kind == "conditional":
        return conditional_log_likelihood(
            model, x, y, n_ctx, k, proposal=proposal, generator=g, max_rows=max_rows
        )
    if proposal == "encoder":
        return log_likelihood(model, x, y, k, generator=g, max_rows=max_rows)
    return prior_document(model, x, y, k, g, max_rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--ctx", type=int, default=32, help="context tokens")
    p.add_argument("--cont", type=int, default=8, help="continuation tokens")
    p.add_argument("--ks", default="1,4,16,64")
    p.add_argument("--repeats", type=int, default=16)
    p.add_argument("--ref-k", type=int, default=4096)
    p.add_argument("--max-rows", type=int, default=4096)
    p.add_argument("--kinds", default="conditional,document")
    p.add_argument(
        "--proposals",
        default=None,
        help="comma list among prior, encoder, unweighted (default: all that apply)",
    )
    p.add_argument("--json", default=None, help="write the table here too")
    a = p.parse_args()
    torch.set_num_threads(1)
    model, ck = load_model(a.run, torch.device("cpu"))
    model.eval()
    cfg = RunConfig.from_dict(ck.state["config"])
    _, val = build_data(cfg, DistInfo())
    x = torch.cat([b[0] for b in val])[: a.sequences]
    y = torch.cat([b[1] for b in val])[: a.sequences]
    with torch.no_grad():
        kl = float(model(x).kl) / math.log(2)
    print(
        f"run {a.run} step {ck.step}: κ = {cfg.model.free_bits} bit, H = "
        f"{cfg.model.latent_bits}, KL on these sequences {kl:.3f} bits/token; "
        f"{len(x)} sequences of {x.shape[1]} tokens"
    )
    ks = [int(v) for v in a.ks.split(",")]
    rows = []
    t0 = time.time()
    for kind in a.kinds.split(","):
        if kind == "conditional":
            xs, ys, n_ctx = x[:, : a.ctx + a.cont - 1], y[:, : a.ctx + a.cont - 1], a.ctx
            what = f"log P(cont | ctx), ctx {a.ctx} tokens, cont {a.cont} tokens"
        else:
            xs, ys, n_ctx = x, y, 1
            what = f"log P(S | first token), {x.shape[1]} tokens"
        props = ("prior", "encoder") + (("unweighted",) if kind == "conditional" else ())
        if a.proposals:
            props = tuple(p for p in props if p in a.proposals.split(","))
        pair = {prop: torch.stack([estimate(kind, prop, model, xs, ys, n_ctx, a.ref_k, seed,
                                            a.max_rows) for seed in (10_000, 10_001)])
                for prop in ("prior", "encoder")}  # fmt: skip
        refs = {prop: v.mean(0) for prop, v in pair.items()}
        # seed-to-seed difference at ref_k: how converged each proposal is there
        self_gap = {prop: (v[0] - v[1]).abs().mean().item() for prop, v in pair.items()}
        runs = {
            (prop, k): torch.stack(
                [
                    estimate(kind, prop, model, xs, ys, n_ctx, k, r, a.max_rows)
                    for r in range(a.repeats)
                ]
            )
            for prop in props
            for k in ks
        }  # (repeats, sequences) each
        gap = (refs["prior"] - refs["encoder"]).abs()
        if kind == "conditional":  # both are consistent: the better-converged one at ref_k
            best = min(self_gap, key=self_gap.get)
            ref = refs[best]
            how = (
                f"reference = {best} at K = {a.ref_k} (mean of 2 seeds; seed-to-seed "
                f"difference: prior {self_gap['prior']:.3f}, encoder "
                f"{self_gap['encoder']:.3f} nats; prior − encoder: {gap.mean():.3f} on "
                f"average, {gap.max():.3f} at most)"
            )
        else:  # every estimate is a stochastic lower bound: the highest mean is the tightest
            cands = [refs["prior"], refs["encoder"]] + [e.mean(0) for e in runs.values()]
            # (a maximum of noisy means is itself biased high by their noise; the spread of
            # each is printed, and the means at K ≥ 16 have repeats to average it down)
            ref = torch.stack(cands).max(0).values
            how = (
                "every estimate is low in expectation (Jensen), so the reference is the "
                f"highest mean found, K = {a.ref_k} included (prior − encoder at that K: "
                f"{(refs['prior'] - refs['encoder']).mean():+.2f} nats)"
            )
        print(f"\n{kind}: {what}; {how}")
        print(f"{'proposal':>8} {'K':>5} {'bias':>8} {'sd':>8} {'rmse':>8}")
        for (prop, k), e in runs.items():
            bias = (e.mean(0) - ref).mean().item()
            sd = e.std(0).mean().item()
            rmse = ((e - ref) ** 2).mean().sqrt().item()
            rows.append(
                dict(
                    kind=kind,
                    proposal=prop,
                    k=k,
                    bias=bias,
                    sd=sd,
                    rmse=rmse,
                    ref_gap=gap.mean().item(),
                    ref_self_gap=self_gap,
                )
            )
            print(f"{prop:>8} {k:>5} {bias:8.3f} {sd:8.3f} {rmse:8.3f}")
    print(f"\n({time.time() - t0:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"run": a.run, "step": ck.step, "kl_bits": kl, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
