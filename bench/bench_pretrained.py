"""Training step of a converted pretrained model: our baseline against transformers'
``LlamaForCausalLM`` on the same weights and batch, and our Free Transformer's overhead over
our baseline at that shape against the FLOP theory (bench/theory.py).

The models: ``hf``, transformers' LlamaForCausalLM loaded from the GGUF file (SDPA, float32);
``ours-base``, the GGUF converted by `freeformer convert --baseline` (the same function: max
|Δlogits| against hf is checked on the benchmark batch first); ``ours-ft``, converted without
--baseline (latent path added). A step is forward + loss + backward, gradients dropped in
between. The mapper's GEMMs are timed in the same rounds, for the theory at measured rates.

    freeformer convert SmolLM2-135M-Instruct.Q4_1.gguf --baseline --out runs/smollm2-base
    freeformer convert SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
    python bench/bench_pretrained.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --base-run runs/smollm2-base --ft-run runs/smollm2 --write
"""

from __future__ import annotations

import sys
from pathlib import Path

import common as C
import theory
import torch
import torch.nn.functional as F
from bench_train import Runner, mapper_gemm

from freeformer.checkpoint import load_model


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--gguf", type=Path, required=True, help="the source GGUF file")
    ap.add_argument("--base-run", type=Path, required=True, help="`convert --baseline` run dir")
    ap.add_argument("--ft-run", type=Path, help="`freeformer convert` (FT) run dir of that file")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument("--section", default=None, help="RESULTS.md section name suffix")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    header = C.machine_line(device)
    print(header, flush=True)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(args.gguf.parent),
        gguf_file=args.gguf.name,
        dtype=torch.float32,
        attn_implementation="sdpa",
    )
    models = {"hf": hf.to(device).train(), "ours-base": load_model(args.base_run, device)[0]}
    if args.ft_run is not None:
        models["ours-ft"] = load_model(args.ft_run, device)[0]
    cfg = models["ours-base"].config
    B, T = args.batch, args.seq
    seq = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    inp, tgt = seq[:, :-1].to(device), seq[:, 1:].to(device)

    # The same function first: a speed comparison of two different models would mean nothing.
    with torch.no_grad():
        ref = hf(input_ids=inp, use_cache=False).logits.float()
        d = {}
        for n, m in list(models.items())[1:]:
            g = torch.Generator(device=device).manual_seed(1)
            kw = dict(latents="prior", generator=g) if n == "ours-ft" else {}
            d[n] = float((m(inp, **kw).logits.float() - ref).abs().max())
    print(f"max |Δlogits| vs transformers on the benchmark batch: {d}", flush=True)

    gen = torch.Generator(device=device).manual_seed(0)

    def loss(name, m):
        if name == "hf":
            logits = m(input_ids=inp, use_cache=False).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
        return m(inp, tgt, generator=gen).loss

    runners = {}
    for name, m in models.items():
        runners[name] = Runner(m.train(), lambda name=name, m=m: loss(name, m))
    fns = {n: r.step for n, r in runners.items()}
    ft_cfg = models.get("ours-ft", models["ours-base"]).config
    H = ft_cfg.latent_bits
    if "ours-ft" in models:
        fns["mapper-gemm"] = mapper_gemm(ft_cfg, B * T, device)
    print(f"timing {', '.join(fns)}: {args.rounds} rounds", flush=True)
    before = {n: r.zero for n, r in runners.items()}
    t = C.alternate(fns, args.rounds, warmup=1, before=before, device=device)
    costs = theory.costs(ft_cfg, T, B)

    def row(label, a, b, note=""):
        return [label, f"{t.ratio(a, b):.3f}", "{:.3f}–{:.3f}".format(*t.ratio_range(a, b)), note]

    rows = [row("ours baseline / transformers", "ours-base", "hf", "≤ 1 (target)")]
    if "ours-ft" in models:
        meas, th = t.ratio("ours-ft", "ours-base"), theory.ratio(ft_cfg, T, B)
        pred = theory.calibrated(costs, t)
        note = f"theory {th:.3f} (measured {meas / th - 1:+.0%}); "
        note += f"at measured rates {pred:.3f} ({meas / pred - 1:+.0%})"
        rows += [
            row("ours FT / ours baseline", "ours-ft", "ours-base", note),
            row("transformers / ours FT", "hf", "ours-ft"),
        ]
    times = [[n, C.fmt_s(t.median(n)), ", ".join(f"{x:.2f}" for x in t.times[n])] for n in fns]
    body = "\n\n".join(
        [
            "## Converted pretrained model: training step (`bench/bench_pretrained.py`)"
            + (f": {args.section}" if args.section else ""),
            f"Command: `{C.command_line(sys.argv)}`  \nMachine: {header}  \n"
            f"Model: {args.gguf.name} (D {cfg.dim}, L {cfg.n_layers}, heads {cfg.n_heads}:"
            f"{cfg.n_kv_heads}, SwiGLU {cfg.mlp_hidden}, vocab {cfg.vocab_size}, tied "
            f"{cfg.tie_embeddings}); batch {B}×{T}; float32; forward + loss + backward; load "
            f"{t.load_range()}. Same function checked first: max |Δlogits| against transformers "
            "(FT under prior codes): " + ", ".join(f"{n} {v:.1e}" for n, v in d.items()) + ".",
            C.md_table(["model", "median step (s)", "per round (s)"], times),
            C.md_table(["ratio", "median of per-round ratios", "range", "compare with"], rows),
            f"Theory (`bench/theory.py`, H = {H}): baseline {costs['base'] / 1e9:,.0f} GFLOP per "
            f"step, encoder block +{costs['encoder'] / costs['base']:.1%}, mapper backward "
            f"+{costs['mapper'] / costs['base']:.1%}. *At measured rates*: 1 + encoder/base + "
            "(mapper GEMM time, same round) / (baseline step time).",
        ]
    )
    print()
    print(body)
    if args.write:
        C.write_section("pretrained" + (f"-{args.section}" if args.section else ""), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
