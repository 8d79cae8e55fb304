"""Cost of the executor's namespace sandbox per program, against the fallback and the executor
of an earlier revision (default: the one before the sandbox).

Each round runs N trivial programs (``assert 1 + 1 == 2``) one after the other, as
``freeformer eval`` scores one HumanEval completion per document, in each mode; modes
alternate in rotating order (bench/common.py) and are compared by the median of per-round
ratios. ``before`` is ``src/freeformer/evaluation/executor.py`` at ``--before`` (git show),
i.e. the executor without namespaces and without the fallback's disabled calls.

    PYTHONPATH=src python bench/bench_sandbox.py               # 3 rounds of 100: ~2 min
    PYTHONPATH=src python bench/bench_sandbox.py --write       # also update bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings

import common as C
import torch

from freeformer.evaluation import executor

PROGRAM = "assert 1 + 1 == 2\n"


def _load_before(rev: str):
    src = subprocess.run(
        ["git", "-C", str(C.REPO), "show", f"{rev}:src/freeformer/evaluation/executor.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = os.path.join(tempfile.mkdtemp(prefix="bench-sandbox-"), "executor_before.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("executor_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _batch(module, n: int, setting: str | None):
    def run():
        if setting is not None:
            os.environ[executor.SANDBOX_ENV_VAR] = setting
        results = module.run_programs([PROGRAM] * n, allow_code_execution=True, workers=1)
        assert all(r.passed for r in results), results[0]

    return run


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="programs per round (default 100)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", default="581d261", help="git revision of the old executor")
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if executor.sandbox_unavailable_reason() is not None:
        sys.exit(f"bench_sandbox: no sandbox here: {executor.sandbox_unavailable_reason()}")
    fns = {
        "sandbox": _batch(executor, args.n, "require"),
        "fallback": _batch(executor, args.n, "off"),
        "before": _batch(_load_before(args.before), args.n, None),
    }
    t = C.alternate(fns, args.rounds, warmup=0)
    rows = [[name, C.fmt_ms(t.median(name) / args.n)] for name in fns]
    ratio_b, ratio_f = t.ratio("sandbox", "before"), t.ratio("sandbox", "fallback")
    lo, hi = t.ratio_range("sandbox", "before")
    body = "\n".join([
        "## Code execution: cost of the namespace sandbox (`bench/bench_sandbox.py`)",
        "",
        f"Command: `{C.command_line(['bench/bench_sandbox.py', *argv])}` "
        f"({args.rounds} alternating rounds of {args.n} trivial programs, one at a time).",
        f"Machine: {C.machine_line(torch.device('cpu'))}; load {t.load_range()} during rounds.",
        "",
        C.md_table(["executor", "ms per program (median round)"], rows),
        "",
        f"sandbox / before (executor at {args.before}): **{ratio_b:.2f}×** (rounds {lo:.2f}–"
        f"{hi:.2f}); sandbox / fallback: {ratio_f:.2f}×.",
    ])  # fmt: skip
    print(body)
    if args.write:
        C.write_section("bench_sandbox", body)


if __name__ == "__main__":
    main(sys.argv[1:])
