"""The FT-vs-baseline bars of docs/latent-study.md: what the latent costs, per study and seed.

Reads the per-seed paired differences (Free Transformer − baseline of the same seed, same
data, same validation windows) recorded in docs/latent-study-cost.json — every number there
is in a table of docs/latent-study.md — and draws −log P(S)/token (importance sampling,
prior proposal, k 16) minus the baseline's CE for each study: bars are means, dots the seeds.
(The converted model's benchmark differences are all 0; they stay in the page's table.)

    python scripts/plot_latent_cost.py [--data docs/latent-study-cost.json] [--out docs/latent-study-cost.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "docs" / "latent-study-cost.json"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "latent-study-cost.png"))
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_latent_cost.py: needs matplotlib (pip install -e '.[plot]')")
    try:
        data = json.loads(Path(args.data).read_text())
        groups = {str(k): [float(x) for x in v] for k, v in data["delta_nll"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        sys.exit(
            f"plot_latent_cost.py: cannot read {args.data} ({e!r}); expected an object whose "
            "'delta_nll' maps each study's label to its per-seed differences (nats/token)"
        )
    if not groups or not all(groups.values()):
        sys.exit(f"plot_latent_cost.py: {args.data} has no study, or a study with no seeds")

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, vals in enumerate(groups.values()):
        ax.bar(i, statistics.mean(vals), color="#9ecae1", edgecolor="#3182bd", width=0.6)
        ax.scatter([i] * len(vals), vals, color="#08519c", s=14, zorder=3)
    ax.axhline(0.0, color="black", lw=0.8)
    # symlog: one κ = 2 seed costs 0.27 nats/token, the others ≤ 0.05, the converted ~1e-7
    ax.set_yscale("symlog", linthresh=0.01)
    top = max(max(v) for v in groups.values())
    ax.set_ylim(top=max(top * 1.6, 0.02))  # room for the highest seed's dot
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("FT − baseline, nats/token")
    ax.set_title(
        "−log P(S)/token (IS, prior, k 16) − baseline CE, same seed (> 0: the latent costs)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
