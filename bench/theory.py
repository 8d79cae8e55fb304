"""Theoretical training cost of the Free Transformer relative to its baseline decoder.

FLOPs of one training step (forward + backward), counted as matmul FLOPs, for N = B·T
tokens (paper Section 3, Algorithm 2):

  baseline  = 3 · [L · (block matmuls + causal attention) + readout]
  FT extra  = 3 · (encoder block: same matmuls, non-causal attention; + bit readout D → H)
            + 2 · N · 2^H · D            (binary mapper backward: s_d = <W_d, dr_t>, Eq. 8)
            + post-sampler: a row lookup forward, an index_add backward (≈ 0 FLOPs)

Per token, a block's matmuls cost 2·(D·q + 2·D·kv + q·D + 2·D·F + F·D) forward (q = n_heads
·head_dim, kv = n_kv_heads·head_dim, F = SwiGLU width); attention 4·T·q per token
non-causal and half of it causal; backward = 2 × forward. Elementwise work (norms, RoPE,
softmax, SwiGLU gating, cross-entropy) is not counted: it scales like the blocks, so it
barely moves the ratio except at toy sizes, where per-op overhead dominates instead.

    python bench/theory.py                   # the table, with measured ratios if present
    python bench/theory.py --write           # also update bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import common as C

MEASURED = C.BENCH_DIR / "train_results.json"


@dataclass(frozen=True)
class Shape:
    """What the cost depends on: model shape, latent bits, sequence length and batch."""

    name: str
    vocab: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden: int
    T: int
    B: int
    H: int
    encoder_layers: int = 1

    @property
    def N(self) -> int:
        return self.B * self.T

    @classmethod
    def from_config(cls, name: str, cfg, T: int, B: int, H: int | None = None) -> Shape:
        """From a freeformer ModelConfig."""
        return cls(
            name,
            cfg.vocab_size,
            cfg.dim,
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.mlp_hidden,
            T,
            B,
            cfg.latent_bits if H is None else H,
            cfg.encoder_layers,
        )


def costs(s: Shape) -> dict[str, float]:
    """Training-step FLOPs of each part (forward + backward)."""
    hd = s.dim // s.n_heads
    q, kv = s.n_heads * hd, s.n_kv_heads * hd
    block_mm = 2 * (
        s.dim * q + 2 * s.dim * kv + q * s.dim + 2 * s.dim * s.hidden + s.hidden * s.dim
    )  # per token, forward
    attn_full = 4 * s.T * q  # per token, forward, non-causal
    N = s.N
    base = 3 * N * (s.n_layers * (block_mm + attn_full / 2) + 2 * s.dim * s.vocab)
    encoder = 3 * N * s.encoder_layers * (block_mm + attn_full) + 3 * N * 2 * s.dim * s.H
    mapper = 2 * N * (1 << s.H) * s.dim
    return dict(base=base, encoder=encoder, mapper=mapper, ft=base + encoder + mapper)


def ratio(s: Shape) -> float:
    c = costs(s)
    return c["ft"] / c["base"]


def dense_mapper_ratio(s: Shape) -> float:
    """Same, for a dense mapper: forward (Y+G−sg G) @ W plus two backward GEMMs (3× ours),
    plus building G from the logits (2·N·2^H·2H FLOPs forward, twice that backward)."""
    c = costs(s)
    dense = 3 * 2 * s.N * (1 << s.H) * s.dim + 3 * 2 * s.N * (1 << s.H) * 2 * s.H
    return (c["base"] + c["encoder"] + dense) / c["base"]


def shapes() -> list[Shape]:
    from freeformer import ModelConfig

    out = []
    for H in (8, 16):
        for name, cfg, T, B in bench_train_shapes(H):
            out.append(Shape.from_config(name, cfg, T, B, H))
    for preset, T in (("paper-1.5b", 4096), ("paper-8b", 4096)):
        cfg = ModelConfig.preset(preset)
        for H in (8, 16):
            out.append(Shape.from_config(preset, cfg, T, 1, H))
    return out


def bench_train_shapes(H: int):
    """The CPU shapes of bench_train.py (name, ModelConfig, T, B); kept here so both agree."""
    from freeformer import ModelConfig

    return [
        ("debug", ModelConfig.preset("debug", latent_bits=H), 128, 8),
        (
            "d128-L4",
            ModelConfig(
                vocab_size=256,
                dim=128,
                n_layers=4,
                n_heads=4,
                n_kv_heads=2,
                max_seq_len=256,
                latent_bits=H,
            ),
            256,
            4,
        ),
        (
            "d256-L8",
            ModelConfig(
                vocab_size=256,
                dim=256,
                n_layers=8,
                n_heads=8,
                n_kv_heads=4,
                max_seq_len=256,
                latent_bits=H,
            ),
            256,
            4,
        ),
        (
            "d512-L8",
            ModelConfig(
                vocab_size=256,
                dim=512,
                n_layers=8,
                n_heads=8,
                n_kv_heads=4,
                max_seq_len=512,
                latent_bits=H,
            ),
            512,
            4,
        ),
    ]


def table(measured: dict | None) -> str:
    rows, sources = [], []
    for s in shapes():
        c, m = costs(s), (measured or {}).get(f"{s.name}/H{s.H}")
        meas = cal = "—"
        if m:
            meas = f"{m['ratio']:.2f} ({m['ratio'] / ratio(s) - 1:+.0%})"
            if "calibrated" in m:
                cal = f"{m['calibrated']:.2f} ({m['ratio'] / m['calibrated'] - 1:+.0%})"
            if m.get("command") and m["command"] not in sources:
                sources.append(m["command"])
        rows.append(
            [
                s.name,
                s.H,
                f"{s.dim}/{s.n_layers}/{s.n_heads}:{s.n_kv_heads}",
                f"{s.B}×{s.T}",
                f"{c['base'] / s.N / 1e6:,.1f}",
                f"{c['encoder'] / c['base']:.1%}",
                f"{c['mapper'] / c['base']:.1%}",
                f"{ratio(s):.3f}",
                meas,
                cal,
                f"{dense_mapper_ratio(s):.2f}",
            ]
        )
    out = C.md_table(
        [
            "shape",
            "H",
            "D/L/heads:kv",
            "B×T",
            "baseline MFLOP/token",
            "encoder / base",
            "mapper bwd / base",
            "FT / base (theory)",
            "FT / base (measured, vs theory)",
            "theory at measured rates (measured vs it)",
            "dense-mapper FT / base (theory)",
        ],
        rows,
    )
    if sources:
        out += (
            "\n\nMeasured ratios from: "
            + "; ".join(f"`{c}`" for c in sources)
            + " (1 thread, FP32; see the training section)."
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument(
        "--measured",
        type=Path,
        default=MEASURED,
        help=f"measured ratios written by bench_train.py --write (default {MEASURED.name})",
    )
    ap.add_argument(
        "--write", action="store_true", help="update the theory section of bench/RESULTS.md"
    )
    ap.add_argument("--json", action="store_true", help="print the per-shape costs as JSON")
    args = ap.parse_args(argv)
    if args.json:
        print(
            json.dumps([{**asdict(s), **costs(s), "ratio": ratio(s)} for s in shapes()], indent=1)
        )
        return 0
    measured = json.loads(args.measured.read_text()) if args.measured.exists() else None
    body = "\n\n".join(
        [
            "## Theoretical FT / baseline training cost (`bench/theory.py`)",
            f"Command: `python {' '.join(sys.argv)}`. Matmul FLOPs of forward + backward; the "
            "formulas are in the script's docstring. Measured ratios (CPU, from "
            "`bench/bench_train.py --write`) beside the theory where measured; paper shapes at "
            "T = 4096 (tokens per sequence; the ratio does not depend on B). *Theory at measured "
            "rates*: the same cost model with this CPU's achieved rates — the encoder at the "
            "baseline step's FLOP rate, the mapper at the rate of its own GEMMs timed in the same "
            "rounds (see the training section).",
            table(measured),
            "Reading: at the paper's shapes the FT costs 5–6 % more per step at H = 16 (one extra "
            "block ≈ 1/L, plus a mapper backward of 2·2^H·D FLOPs per token, about an LM head's "
            "worth); at the small CPU shapes the mapper backward dominates, because 2^H·D per "
            "token is large next to a narrow model (at D = 256, L = 8 it equals ~86 % of the "
            "baseline step). A dense mapper triples that term and adds the N × 2^H memory traffic.",
        ]
    )
    print(body)
    if args.write:
        C.write_section("theory", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
