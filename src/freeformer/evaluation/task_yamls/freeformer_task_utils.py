"""Helpers referenced as ``!function freeformer_task_utils.<name>`` by our lm-eval task YAMLs.

lm-eval loads this file by path from the YAML's folder (not as a package module), so it
imports nothing at load time; the code-execution helpers delegate to
:mod:`freeformer.evaluation.executor`, which refuses to run anything unless
``FREEFORMER_ALLOW_CODE_EXECUTION=1`` (set by ``--allow-code-execution``).

The same file is copied next to the YAMLs that :func:`freeformer.evaluation.olmo.write_olmo_tasks`
generates.
"""

from __future__ import annotations

import ast
import re

# ----------------------------------------------------------------------------------- RACE
# lm-eval's ``race`` task (EleutherAI/race, high school) has one document per article: the
# article, then every earlier question of that article with its answer as context, then the
# last question, whose four options are scored. ``race_process_docs`` builds the same documents
# from the per-question rows of ``ehovy/race`` (fields example_id, article, question, options,
# answer), grouping rows by article in order of first appearance.

_LETTERS = "ABCD"


def race_process_docs(dataset):
    import datasets

    articles: dict[str, dict] = {}
    for row in dataset:
        doc = articles.setdefault(
            row["example_id"],
            {"example_id": row["example_id"], "article": row["article"], "problems": []},
        )
        doc["problems"].append(
            {"question": row["question"], "options": list(row["options"]), "answer": row["answer"]}
        )
    return datasets.Dataset.from_list(list(articles.values()))


def _problems(doc) -> list[dict]:
    # EleutherAI/race stores the list as a Python literal string; ours is a real list.
    problems = doc["problems"]
    return ast.literal_eval(problems) if isinstance(problems, str) else list(problems)


def _answer_text(problem: dict) -> str:
    return problem["options"][_LETTERS.index(problem["answer"])]


def race_doc_to_text(doc) -> str:
    *earlier, last = _problems(doc)
    parts = [f"Article: {doc['article']}\n\n"]
    for p in earlier:
        q = p["question"]
        if q.endswith("  _  ."):  # cloze: fill the blank into the sentence
            parts.append(f"{q[:-5]}{_answer_text(p)}\n")
        else:
            parts.append(f"Question: {q}\nAnswer: {_answer_text(p)}\n")
    parts.append(last["question"])
    return "".join(parts)


def race_doc_to_choice(doc) -> list[str]:
    return list(_problems(doc)[-1]["options"][:4])


def race_doc_to_target(doc) -> int:
    return _LETTERS.index(_problems(doc)[-1]["answer"])


# ----------------------------------------------------------------------------- WinoGrande
# Partial scoring, as lm-eval's ``winogrande``: the two contexts are the sentence up to the
# blank filled with each option; the shared continuation is the rest of the sentence.


def winogrande_doc_to_text(doc) -> int:
    return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_doc_to_target(doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_doc_to_choice(doc) -> list[str]:
    head = doc["sentence"][: doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]


# ------------------------------------------------------------------------------ HellaSwag
# As lm-eval's ``hellaswag``: WikiHow's bracketed artefacts removed, "[title]" made a sentence.


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)


# ---------------------------------------------------------------------------- Code tasks
# HumanEval(+): the filter prepends the prompt to each generation (lm-eval's "create_test");
# the reference is "<tests>\ncheck(<entry_point>)". MBPP: the generation is the program and
# the reference its three assert lines. Metric names and keys match lm-eval's
# ("pass@1,create_test" and "pass_at_1,none").


def humaneval_build_predictions(resps, docs):
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def pass_at_k(references, predictions, k=None):
    from freeformer.evaluation.executor import lm_eval_pass_at_1

    if k not in (None, 1, [1]):
        raise ValueError(f"only pass@1 is supported, got k={k}")
    return {"pass@1": lm_eval_pass_at_1(references, predictions)}


def pass_at_1(references, predictions):
    from freeformer.evaluation.executor import lm_eval_pass_at_1

    return lm_eval_pass_at_1(references, predictions)


MBPP_FEWSHOT_TASK_IDS = (2, 3, 4)


def mbpp_fewshot_docs(dataset):
    """MBPP's "prompt" split reduced to tasks 2-4, lm-eval's three fixed examples."""
    rows = [dict(r) for r in dataset if r["task_id"] in MBPP_FEWSHOT_TASK_IDS]
    rows.sort(key=lambda r: MBPP_FEWSHOT_TASK_IDS.index(r["task_id"]))
    return [{**r, "is_fewshot": True} for r in rows]
