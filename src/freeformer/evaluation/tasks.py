"""The benchmark registry: which lm-eval tasks reproduce the paper's tables, and how to read them.

The paper (Tables 1-3) reports 16 rows in four groups. Each row maps to one lm-eval 0.4.13
task and one key of that task's entry in ``results`` (``"<metric>,<filter>"``). The paper's
own metric names come from Meta's internal harness; lm-eval's closest equivalents are:

* ``pass@1`` -> ``pass@1,create_test`` (HumanEval+) / ``pass_at_1,none`` (MBPP), both scored
  by :mod:`freeformer.evaluation.executor` through the YAMLs in ``task_yamls/``.
* ``em`` -> ``exact_match,strict-match`` (GSM8K: the ``#### N`` answer) and
  ``exact_match,remove_whitespace`` (NQ, TriviaQA).
* ``acc_char`` (log-likelihood normalised by the completion's characters) -> ``acc_norm,none``
  (normalised by bytes) where the task reports it; MMLU, CSQA, WinoGrande and RACE only
  report ``acc,none`` (MMLU and CSQA are letter-choice prompts, WinoGrande scores one shared
  continuation, so normalisation would not change them).
* ``acc_completion`` (OBQA, ARC, BoolQ) -> ``acc_norm,none`` for OBQA/ARC, ``acc,none`` for
  BoolQ (lm-eval's only metric there).
* ``macro_avg/acc_char`` (MMLU) -> lm-eval's ``mmlu`` group ``acc,none``, which is the average
  weighted by subject size, not the macro average over subjects.

So values are comparable between two models evaluated here, not digit-for-digit with the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from freeformer.errors import UserError

GROUPS = (
    "Generative code/math",
    "Multi-choice general knowledge / common sense",
    "Multi-choice text understanding",
    "Culture",
)


@dataclass(frozen=True)
class TaskSpec:
    """One row of the paper's benchmark tables."""

    task: str
    """lm-eval task (or group) name."""
    label: str
    """Row name as printed in the paper's tables."""
    group: str
    """Row group, one of :data:`GROUPS`."""
    metric: str
    """Key in lm-eval's ``results[task]``: ``"<metric>,<filter>"``."""
    paper_metric: str
    """The metric the paper reports for the row (its own harness's name)."""
    paper: bool = True
    """False for rows we add that the paper does not have (offline substitutes)."""

    @property
    def metric_name(self) -> str:
        """The metric without its filter, e.g. ``"acc_norm"``."""
        return self.metric.split(",", 1)[0]


_CODE, _KNOW, _TEXT, _CULT = GROUPS

# In the order of the paper's tables.
TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("humaneval_plus", "human_eval_plus", _CODE, "pass@1,create_test", "pass@1"),
    # HumanEval with its original (fewer) tests: the offline substitute for HumanEval+, whose
    # extra tests are only on the hub. Not a paper row.
    TaskSpec("humaneval", "human_eval", _CODE, "pass@1,create_test", "pass@1", paper=False),
    TaskSpec("mbpp", "mbpp", _CODE, "pass_at_1,none", "pass@1"),
    TaskSpec("gsm8k", "gsm8k", _CODE, "exact_match,strict-match", "em"),
    TaskSpec("mmlu", "mmlu", _KNOW, "acc,none", "macro_avg/acc_char"),
    TaskSpec("commonsense_qa", "csqa", _KNOW, "acc,none", "acc_char"),
    TaskSpec("hellaswag", "hellaswag", _KNOW, "acc_norm,none", "acc_char"),
    TaskSpec("winogrande", "winogrande", _KNOW, "acc,none", "acc_char"),
    TaskSpec("openbookqa", "obqa", _KNOW, "acc_norm,none", "acc_completion"),
    TaskSpec("arc_challenge", "arc_challenge", _KNOW, "acc_norm,none", "acc_completion"),
    TaskSpec("arc_easy", "arc_easy", _KNOW, "acc_norm,none", "acc_completion"),
    TaskSpec("piqa", "piqa", _KNOW, "acc_norm,none", "acc_char"),
    TaskSpec("race", "race.high", _TEXT, "acc,none", "acc_char"),
    TaskSpec("race_middle", "race.middle", _TEXT, "acc,none", "acc_char"),
    TaskSpec("boolq", "boolq", _TEXT, "acc,none", "acc_completion"),
    TaskSpec("nq_open", "nq", _CULT, "exact_match,remove_whitespace", "em"),
    TaskSpec("triviaqa", "tqa", _CULT, "exact_match,remove_whitespace", "em"),
)

PAPER_TASKS: tuple[TaskSpec, ...] = tuple(t for t in TASKS if t.paper)
"""The paper's 16 rows, in its order."""

TASKS_BY_NAME: dict[str, TaskSpec] = {t.task: t for t in TASKS}


def resolve_tasks(spec: str, extra_known: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Turn ``"paper"`` or a comma list (which may contain ``paper``) into lm-eval task names.

    Names must be registry tasks or appear in ``extra_known`` (e.g. the tasks of an
    ``--include-path``, ``TaskManager(include_path=...).all_tasks``). Order is kept, duplicates
    dropped.
    """
    known = {t.task for t in TASKS} | set(extra_known)
    out: list[str] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        names = [t.task for t in PAPER_TASKS] if name == "paper" else [name]
        for n in names:
            if n not in known:
                valid = ", ".join(["paper", *sorted(known)])
                raise UserError(f"unknown task {n!r} in --tasks; valid: {valid}")
            if n not in out:
                out.append(n)
    if not out:
        raise UserError("--tasks is empty; pass 'paper' or a comma list of task names")
    return out
