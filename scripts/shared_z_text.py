"""Figure 4 on real text: do continuations that share one Z agree more? (issue #17 item 4)

For each of N prompts cut from a run's held-out windows (each ends a line), samples a group of
G continuations that each read their own prior draw of Z and a group of G that share one, and
prints how alike each group is (first-line agreement, common prefix, token-level similarity,
4-gram Jaccard; `freeformer.experiments.shared_z`), the shared − independent difference with
its standard error over prompts, and example groups. On a baseline run the two groups are
the same distribution: the control. Results: docs/latent-study.md, "What Z encodes on text".

    python scripts/shared_z_text.py RUN_DIR [--prompts 32] [--group-size 8] [--new-tokens 96]
        [--prompt-tokens 128] [--seed 0] [--data DIR] [--json OUT] [--examples 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from freeformer.errors import UserError


def main(argv=None) -> None:
    from freeformer.checkpoint import load_model, load_run_tokenizer
    from freeformer.distributed import DistInfo
    from freeformer.experiments.shared_z import format_summary, line_prompts, shared_z_study
    from freeformer.runconfig import DataConfig, RunConfig
    from freeformer.train import build_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run directory or checkpoint (Free Transformer or baseline)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts (default 32)")
    ap.add_argument("--group-size", type=int, default=8, help="continuations per group (8)")
    ap.add_argument("--new-tokens", type=int, default=96, help="tokens per continuation (96)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length cap (128)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="seeds the codes and the sampling")
    ap.add_argument("--data", help="prepared data to cut prompts from (default: the run's)")
    ap.add_argument("--json", type=Path, help="write the whole result here")
    ap.add_argument("--examples", type=int, default=2, help="example groups to print (2)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if min(args.prompts, args.prompt_tokens, args.threads, args.new_tokens) < 1:
        raise UserError("--prompts, --prompt-tokens, --new-tokens and --threads must be ≥ 1")
    if args.group_size < 2 or args.examples < 0 or args.temperature <= 0:
        raise UserError("--group-size must be ≥ 2, --examples ≥ 0 and --temperature > 0")
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: no directory {args.json.parent}; create it first")
    torch.set_num_threads(args.threads)
    model, ck = load_model(args.run, "cpu")
    tok = load_run_tokenizer(ck)
    cfg = RunConfig.from_dict(dict(ck.state["config"]))
    if args.data is not None:
        cfg = dataclasses.replace(cfg, data=DataConfig(source="files", path=args.data))
    # Enough held-out windows for the prompts, however the run batched them.
    n_batches = -(-2 * args.prompts // cfg.train.batch_size)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batches=n_batches))
    _, val = build_data(cfg, DistInfo())
    rows = (row for x, _ in val for row in x.tolist())
    prompts = line_prompts(rows, tok.decode, args.prompts, args.prompt_tokens)
    result = shared_z_study(
        model,
        tok,
        prompts,
        group_size=args.group_size,
        new_tokens=args.new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        n_examples=args.examples,
    )
    kind = "Free Transformer" if result["latent"] else "baseline (no latent: the control)"
    print(
        f"{args.run}: {kind}, step {ck.step}; {args.prompts} prompts × 2 groups of "
        f"{args.group_size}, {args.new_tokens} new tokens, temperature {args.temperature:g}"
    )
    print(format_summary(result))
    for k, ex in enumerate(result["examples"]):
        print(f"\n=== prompt {k} (last lines)\n" + "\n".join(ex["prompt"].split("\n")[-4:]))
        for name in ("independent", "shared"):
            print(f"--- {name} Z")
            for s in ex[name]:
                print(repr(s[:120]))
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "step": ck.step, **result}))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
