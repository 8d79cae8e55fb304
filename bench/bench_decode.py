"""Decoding speed: ms per new token of the default ``generate`` (encoder prefill, a fresh
prior code per new token), Free Transformer against its baseline, eager and static (a CUDA
graph replay per token on a GPU), batch 1, greedy.

All variants are timed alternately, in rounds (bench/common.py); each timed call is one whole
``generate`` of ``--new-tokens`` tokens, so the prefill (one forward over the prompt) is
included. Static and eager greedy tokens are compared for each model (exit 1 if they differ
at fp32; under bf16 a rounding difference can flip a near-tie, so it is reported only).

    python bench/bench_decode.py                                # CPU, d256-L8
    python bench/bench_decode.py --device cuda --dtype bf16 --shapes d512-L8,paper-1.5b
"""

from __future__ import annotations

import argparse
import sys
import time

import common as C
import theory
import torch

from freeformer import FreeTransformer, ModelConfig
from freeformer.generate import generate


def shape_config(name: str, bits: int) -> ModelConfig:
    if name.startswith("paper-"):
        return ModelConfig.preset(name, latent_bits=bits)
    shapes = {n: c for n, c, _, _ in theory.bench_train_shapes(bits)}
    if name not in shapes:
        raise SystemExit(
            f"bench_decode: unknown shape {name!r}; use one of "
            f"{', '.join(shapes)}, paper-1.5b, paper-8b"
        )
    return shapes[name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and cache dtype"
    )
    ap.add_argument("--shapes", default="d256-L8", help="comma-separated shape names")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--bits", type=int, default=16, help="latent bits H")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--section", default=None, help="write this section of bench/RESULTS.md")
    args = ap.parse_args(argv)
    C.setup_threads(args.threads)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    machine = C.machine_line(dev)
    rows, mismatch = [], False
    for name in args.shapes.split(","):
        cfg = shape_config(name, args.bits).replace(max_seq_len=args.prompt + args.new_tokens)
        fns, tokens = {}, {}
        models = {}
        for latent in (True, False):
            tag = "FT" if latent else "base"
            m = FreeTransformer(cfg.replace(latent=latent), seed=0).to(dev, dtype).eval()
            models[tag] = m
            p = torch.randint(
                0,
                cfg.vocab_size,
                (1, args.prompt),
                device=dev,
                generator=torch.Generator(dev).manual_seed(1),
            )
            for static in (False, True):
                key = f"{tag} {'static' if static else 'eager'}"

                def run(m=m, p=p, static=static, key=key, tokens=tokens):
                    g = torch.Generator(dev).manual_seed(0)
                    tokens[key] = generate(
                        m, p, args.new_tokens, temperature=0, generator=g, static=static
                    )

                fns[key] = run
        t0 = time.perf_counter()
        tm = C.alternate(fns, args.rounds, device=dev)
        elapsed = time.perf_counter() - t0
        ms = {k: 1000 * tm.median(k) / args.new_tokens for k in fns}
        same = {
            tag: bool(torch.equal(tokens[f"{tag} eager"], tokens[f"{tag} static"]))
            for tag in ("FT", "base")
        }
        if dtype == torch.float32 and not all(same.values()):
            mismatch = True
        rows.append(
            [
                name,
                args.new_tokens,
                f"{ms['FT eager']:.2f}",
                f"{ms['base eager']:.2f}",
                f"{tm.ratio('FT eager', 'base eager'):.2f}",
                f"{ms['FT static']:.2f}",
                f"{ms['base static']:.2f}",
                f"{tm.ratio('FT static', 'base static'):.2f}",
                f"{tm.ratio('base eager', 'base static'):.1f}",
                "yes"
                if all(same.values())
                else "no: " + ", ".join(k for k, v in same.items() if not v),
                f"{elapsed:.0f}",
            ]
        )
        del models
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    graph = "CUDA graph" if dev.type == "cuda" else "no graph on CPU"
    body = "\n".join(
        [
            f"Command: `{C.command_line(sys.argv if argv is None else ['bench/bench_decode.py', *argv])}`  ",
            f"Machine: {machine}  ",
            f"dtype {args.dtype}; batch 1, prompt {args.prompt}, greedy, default generate (encoder "
            f"prefill, prior codes); {args.rounds} alternating rounds, median; static = fixed-shape "
            f"step ({graph}).",
            "",
            C.md_table(
                [
                    "shape",
                    "new tokens",
                    "FT eager (ms/token)",
                    "base eager (ms/token)",
                    "FT / base eager",
                    "FT static (ms/token)",
                    "base static (ms/token)",
                    "FT / base static",
                    "base eager / static",
                    "static tokens = eager?",
                    "seconds",
                ],
                rows,
            ),
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
