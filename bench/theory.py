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
softmax, gating, cross-entropy) is not counted: it barely moves the ratio except at toy sizes.

    python bench/theory.py                   # the table, with measured ratios if present
    python bench/theory.py --write           # also update bench/RESULTS.md
"""

from __future__ import annotations

import json
import sys

import common as C

MEASURED = C.BENCH_DIR / "train_results.json"  # written by bench_train.py --write


def costs(cfg, T: int, B: int) -> dict[str, float]:
    """Training-step FLOPs of each part (forward + backward) of a ModelConfig at B × T."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    D, F, H, N = cfg.dim, cfg.mlp_hidden, cfg.latent_bits, B * T
    block_mm = 2 * (D * q + 2 * D * kv + q * D + 2 * D * F + F * D)  # per token, forward
    attn_full = 4 * T * q  # per token, forward, non-causal
    base = 3 * N * (cfg.n_layers * (block_mm + attn_full / 2) + 2 * D * cfg.vocab_size)
    encoder = 3 * N * cfg.encoder_layers * (block_mm + attn_full) + 3 * N * 2 * D * H
    mapper = 2 * N * (1 << H) * D
    return dict(base=base, encoder=encoder, mapper=mapper, ft=base + encoder + mapper)


def ratio(cfg, T: int, B: int) -> float:
    c = costs(cfg, T, B)
    return c["ft"] / c["base"]


def dense_mapper_ratio(cfg, T: int, B: int) -> float:
    """Same, for a dense mapper: forward (Y+G−sg G) @ W plus two backward GEMMs (3× ours),
    plus building G from the logits (2·N·2^H·2H FLOPs forward, twice that backward)."""
    c, N, H = costs(cfg, T, B), B * T, cfg.latent_bits
    dense = 3 * 2 * N * (1 << H) * cfg.dim + 3 * 2 * N * (1 << H) * 2 * H
    return (c["base"] + c["encoder"] + dense) / c["base"]


def calibrated(c: dict[str, float], t) -> float:
    """FT / base at this machine's achieved rates (median over rounds of ``t``, a
    common.Timings with "ours-base" and "mapper-gemm"): the encoder at the baseline step's
    FLOP rate, the mapper backward at the rate of its GEMMs timed in the same round."""
    preds = (
        1 + c["encoder"] / c["base"] + g / b
        for g, b in zip(t.times["mapper-gemm"], t.times["ours-base"])
    )
    return sorted(preds)[len(t.loads) // 2]


CPU_SHAPES = ("debug", "d128-L4", "d256-L8", "d512-L8")  # bench_train.py's
PAPER_SHAPES = ("paper-1.5b", "paper-8b")


def bench_shape(name: str, H: int):
    """(ModelConfig, T, B) of a benchmark shape: one of CPU_SHAPES (vocab 256 but debug, the
    preset) or a paper preset at T = 4096, B = 1. Kept here so every script agrees."""
    from freeformer import ModelConfig

    if name in ("debug", *PAPER_SHAPES):
        T, B = (128, 8) if name == "debug" else (4096, 1)
        return ModelConfig.preset(name, latent_bits=H), T, B
    dims = {
        "d128-L4": (128, 4, 4, 2, 256),
        "d256-L8": (256, 8, 8, 4, 256),
        "d512-L8": (512, 8, 8, 4, 512),
    }
    if name not in dims:
        raise SystemExit(
            f"unknown shape {name!r}; choose from {', '.join(CPU_SHAPES + PAPER_SHAPES)}"
        )
    dim, L, heads, kv, T = dims[name]
    kw = dict(dim=dim, n_layers=L, n_heads=heads, n_kv_heads=kv, max_seq_len=T)
    return ModelConfig(vocab_size=256, latent_bits=H, **kw), T, 4


def shapes():
    """The table's rows (name, ModelConfig, T, B): the CPU shapes, then the paper's."""
    cpu = [(n, *bench_shape(n, H)) for H in (8, 16) for n in CPU_SHAPES]
    return cpu + [(p, *bench_shape(p, H)) for p in PAPER_SHAPES for H in (8, 16)]


def table(measured: dict | None) -> str:
    rows, sources = [], []
    for name, cfg, T, B in shapes():
        c, r, H = costs(cfg, T, B), ratio(cfg, T, B), cfg.latent_bits
        m = (measured or {}).get(f"{name}/H{H}")
        meas = cal = "—"
        if m:
            meas = f"{m['ratio']:.2f} ({m['ratio'] / r - 1:+.0%})"
            if "calibrated" in m:
                cal = f"{m['calibrated']:.2f} ({m['ratio'] / m['calibrated'] - 1:+.0%})"
            if m.get("command") and m["command"] not in sources:
                sources.append(m["command"])
        rows.append(
            [
                name,
                H,
                f"{cfg.dim}/{cfg.n_layers}/{cfg.n_heads}:{cfg.n_kv_heads}",
                f"{B}×{T}",
                f"{c['base'] / (B * T) / 1e6:,.1f}",
                f"{c['encoder'] / c['base']:.1%}",
                f"{c['mapper'] / c['base']:.1%}",
                f"{r:.3f}",
                meas,
                cal,
                f"{dense_mapper_ratio(cfg, T, B):.2f}",
            ]
        )
    out = C.md_table(
        "shape|H|D/L/heads:kv|B×T|baseline MFLOP/token|encoder / base|mapper bwd / base|"
        "FT / base (theory)|FT / base (measured, vs theory)|"
        "theory at measured rates (measured vs it)|dense-mapper FT / base (theory)",
        rows,
    )
    if sources:
        out += "\n\nMeasured ratios from: " + "; ".join(f"`{c}`" for c in sources)
        out += " (1 thread, FP32; see the training section)."
    return out


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = ap.parse_args(argv)
    measured = json.loads(MEASURED.read_text()) if MEASURED.exists() else None
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
