"""Benchmark deltas between a baseline and Free Transformers, in the layout of the paper's tables.

``freeformer compare BASE.json FT.json [FT2.json ...]`` reads lm-eval results files and prints
one Markdown table: rows grouped as in the paper, a column with the baseline's value and, per
other model, its value with the relative change versus the baseline, e.g. ``0.085 (+54.5%)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from freeformer.errors import UserError
from freeformer.evaluation.tasks import GROUPS, TASKS, TaskSpec

Results = tuple[str, dict[str, float]]
MISSING = "—"


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _task_value(entry, spec: TaskSpec) -> float | None:
    if not isinstance(entry, dict):
        return _number(entry)
    for key in (spec.metric, spec.metric_name):
        if key in entry:
            return _number(entry[key])
    return None


def _read(p: Path) -> dict:
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"results file {p} not found; pass JSON files written by `freeformer eval`"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read results file {p}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"results file {p} is not valid JSON ({exc.msg} at line {exc.lineno}); "
            "pass the file written by `freeformer eval`"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UserError(
            f'results file {p} has no "results" object; expected lm-eval\'s output '
            '(or {"model": NAME, "results": {TASK: {METRIC: VALUE}}})'
        )
    return data


def _parse(data: dict, p: Path, tasks: Sequence[TaskSpec]) -> Results:
    entries = {
        **(data.get("groups") if isinstance(data.get("groups"), dict) else {}),
        **data["results"],
    }
    values = {}
    for spec in tasks:
        if spec.task in entries:
            value = _task_value(entries[spec.task], spec)
            if value is not None:
                values[spec.task] = value
    name = next(
        (data[k] for k in ("model", "model_name") if isinstance(data.get(k), str) and data[k]),
        p.stem,
    )
    return name, values


def load_results(path: str | Path, tasks: Sequence[TaskSpec] = TASKS) -> Results:
    """Read a results JSON into ``(model name, {task: value})`` for the registry tasks it has.

    Accepts what ``lm_eval.simple_evaluate`` returns (``"results"`` -> task -> ``{"acc,none":
    ...}``; group entries such as ``mmlu`` are read from ``"results"`` or ``"groups"``), or the
    simpler ``{"model": name, "results": {task: {metric: value}}}`` where metric keys may omit
    the ``,filter`` suffix and a task may map straight to a number. The value read per task is
    its :attr:`TaskSpec.metric`. The name is ``"model"`` or ``"model_name"`` when present as a
    string, else the file's stem.
    """
    p = Path(path)
    return _parse(_read(p), p, tasks)


_UNKNOWN = object()


def _limit(data: dict):
    """lm-eval's ``--limit`` as recorded in ``config.limit`` (None: every document), or
    ``_UNKNOWN`` for a file that does not record it (the simpler hand-written format)."""
    config = data.get("config")
    return config["limit"] if isinstance(config, dict) and "limit" in config else _UNKNOWN


def _relative(value: float, base: float) -> str:
    if base == 0:
        return "+0.0%" if value == 0 else "n/a"
    rel = (value - base) / abs(base) * 100.0 + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{rel:+.1f}%"


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def compare_table(
    base: Results, others: Sequence[Results], tasks: Sequence[TaskSpec] = TASKS
) -> str:
    """Markdown table of ``others`` versus ``base``, rows grouped and ordered as in the paper.

    Tasks absent from every input are left out (so are empty groups); a missing value is
    ``—``; the change is relative to the baseline, ``n/a`` when the baseline is 0 and the
    other value is not.
    """
    models = [base, *others]
    names = _unique_names([name for name, _ in models])
    header = ["Task", f"{names[0]} (baseline)", *names[1:]]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *["---:"] * len(models)]) + "|",
    ]
    base_values = base[1]
    order = list(GROUPS) + sorted({t.group for t in tasks} - set(GROUPS))
    for group in order:
        rows = []
        for spec in (t for t in tasks if t.group == group):
            if not any(spec.task in values for _, values in models):
                continue
            b = base_values.get(spec.task)
            cells = [f"{b:.3f}" if b is not None else MISSING]
            for _, values in others:
                v = values.get(spec.task)
                if v is None:
                    cells.append(MISSING)
                elif b is None:
                    cells.append(f"{v:.3f}")
                else:
                    cells.append(f"{v:.3f} ({_relative(v, b)})")
            rows.append(f"| {spec.label} ({spec.metric_name}) | " + " | ".join(cells) + " |")
        if rows:
            lines.append(f"| **{group}** |" + " |" * len(models))
            lines.extend(rows)
    return "\n".join(lines) + "\n"


def compare_files(paths: Sequence[str | Path], tasks: Sequence[TaskSpec] = TASKS) -> str:
    """``compare_table`` over results files: the first is the baseline. Files scored with
    different ``--limit`` values (lm-eval's ``config.limit``) are refused."""
    if len(paths) < 2:
        raise UserError("compare needs a baseline results file and at least one more to compare")
    files = [(Path(p), _read(Path(p))) for p in paths]
    # Scores over the first N documents and over all of them (or another N) are different
    # samples of a task: their difference is not the models'. Files without the record pass.
    limits = [(p, _limit(d)) for p, d in files if _limit(d) is not _UNKNOWN]
    if any(lim != limits[0][1] for _, lim in limits):
        each = "; ".join(
            f"{p}: " + ("no --limit" if lim is None else f"--limit {lim}") for p, lim in limits
        )
        raise UserError(
            f"results scored on different documents ({each}); "
            "run `freeformer eval` with the same --limit for every model"
        )
    base, *others = (_parse(d, p, tasks) for p, d in files)
    return compare_table(base, others, tasks)
