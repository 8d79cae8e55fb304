"""The ``freeformer`` command: subcommands mapped onto library functions.

User mistakes (:class:`freeformer.errors.UserError`) print one line to stderr and exit 2;
set FREEFORMER_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from freeformer.errors import UserError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a Free Transformer or a baseline",
        description="Train from a shipped preset or a TOML config, with --section.key=value "
        "overrides (e.g. --train.max_steps=200 --model.free_bits=1/8). Sections: "
        "model, train, data; `freeformer config --preset NAME` prints every key.",
        epilog="Distributed: torchrun --nproc_per_node=N -m freeformer train ... "
        "--train.dist=ddp|fsdp",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset",
        help="shipped config name (debug, synthetic, stdlib-code, "
        "paper-1.5b, paper-8b, paper-8b-1t, smollm2-135m-ft)",
    )
    src.add_argument("--config", help="path to a TOML config")
    p.add_argument("--out", help="run directory (default: runs/<preset or config name>)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint"
    )
    p.add_argument(
        "--init-from",
        metavar="RUN_DIR",
        help="fine-tune: start from the weights of RUN_DIR (or a checkpoint), e.g. "
        "one made by `freeformer convert`; fresh optimizer, schedule and step "
        "count; [model] must equal its config (same as --train.init_from); "
        "--train.trainable=latent trains only the latent path",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_train, overrides=[])  # overrides: --section.key=value (main)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="honest validation metrics of a run or checkpoint",
        description="Prints the model's −log P(S) per token estimated by "
        "importance sampling with k samples (encoder and prior "
        "proposals; upper bounds in expectation, consistent as k "
        "grows), the ELBO, KL bits, CE with prior codes (what "
        "generation does) and CE with encoder codes (sees the "
        "future), and the KL split into information (what the codes say about "
        "the sequence) and prior mismatch; CE for a baseline.",
    )
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: config)")
    p.add_argument("--k", type=int, default=None, help="importance samples (default: config)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="sequences per validation batch (default: config's train.batch_size); "
        "with the same --batches, N and data, two runs see the same windows",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="prepared data directory to validate on (default: the run's data; "
        "needed for a converted model)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of the line: step, tokens, and (Free "
        "Transformer) ce_prior, ce_encoder, kl_bits, information_bits, mismatch_bits, "
        "elbo, nll_is, nll_is_prior, is_samples, or (baseline) ce",
    )
    p.set_defaults(func=cmd_validate)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a run or checkpoint")
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt as a user message in the model's chat template "
        "(converted instruct models)",
    )
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument(
        "--shared-latent",
        action="store_true",
        help="the N samples share one latent sequence, drawn from the uniform prior "
        "for every position, prompt included (paper Fig. 4, green groups)",
    )
    p.add_argument(
        "--prefill",
        choices=["encoder", "prior"],
        default="encoder",
        help="prompt codes from the encoder (paper) or the prior; unused with --shared-latent",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--static",
        action="store_true",
        help="decode at fixed shapes, one CUDA-graph replay per token on a GPU "
        "(fastest at small batches; same tokens up to rounding)",
    )
    p.set_defaults(func=cmd_generate)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize text/JSONL into memmap shards",
        description="Text files, directories and JSONL → uint16/uint32 token "
        "shards with a train/val split and manifest.json.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--tokenizer",
        default="byte",
        help="byte | bpe:VOCAB (trained here) | path/to/tokenizer.json | a "
        "tokenizer directory freeformer wrote (e.g. RUN_DIR/tokenizer of a "
        "converted model: its ids, EOS and specials)",
    )
    p.add_argument(
        "--include",
        action="append",
        default=None,
        help="glob of files to take from directories (repeatable; default *)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=None,
        help="glob to skip (repeatable; default: hidden files and directories)",
    )
    p.add_argument("--jsonl-field", default="text")
    p.add_argument("--val-fraction", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prepare)


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print a resolved run config (every key) as TOML",
        description="Resolve a preset or TOML file plus overrides and print "
        "every [model]/[train]/[data] key with its value.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="shipped config name")
    src.add_argument("--config", help="path to a TOML config")
    p.add_argument("--list", action="store_true", help="list the shipped presets")
    p.set_defaults(func=cmd_config, overrides=[])


def _fraction(text: str) -> float:
    """A float that may be written as a fraction (``1/2``), like --model.free_bits."""
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction, got {text!r}") from None


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="a pretrained Llama / Mistral / Qwen2 / SmolLM model → a run directory",
        description="Convert a Hugging Face model directory (config.json, *.safetensors, "
        "tokenizer.json) or a .gguf file into a run directory that generate, "
        "validate, eval and train --init-from accept. Without --baseline the "
        "latent path is added, initialised so that the model computes exactly the "
        "source's function until it is trained (docs/design.md).",
        epilog="GGUF files need the pretrained-gguf extra: pip install 'freeformer[pretrained-gguf]'",
    )
    p.add_argument("src", metavar="SRC", help="Hugging Face model directory or .gguf file")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="the plain decoder (no latent path): logits equal the source's",
    )
    p.add_argument("--latent-bits", type=int, default=16, metavar="H", help="H (default 16)")
    p.add_argument(
        "--free-bits",
        type=_fraction,
        default=0.5,
        metavar="K",
        help="κ in bits per token (default 1/2)",
    )
    p.add_argument(
        "--inject-layer",
        type=int,
        default=None,
        metavar="I",
        help="0-based block whose keys/values read x + r (default L/2)",
    )
    p.add_argument("--encoder-layers", type=int, default=1, metavar="N", help="default 1")
    p.add_argument(
        "--encoder-window",
        type=int,
        default=0,
        metavar="W",
        help="0: the encoder reads every position (the paper; default); W > 0: position t "
        "reads only t … t+W (opt-in variant for fine-tuning; docs/latent-study.md)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        metavar="N",
        help="longest sequence (default: the source's context, at most 8192, and "
        "at most its sliding window)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the latent path's init")
    p.add_argument(
        "--latent-init",
        default="zero",
        choices=["zero", "residual"],
        help="post-sampler at 0, so the model computes the source's function under any "
        "codes (default), or at the residual stream's scale, for fine-tuning with "
        "train.latent_ramp_steps (docs/latent-study.md)",
    )
    p.add_argument(
        "--latent-init-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="with --latent-init residual: the rows' std as a fraction of the residual "
        "stream's RMS (default 1)",
    )
    p.add_argument(
        "--latent-injection",
        default="kv",
        choices=["kv", "residual"],
        help="kv: r enters the injection block's keys/values (the paper; default); "
        "residual: r joins the residual stream there (opt-in variant that a pretrained "
        "decoder learns to read; docs/latent-study.md)",
    )
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> None:
    from freeformer.pretrained.convert import convert

    out = convert(
        args.src,
        args.out,
        baseline=args.baseline,
        latent_bits=args.latent_bits,
        free_bits=args.free_bits,
        inject_layer=args.inject_layer,
        encoder_layers=args.encoder_layers,
        encoder_window=args.encoder_window,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        latent_init=args.latent_init,
        latent_init_scale=args.latent_init_scale,
        latent_injection=args.latent_injection,
    )
    from freeformer.checkpoint import load_checkpoint

    mc = load_checkpoint(out, verify=False).model_config
    kind = (
        "baseline"
        if not mc.latent
        else (
            f"Free Transformer (H={mc.latent_bits}, κ={mc.free_bits:g} bit, "
            f"injection at block {mc.inject_layer}, {mc.encoder_layers} encoder block(s))"
        )
    )
    print(
        f"wrote {out}: {mc.n_layers} layers, D {mc.dim}, vocab {mc.vocab_size}, "
        f"max_seq_len {mc.max_seq_len}; {kind}"
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="a run → a Hugging Face model directory (transformers, the Hub)",
        description="Write the model of RUN_DIR (its newest checkpoint, or the checkpoints/"
        "step_* directory given) as a Hugging Face directory: a baseline as a "
        "plain LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases), a Free "
        "Transformer with its own configuration and modeling files, loaded with "
        "trust_remote_code=True. `freeformer convert HF_DIR` reads either back "
        "(docs/export.md).",
    )
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="directory to create")
    p.add_argument(
        "--unmerged-lora",
        action="store_true",
        help="a LoRA run: write the weights without the adapters and the adapters "
        "in PEFT's format to HF_DIR/lora (default: adapters merged)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    from freeformer.export import export

    out = export(args.path, args.out, unmerged_lora=args.unmerged_lora)
    import json

    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    remote = ", trust_remote_code=True" if cfg["model_type"] == "freeformer" else ""
    print(
        f"wrote {out}: {cfg['architectures'][0]} (step {cfg['freeformer_export']['step']}); "
        f"load with AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})"
    )
    if not (out / "tokenizer.json").is_file():
        print("no tokenizer files: the run's byte / synthetic vocabulary has no tokenizer.json")


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="overlay CE and KL curves of runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=cmd_plot)


def _add_synthetic(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthetic", help="reproduce the paper's synthetic experiment (Fig. 4)")
    from freeformer.experiments.synthetic import add_arguments

    add_arguments(p)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="benchmark evaluation through lm-evaluation-harness")
    from freeformer.evaluation.cli import add_eval_arguments

    add_eval_arguments(p)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="paper-style table: baseline vs Free Transformers")
    from freeformer.evaluation.cli import add_compare_arguments

    add_compare_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    from freeformer import __version__

    parser = argparse.ArgumentParser(
        prog="freeformer",
        description="The Free Transformer (Fleuret, arXiv 2510.17558): train, generate, "
        "evaluate, reproduce the synthetic experiment.",
    )
    parser.add_argument("--version", action="version", version=f"freeformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (
        _add_train,
        _add_config,
        _add_validate,
        _add_generate,
        _add_prepare,
        _add_convert,
        _add_export,
        _add_plot,
    ):
        add(sub)
    for optional in (_add_synthetic, _add_eval, _add_compare):
        try:
            optional(sub)
        except ImportError:  # a module of a later milestone that is not present
            pass
    return parser


# ---------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    from freeformer.runconfig import RunConfig, build_run_config, load_run_config
    from freeformer.train import train

    overrides = args.overrides
    if args.init_from:
        if args.resume:
            raise UserError(
                "--init-from starts a new run from weights and --resume continues "
                "a run: give one of them"
            )
        overrides = [*overrides, f"train.init_from={args.init_from}"]
    if args.resume:
        if args.preset or args.config:
            raise UserError("--resume takes its config from the run; drop --preset/--config")
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{run_dir} is not a run directory (no config.json)")
        import json

        try:
            saved = json.loads(cfg_path.read_text(encoding="utf-8"))
            saved.pop("version", None)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UserError(f"{cfg_path} is corrupted (not a JSON object)") from None
        base = RunConfig.from_dict(saved)
        cfg = build_run_config(base.to_dict(), overrides)
        train(cfg, run_dir, resume=True, quiet=args.quiet)
        return
    if not args.preset and not args.config:
        raise UserError("give --preset NAME or --config FILE.toml (see `freeformer train -h`)")
    cfg = load_run_config(preset=args.preset, path=args.config, overrides=overrides)
    name = args.preset or Path(args.config).stem
    out = Path(args.out) if args.out else Path("runs") / name
    train(cfg, out, quiet=args.quiet)


def cmd_config(args: argparse.Namespace) -> None:
    from freeformer.runconfig import available_presets, load_run_config

    if args.list:
        print("\n".join(available_presets()))
        return
    cfg = load_run_config(preset=args.preset, path=args.config, overrides=args.overrides)
    for section, values in cfg.to_dict().items():
        print(f"[{section}]")
        for k, v in values.items():
            if v is None:
                continue  # TOML has no null; absent means "derived"
            print(f"{k} = {_toml_value(v)}")
        print()


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_char(c: str) -> str:
    # TOML basic strings forbid raw control characters (a path may hold a tab or newline).
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + "".join(map(_toml_char, v)) + '"'
    return repr(v)


def cmd_validate(args: argparse.Namespace) -> None:

    from freeformer.checkpoint import load_model
    from freeformer.distributed import DistInfo
    from freeformer.runconfig import RunConfig
    from freeformer.runtime import resolve_device
    from freeformer.train import build_data
    from freeformer.validation import evaluate, format_val

    device = resolve_device(args.device)
    model, ck = load_model(args.path, device)
    saved = dict(ck.state["config"])
    cfg = RunConfig.from_dict(saved)
    tc = cfg.train
    n = args.batches or tc.eval_batches
    bs = args.batch_size or tc.batch_size
    if n < 1 or bs < 1 or (args.k is not None and args.k < 1):
        raise UserError("--batches, --batch-size and --k must be ≥ 1")
    import dataclasses

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, eval_batches=n, batch_size=bs))
    if args.data is not None:
        from freeformer.runconfig import DataConfig

        cfg = dataclasses.replace(cfg, data=DataConfig(source="files", path=args.data))
    _, val = build_data(cfg, DistInfo())
    vals = evaluate(
        model,
        val,
        latent=cfg.model.latent,
        n_bits=cfg.model.latent_bits,
        k=args.k or tc.importance_samples,
        seed=tc.seed + 2,
        device=device,
    )
    if args.json:
        import json

        from freeformer.model import IGNORE_INDEX

        tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in val)
        print(json.dumps({"step": ck.step, "tokens": tokens, **vals}))
    else:
        print(format_val(ck.step, vals))


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from freeformer.checkpoint import load_model, load_run_tokenizer
    from freeformer.generate import generate
    from freeformer.runtime import resolve_device

    if args.num_samples < 1:
        raise UserError(f"-n {args.num_samples}: expected at least 1 sample")
    device = resolve_device(args.device)
    model, ck = load_model(args.path, device)
    tok = load_run_tokenizer(ck)
    if args.chat:  # the prompt as one user message, in the source's chat template
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    else:
        ids = tok.encode_prompt(args.prompt)  # BOS first where the source model expects it
    if not ids:
        raise UserError("--prompt is empty after tokenization")
    prompt = torch.tensor(ids, dtype=torch.long, device=device)[None].expand(args.num_samples, -1)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    latents = None
    c = model.config
    if args.shared_latent:
        if not c.latent:
            raise UserError("--shared-latent needs a Free Transformer; this run is a baseline")
        latents = torch.randint(
            0, c.n_codes, (1, prompt.shape[1] + args.max_new_tokens), generator=gen, device=device
        )
    out = generate(
        model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        latents=latents,
        prefill=args.prefill,
        generator=gen,
        eos_id=tok.eos_id,
        static=args.static,
    )
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        if tok.eos_id is not None and tok.eos_id in row[len(ids) :]:
            row = row[: len(ids) + row[len(ids) :].index(tok.eos_id)]
        print(tok.decode(row))


def cmd_prepare(args: argparse.Namespace) -> None:
    from freeformer.data.prepare import prepare

    m = prepare(
        args.sources,
        args.out,
        tokenizer=args.tokenizer,
        include=tuple(args.include or ("*",)),
        exclude=tuple(args.exclude if args.exclude is not None else (".*",)),
        jsonl_field=args.jsonl_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    n_train = sum(s["tokens"] for s in m["train"])
    n_val = sum(s["tokens"] for s in m["val"])
    print(f"wrote {args.out}: {n_train:,} train + {n_val:,} val tokens, vocab {m['vocab_size']}")


def cmd_plot(args: argparse.Namespace) -> None:
    from freeformer.plots import plot_runs

    plot_runs(args.runs, args.out)
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if "overrides" in vars(args):  # train, config: --section.key=value overrides
            overrides, i = [], 0
            while i < len(rest):  # --section.key=value or --section.key value
                a = rest[i]
                if not a.startswith("--") or "." not in a.split("=", 1)[0]:
                    parser.error(
                        f"unrecognized argument {a!r} (overrides look like --section.key=value)"
                    )
                if "=" not in a:
                    if i + 1 >= len(rest):
                        raise UserError(f"override {a} needs a value: {a}=VALUE")
                    a = f"{a}={rest[i + 1]}"
                    i += 1
                overrides.append(a[2:])
                i += 1
            args.overrides = overrides
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.func(args)  # every subcommand sets func (set_defaults)
        return 0
    except UserError as e:
        if os.environ.get("FREEFORMER_DEBUG"):
            raise
        print(f"freeformer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("freeformer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `freeformer ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
