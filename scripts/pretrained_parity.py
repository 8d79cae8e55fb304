"""Converted model vs transformers on the same GGUF: max |Δlogits| per prompt and greedy
continuations, for the converted baseline and the converted Free Transformer at step 0
(encoder codes, prior codes); figures for docs/pretrained.md.

    python scripts/pretrained_parity.py SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2-base \\
        runs/smollm2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("base_run", type=Path, help="convert --baseline of the GGUF")
    ap.add_argument("ft_run", type=Path, help="convert (Free Transformer) of the GGUF")
    ap.add_argument("--new-tokens", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    from freeformer.checkpoint import load_model, load_run_tokenizer
    from freeformer.generate import generate

    g = args.gguf.resolve()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(g.parent), gguf_file=g.name, dtype=torch.float32
    ).eval()
    src_tok = transformers.AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    base, ck = load_model(args.base_run)
    ft, _ = load_model(args.ft_run)
    tok = load_run_tokenizer(ck)
    chat = src_tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompts = {"plain": "The capital of France is", "code": "def fibonacci(n):\n    ", "chat": chat}
    print(
        "| prompt | tokens | ids = transformers' | max abs logit (transformers) | "
        "max abs Δ baseline | max abs Δ FT, encoder codes | max abs Δ FT, prior codes | "
        "greedy (30 tokens) equal: baseline / FT |"
    )
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    conts = {}
    for name, text in prompts.items():
        ids = tok.encode_prompt(text)
        same_ids = ids == src_tok(text)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            ref = hf(x).logits.float()
            d_base = float((base(x).logits - ref).abs().max())
            d_enc = float((ft(x, generator=gen).logits - ref).abs().max())
            d_pri = float((ft(x, latents="prior", generator=gen).logits - ref).abs().max())
            want = hf.generate(
                x, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_id
            )
            got_b = generate(base, x, args.new_tokens, temperature=0, eos_id=tok.eos_id)
            got_f = generate(
                ft, x, args.new_tokens, temperature=0, eos_id=tok.eos_id, generator=gen
            )
        n = want.shape[1]
        eq_b = got_b[:, :n].tolist() == want.tolist()
        eq_f = got_f[:, :n].tolist() == want.tolist()
        conts[name] = tok.decode(want[0, len(ids) :].tolist())
        print(
            f"| {name} | {len(ids)} | {same_ids} | {float(ref.abs().max()):.1f} | "
            f"{d_base:.1e} | {d_enc:.1e} | {d_pri:.1e} | {eq_b} / {eq_f} |"
        )
    for name, c in conts.items():
        print(f"{name}: {c!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
