"""Generation throughput: KV-cached decoding (``freeformer.generate``) against uncached decoding
(a full forward over the whole, growing sequence for every new token), Free Transformer
against its baseline, greedy, batch 1.

Both FT runs use the same pinned latent codes for every position (prompt and new tokens),
so cached and uncached decoding compute the same thing; the script checks that they emit
identical tokens. (The default ``generate`` draws the prompt's codes from the encoder at
prefill — one forward over the prompt, negligible next to 512 decode steps.)

All four runs are timed alternately, in rounds; tokens/s = new tokens / wall time.

    python bench/bench_generate.py              # d256-L8, 512 new tokens (~3 min)
    python bench/bench_generate.py --quick      # d128-L4, 512 new tokens (< 1 min)
    python bench/bench_generate.py --write      # also update bench/RESULTS.md
    python bench/bench_generate.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import sys

import common as C
import theory
import torch

from freeformer import FreeTransformer, ModelConfig
from freeformer.generate import generate
from freeformer.latent import uniform_codes


@torch.no_grad()
def generate_uncached(
    model: FreeTransformer, prompt: torch.Tensor, n: int, latents: torch.Tensor | None
) -> torch.Tensor:
    """Greedy decoding without a cache: one full forward over the sequence per new token."""
    seq = prompt
    for _ in range(n):
        T = seq.shape[1]
        codes = latents[:, :T] if latents is not None else None
        out = model(seq, latents=codes, last_logits_only=True)
        seq = torch.cat([seq, out.logits[:, -1].argmax(-1)[:, None]], dim=1)
    return seq


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--quick", action="store_true", help="d128-L4 shape (< 1 min)")
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument("--shape", default=None, help="debug, d128-L4, d256-L8 (default) or d512-L8")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--bits", type=int, default=16, help="latent bits H")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the uncached pair; the cached runs get max(9, 3×) rounds",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (default 1; see bench/RESULTS.md)"
    )
    ap.add_argument(
        "--section",
        default=None,
        help="name of the RESULTS.md section --write replaces (default from device)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="model (and KV cache) dtype"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    C.setup_threads(args.threads)
    shape = args.shape or ("d128-L4" if args.quick else "d256-L8")
    shapes = {n: cfg for n, cfg, _, _ in theory.bench_train_shapes(args.bits)}
    if shape not in shapes:
        ap.error(f"unknown --shape {shape!r}; choose from {', '.join(shapes)}")
    n, T0 = args.new_tokens, args.prompt
    cfg: ModelConfig = shapes[shape].replace(max_seq_len=T0 + n)

    header = C.machine_line(device)
    print(header, flush=True)
    ft = FreeTransformer(cfg).to(device, dtype).eval()
    base = FreeTransformer(cfg.replace(latent=False)).to(device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, T0), generator=g).to(device)
    codes = uniform_codes((1, T0 + n), cfg.latent_bits, generator=g).to(device)

    out = {}
    cached = {
        "ft-cached": lambda: out.__setitem__(
            "ft-cached", generate(ft, prompt, n, temperature=0, latents=codes)
        ),
        "base-cached": lambda: out.__setitem__(
            "base-cached", generate(base, prompt, n, temperature=0)
        ),
        # What a user gets by default: prompt codes from the encoder, uniform codes after.
        "ft-cached-default": lambda: generate(
            ft, prompt, n, temperature=0, generator=torch.Generator(device=device).manual_seed(1)
        ),
    }
    uncached = {
        "ft-uncached": lambda: out.__setitem__(
            "ft-uncached", generate_uncached(ft, prompt, n, codes)
        ),
        "base-uncached": lambda: out.__setitem__(
            "base-uncached", generate_uncached(base, prompt, n, None)
        ),
    }
    # Cached runs are short, so they get more rounds (their ratio is the one near 1).
    cached_rounds = max(9, 3 * args.rounds)
    tc = C.alternate(cached, cached_rounds, warmup=1, device=device)
    tu = C.alternate(uncached, args.rounds, warmup=1, device=device)
    same_ft = torch.equal(out["ft-cached"], out["ft-uncached"])
    same_base = torch.equal(out["base-cached"], out["base-uncached"])

    rows = []
    for label, c, u, same in (
        ("Free Transformer", "ft-cached", "ft-uncached", same_ft),
        ("baseline", "base-cached", "base-uncached", same_base),
    ):
        speedup = tu.median(u) / tc.median(c)
        rows.append(
            [
                label,
                f"{n / tc.median(c):,.0f}",
                f"{n / tu.median(u):,.1f}",
                f"{speedup:.1f}×",
                "yes" if speedup >= 5 else "no",
                "yes" if same else "NO",
            ]
        )
    rows.append(
        [
            "Free Transformer, default prefill (encoder) and prior codes",
            f"{n / tc.median('ft-cached-default'):,.0f}",
            "",
            "",
            "",
            "",
        ]
    )
    t1 = C.md_table(
        [
            "model",
            "cached (tokens/s)",
            "uncached (tokens/s)",
            "cached speed-up",
            "≥ 5×?",
            "cached = uncached tokens",
        ],
        rows,
    )
    r_c = tc.ratio("base-cached", "ft-cached")  # = FT tokens/s / baseline tokens/s
    r_d = tc.ratio("base-cached", "ft-cached-default")
    r_u = tu.ratio("base-uncached", "ft-uncached")
    lo, hi = tc.ratio_range("base-cached", "ft-cached")
    t2 = C.md_table(
        ["decoding", "FT tokens/s / baseline tokens/s (range over rounds)", "≥ 0.95?"],
        [
            [
                "cached, pinned codes",
                f"{r_c:.3f} ({lo:.3f}–{hi:.3f})",
                "yes" if r_c >= 0.95 else "no",
            ],
            ["cached, default prefill + prior codes", f"{r_d:.3f}", "yes" if r_d >= 0.95 else "no"],
            ["uncached", f"{r_u:.3f}", ""],
        ],
    )
    body = "\n\n".join(
        [
            "## Generation (`bench/bench_generate.py`)"
            + (f": {args.section}" if args.section else ""),
            f"Command: `{C.command_line(sys.argv)}`  \nMachine: {header}  \n"
            f"Shape {shape} (D {cfg.dim}, L {cfg.n_layers}, heads {cfg.n_heads}:{cfg.n_kv_heads}, "
            f"vocab {cfg.vocab_size}, H = {cfg.latent_bits}), {args.dtype}, batch 1, prompt {T0} "
            f"tokens, {n} new tokens, greedy; alternating rounds: {cached_rounds} cached "
            f"(load {tc.load_range()}), {args.rounds} uncached (load {tu.load_range()}).",
            t1,
            t2,
            "Uncached = a full forward over the growing sequence per new token (the FT with the "
            "same pinned codes, so no encoder); speed-up = median uncached time / median cached "
            "time (timed in separate alternations); tokens/s from median times; the FT / "
            "baseline ratios are medians of per-round ratios.",
        ]
    )
    print()
    print(body)
    if args.write:
        C.write_section(
            args.section or ("generate" if args.device == "cpu" else f"generate-{args.device}"),
            body,
        )
        print(f"\nwrote {C.RESULTS}")
    return 0 if same_ft and same_base else 1


if __name__ == "__main__":
    sys.exit(main())
