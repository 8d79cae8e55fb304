"""Validation's importance sampling: k draws of Z per batch, one full forward per draw and
proposal (what ``validation.evaluate`` did before) against ``evaluate`` now, whose draws
share the first L/2 blocks and the encoder (no code changes them; ``FreeTransformer.forward``'s
``draws``) and run the rest batched. Both estimate the same numbers from different random
draws; the table gives the time of one validation batch and the ratio.

The per-draw loop is kept here, as the reference, and nowhere else. Random-init models of
the presets' shapes (the time does not depend on the weights), random tokens.

    python bench/bench_validate.py                            # stdlib-code + smollm2-135m-ft (~4 min)
    python bench/bench_validate.py --rounds 3 --write
    python bench/bench_validate.py --smoke                    # debug preset, 1 round (seconds)
"""

from __future__ import annotations

import sys

import common as C
import torch

from freeformer import FreeTransformer
from freeformer.likelihood import posterior_log_weights, prior_log_weights
from freeformer.runconfig import load_run_config
from freeformer.validation import evaluate


def per_draw_loop(model, x, y, k: int, gen: torch.Generator) -> None:
    """The previous validation's work: per draw, one prior forward and one encoder forward."""
    for _ in range(k):
        prior_log_weights(model, x, y, generator=gen)
        posterior_log_weights(model, x, y, generator=gen)


def competitors(model, x, y, k: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    kw = dict(latent=True, n_bits=model.config.latent_bits, k=k, seed=0, device=C.CPU)
    return {
        "per-draw loop": lambda: per_draw_loop(model, x, y, k, gen),
        "evaluate": lambda: evaluate(model, [(x, y)], **kw),
    }


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--presets", default="stdlib-code,smollm2-135m-ft")
    ap.add_argument("--k", type=int, default=8, help="importance samples (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--smoke", action="store_true", help="debug preset, 1 round: the script runs")
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument("--section", default="validate-draws", help="RESULTS.md section to replace")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    presets = ["debug"] if args.smoke else [p for p in args.presets.split(",") if p]
    rounds = 1 if args.smoke else args.rounds
    header = C.machine_line(C.CPU)
    print(header, flush=True)
    rows = []
    for name in presets:
        cfg = load_run_config(preset=name, overrides=["train.progress=false"])
        mc, tc = cfg.model, cfg.train
        model = FreeTransformer(mc, seed=0).eval()
        g = torch.Generator().manual_seed(0)
        s = torch.randint(0, mc.vocab_size, (tc.batch_size, tc.seq_len + 1), generator=g)
        x, y = s[:, :-1], s[:, 1:]
        with torch.no_grad():
            t = C.alternate(competitors(model, x, y, args.k), rounds, warmup=1)
        lo, hi = t.ratio_range("per-draw loop", "evaluate")
        rows.append(
            [
                name,
                f"D {mc.dim}, L {mc.n_layers}, H {mc.latent_bits}, V {mc.vocab_size}",
                f"{tc.batch_size}×{tc.seq_len}",
                args.k,
                C.fmt_s(t.median("per-draw loop")),
                C.fmt_s(t.median("evaluate")),
                f"{t.ratio('per-draw loop', 'evaluate'):.2f} ({lo:.2f}–{hi:.2f})",
                t.load_range(),
            ]
        )
        print(rows[-1], flush=True)
    head = "preset|model|B×T|k|per-draw loop (s)|evaluate (s)|speed-up (range)|load"
    C.report(
        "## Validation: k importance draws sharing the first half (`bench/bench_validate.py`)",
        header,
        f"{rounds} alternating rounds; one call = one validation batch of the preset's B×T with "
        "k prior and k encoder draws; speed-up = median of per-round ratios. The per-draw loop "
        "is what `validation.evaluate` did before `forward(draws=m)`.",
        head,
        rows,
        args,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
