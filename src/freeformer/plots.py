"""Training curves: CE and KL of several runs overlaid, with each run's κ as a line."""

from __future__ import annotations

import json
from pathlib import Path

from freeformer.errors import UserError


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'freeformer[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Overlay training CE (left) and KL in bits/token (right, with κ lines) of runs."""
    from freeformer.metrics import iter_metrics

    plt = _matplotlib()
    fig, (ax_ce, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for i, rd in enumerate(run_dirs):
        rd = Path(rd)
        cfg_path = rd / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{rd} is not a run directory (no config.json)")
        model = json.loads(cfg_path.read_text())["model"]
        rows = [r for r in iter_metrics(rd) if r.get("kind") != "val"]
        if not rows:
            raise UserError(f"{rd}/metrics.jsonl has no training records yet")
        colour = f"C{i % 10}"
        label = rd.name
        steps = [r["step"] for r in rows]
        ax_ce.plot(steps, [r["ce"] for r in rows], color=colour, label=label)
        if model.get("latent"):
            ax_kl.plot(steps, [r["kl_bits"] for r in rows], color=colour, label=label)
            ax_kl.axhline(model["free_bits"], color=colour, linestyle="--", linewidth=0.8)
    ax_ce.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="CE")
    ax_kl.set(xlabel="step", ylabel="KL (bits/token)", title="KL (dashed: κ)")
    ax_kl.set_yscale("symlog", linthresh=1e-2)
    for ax in (ax_ce, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
