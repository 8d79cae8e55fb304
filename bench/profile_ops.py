"""Operator-level profiles (torch.profiler) behind the figures in bench/RESULTS.md.

    python bench/profile_ops.py mapper                      # backward, N 8192, H 16, D 1024
    python bench/profile_ops.py train --impl ours-ft        # one step, d256-L8, H 16
    python bench/profile_ops.py train --impl xt-ft
    python bench/profile_ops.py generate --shape d128-L4    # 512 cached decode steps, FT and baseline
    python bench/profile_ops.py ... --write                 # also update bench/RESULTS.md

Each prints the top operators by self time, grouped by input shape, after warm-up runs.
"""

from __future__ import annotations

import functools
import sys

import common as C
import theory
import torch
from torch.profiler import ProfilerActivity, profile


def top_ops(fn, rows: int, by_shape: bool) -> str:
    """Markdown table of the ``rows`` operators with the largest self CPU time."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        fn()
    events = list(prof.key_averages(group_by_input_shape=by_shape))
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    out = []
    for e in events[:rows]:
        row = [
            e.key,
            f"{e.self_cpu_time_total / total:.1%}",
            f"{e.self_cpu_time_total / 1e3:.1f} ms",
            e.count,
        ]
        if by_shape:
            row.append(str([list(s) for s in e.input_shapes if s]).replace(" ", ""))
        out.append(row)
    head = ["op", "self CPU %", "self CPU", "calls"] + (["input shapes"] if by_shape else [])
    return C.md_table(head, out) + f"\n\nSelf CPU total: {total / 1e3:.1f} ms"


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("what", choices=["mapper", "train", "generate"])
    ap.add_argument("--impl", default="ours-ft", help="train: an implementation of bench_train.py")
    ap.add_argument("--shape", default=None, help="train/generate shape (default d256-L8)")
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--N", type=int, default=8192, help="mapper: tokens")
    ap.add_argument("--D", type=int, default=1024, help="mapper: width")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--write", action="store_true", help="add/replace this profile in RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    header = C.machine_line(cpu)
    shape = args.shape or "d256-L8"
    outs = []
    if args.what == "mapper":
        from bench_mapper import make_inputs

        from freeformer.latent import binary_mapper

        L, W, dr = make_inputs(args.N, args.bits, args.D, cpu, torch.float32)
        gen = torch.Generator().manual_seed(0)
        torch.autograd.grad(binary_mapper(L, W, gen)[0], (L, W), dr)  # warm-up
        r = binary_mapper(L, W, gen)[0]
        title = f"mapper backward, N {args.N}, H {args.bits}, D {args.D}"
        outs.append((title, top_ops(lambda: torch.autograd.grad(r, (L, W), dr), args.rows, True)))
    elif args.what == "train":
        import bench_train as BT

        cfg, T, B = theory.bench_shape(shape, args.bits)
        amp = functools.partial(torch.autocast, "cpu", enabled=False)
        runner = BT.build(args.impl, cfg, T, B, cpu, amp, False)
        for _ in range(2):  # warm-up
            runner.zero()
            runner.step()
        runner.zero()
        title = f"training step, {BT.LABELS[args.impl]}, {shape}, H {args.bits}"
        outs.append((title, top_ops(runner.step, args.rows, True)))
    else:
        from freeformer import FreeTransformer
        from freeformer.generate import generate
        from freeformer.latent import uniform_codes

        shape = args.shape or "d128-L4"
        cfg = theory.bench_shape(shape, args.bits)[0]
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=g)
        codes = uniform_codes((1, 528), cfg.latent_bits, generator=g)
        for latent in (True, False):
            m = FreeTransformer(cfg.replace(latent=latent, max_seq_len=528)).eval()
            kw = dict(latents=codes) if latent else {}

            def run(m=m, kw=kw):
                return generate(m, prompt, 512, temperature=0, **kw)

            run()  # warm-up
            title = f"512 cached decode steps, {'FT' if latent else 'baseline'}, {shape}"
            outs.append((title, top_ops(run, args.rows, False)))
    body = "\n\n".join(
        f"#### Profile: {t}\n\nCommand: `{C.command_line(sys.argv)}`  \nMachine: {header}\n\n{o}"
        for t, o in outs
    )
    print(body)
    if args.write:
        key = {
            "mapper": f"profile-mapper-N{args.N}-H{args.bits}-D{args.D}",
            "train": f"profile-train-{args.impl}-{shape}-H{args.bits}",
            "generate": f"profile-generate-{shape}",
        }[args.what]
        C.write_section(key, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
