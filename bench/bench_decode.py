"""Decoding speed: ms per new token of the default ``generate`` (encoder prefill, a fresh
prior code per new token), Free Transformer against its baseline, eager and static (a CUDA
graph replay per token on a GPU), batch 1, greedy; with ``--uncached``, also decoding without
a KV cache (a full forward over the whole, growing sequence per new token).

All variants are timed alternately, in rounds (bench/common.py); each timed call is one whole
decode of ``--new-tokens`` tokens, prefill included. Static and eager greedy tokens are
compared for each model, and so are uncached and eager ones (the FT's uncached run pins the
codes the eager run used, so both compute the same thing): exit 1 if they differ at fp32
(under bf16 a rounding difference can flip a near-tie, so it is reported only).

    python bench/bench_decode.py                                # CPU, d256-L8
    python bench/bench_decode.py --uncached --shapes d128-L4 --new-tokens 512
    python bench/bench_decode.py --device cuda --dtype bf16 --shapes d512-L8,paper-1.5b
"""

from __future__ import annotations

import sys
import time

import common as C
import theory
import torch

from freeformer import FreeTransformer
from freeformer.generate import generate


@torch.no_grad()
def generate_uncached(model, prompt: torch.Tensor, n: int, codes: torch.Tensor | None):
    """Greedy decoding without a cache: one full forward over the sequence per new token."""
    seq = prompt
    for _ in range(n):
        T = seq.shape[1]
        out = model(seq, latents=None if codes is None else codes[:, :T], last_logits_only=True)
        seq = torch.cat([seq, out.logits[:, -1].argmax(-1)[:, None]], dim=1)
    return seq


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and cache")
    ap.add_argument("--shapes", default="d256-L8", help="comma-separated shape names")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--bits", type=int, default=16, help="latent bits H")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--uncached", action="store_true", help="also time decoding without a cache")
    ap.add_argument("--section", default=None, help="write this section of bench/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    machine = C.machine_line(dev)
    n = args.new_tokens
    rows, mismatch = [], False
    for name in args.shapes.split(","):
        cfg = theory.bench_shape(name, args.bits)[0].replace(max_seq_len=args.prompt + n)
        fns, tokens, models = {}, {}, {}
        for latent in (True, False):
            tag = "FT" if latent else "base"
            m = FreeTransformer(cfg.replace(latent=latent), seed=0).to(dev, dtype).eval()
            models[tag] = m
            g = torch.Generator(dev).manual_seed(1)
            p = torch.randint(0, cfg.vocab_size, (1, args.prompt), device=dev, generator=g)
            for static in (False, True):
                key = f"{tag} {'static' if static else 'eager'}"

                def run(m=m, p=p, static=static, key=key, tokens=tokens):
                    g = torch.Generator(dev).manual_seed(0)
                    tokens[key] = generate(
                        m, p, n, temperature=0, generator=g, static=static, return_latents=True
                    )

                fns[key] = run
            if args.uncached:  # the codes of the eager run, which runs first (warm-up)

                def uncached(m=m, p=p, tag=tag, tokens=tokens):
                    codes = tokens[f"{tag} eager"][1]
                    tokens[f"{tag} uncached"] = (generate_uncached(m, p, n, codes), None)

                fns[f"{tag} uncached"] = uncached
        t0 = time.perf_counter()
        tm = C.alternate(fns, args.rounds, device=dev)
        elapsed = time.perf_counter() - t0
        ms = {k: 1000 * tm.median(k) / n for k in fns}

        def same(tag, other, tokens=tokens):
            return bool(torch.equal(tokens[f"{tag} eager"][0], tokens[f"{tag} {other}"][0]))

        def agree(other):
            ok = {tag: same(tag, other) for tag in ("FT", "base")}
            return (
                "yes" if all(ok.values()) else "no: " + ", ".join(k for k, v in ok.items() if not v)
            )

        checks = ["static"] + (["uncached"] if args.uncached else [])
        if dtype == torch.float32 and not all(same(t, o) for t in ("FT", "base") for o in checks):
            mismatch = True
        row = {
            "shape": name,
            "new tokens": n,
            "FT eager (ms/token)": f"{ms['FT eager']:.2f}",
            "base eager (ms/token)": f"{ms['base eager']:.2f}",
            "FT / base eager": f"{tm.ratio('FT eager', 'base eager'):.2f}",
            "FT static (ms/token)": f"{ms['FT static']:.2f}",
            "base static (ms/token)": f"{ms['base static']:.2f}",
            "FT / base static": f"{tm.ratio('FT static', 'base static'):.2f}",
            "base eager / static": f"{tm.ratio('base eager', 'base static'):.1f}",
            "static tokens = eager?": agree("static"),
        }
        if args.uncached:
            row |= {
                "FT uncached (ms/token)": f"{ms['FT uncached']:.2f}",
                "base uncached (ms/token)": f"{ms['base uncached']:.2f}",
                "FT cached speed-up": f"{tm.ratio('FT uncached', 'FT eager'):.1f}×",
                "base cached speed-up": f"{tm.ratio('base uncached', 'base eager'):.1f}×",
                "uncached tokens = eager?": agree("uncached"),
            }
        rows.append(row | {"seconds": f"{elapsed:.0f}"})
        del models
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    graph = "CUDA graph" if dev.type == "cuda" else "no graph on CPU"
    uncached = (
        " Uncached = a full forward over the growing sequence per new token, the FT with the "
        "eager run's codes (so no encoder); cached speed-up = median of per-round ratios of "
        "uncached to eager time."
        if args.uncached
        else ""
    )
    body = "\n".join(
        [
            f"Command: `{C.command_line(sys.argv if argv is None else ['bench/bench_decode.py', *argv])}`  ",
            f"Machine: {machine}  ",
            f"dtype {args.dtype}; batch 1, prompt {args.prompt}, greedy, default generate (encoder "
            f"prefill, prior codes); {args.rounds} alternating rounds, median; static = fixed-shape "
            f"step ({graph}).{uncached}",
            "",
            C.md_table(list(rows[0]), [list(r.values()) for r in rows]),
        ]
    )
    print(f"## Decoding (`bench/bench_decode.py`){': ' + args.section if args.section else ''}")
    print()
    print(body)
    if args.section:
        C.write_section(f"decode-{args.section}", body)
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
