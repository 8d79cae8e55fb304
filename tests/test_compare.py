"""compare: results files -> the paper-layout Markdown table."""

import json

import pytest

from freeformer.errors import UserError
from freeformer.evaluation.compare import compare_files, compare_table, load_results


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def lm_eval_output(values):
    """What ``lm_eval.simple_evaluate`` returns, trimmed to the parts compare reads."""
    return {
        "results": {
            task: {"alias": task, metric: value, metric.replace(",", "_stderr,", 1): 0.01}
            for task, (metric, value) in values.items()
        },
        "config": {"model": "FreeformerLM"},
    }


@pytest.fixture
def files(tmp_path):
    base = write(
        tmp_path / "baseline.json",
        lm_eval_output(
            {
                "humaneval_plus": ("pass@1,create_test", 0.055),
                "gsm8k": ("exact_match,strict-match", 0.025),
                "hellaswag": ("acc_norm,none", 0.593),
                "boolq": ("acc,none", 0.0),
                "mmlu": ("acc,none", 0.252),
            }
        ),
    )
    ft = write(
        tmp_path / "ft_1bit.json",
        lm_eval_output(
            {
                "humaneval_plus": ("pass@1,create_test", 0.085),
                "gsm8k": ("exact_match,strict-match", 0.033),
                "hellaswag": ("acc_norm,none", 0.592),
                "boolq": ("acc,none", 0.648),
                "triviaqa": ("exact_match,remove_whitespace", 0.2),
            }
        ),
    )
    # The simpler format: explicit name, metric keys without the filter suffix.
    ft2 = write(
        tmp_path / "other.json",
        {
            "model": "FT 1/2 bit",
            "results": {"humaneval_plus": {"pass@1": 0.055}, "gsm8k": 0.0, "mmlu": {"acc": 0.261}},
        },
    )
    return base, ft, ft2


def test_load_results_reads_the_registry_metric(files):
    base, ft, ft2 = files
    assert load_results(base) == (
        "baseline",
        {"humaneval_plus": 0.055, "gsm8k": 0.025, "hellaswag": 0.593, "boolq": 0.0, "mmlu": 0.252},
    )
    assert load_results(ft2) == (
        "FT 1/2 bit",
        {"humaneval_plus": 0.055, "gsm8k": 0.0, "mmlu": 0.261},
    )


def test_load_results_ignores_other_metrics_and_reads_groups(tmp_path):
    path = write(
        tmp_path / "r.json",
        {
            "model_name": "ckpt-1000",
            "results": {"hellaswag": {"acc,none": 0.6}, "piqa": {"acc_norm,none": "N/A"}},
            "groups": {"mmlu": {"acc,none": 0.3}},
        },
    )
    # hellaswag is read as acc_norm, which is absent; "N/A" is not a number.
    assert load_results(path) == ("ckpt-1000", {"mmlu": 0.3})


def test_table_layout_relative_changes_and_missing(files):
    base, ft, ft2 = files
    table = compare_files([base, ft, ft2])
    assert table.splitlines() == [
        "| Task | baseline (baseline) | ft_1bit | FT 1/2 bit |",
        "|:---|---:|---:|---:|",
        "| **Generative code/math** | | | |",
        "| human_eval_plus (pass@1) | 0.055 | 0.085 (+54.5%) | 0.055 (+0.0%) |",
        "| gsm8k (exact_match) | 0.025 | 0.033 (+32.0%) | 0.000 (-100.0%) |",
        "| **Multi-choice general knowledge / common sense** | | | |",
        "| mmlu (acc) | 0.252 | — | 0.261 (+3.6%) |",
        "| hellaswag (acc_norm) | 0.593 | 0.592 (-0.2%) | — |",
        "| **Multi-choice text understanding** | | | |",
        "| boolq (acc) | 0.000 | 0.648 (n/a) | — |",
        "| **Culture** | | | |",
        "| tqa (exact_match) | — | 0.200 | — |",
    ]


def test_baseline_zero_against_zero_and_duplicate_names():
    base = ("m", {"gsm8k": 0.0})
    other = ("m", {"gsm8k": 0.0})
    lines = compare_table(base, [other]).splitlines()
    assert lines[0] == "| Task | m (baseline) | m #2 |"
    assert lines[-1] == "| gsm8k (exact_match) | 0.000 | 0.000 (+0.0%) |"


def test_paper_example_row():
    # Table 1, 1.5B, MBPP: 0.112 -> 0.152 is +35.7%.
    table = compare_table(("base", {"mbpp": 0.112}), [("ft", {"mbpp": 0.152})])
    assert "| mbpp (pass_at_1) | 0.112 | 0.152 (+35.7%) |" in table.splitlines()


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_results(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_results(bad)
    with pytest.raises(UserError, match='no "results"'):
        load_results(write(tmp_path / "empty.json", {"model": "x"}))
    with pytest.raises(UserError, match="at least one more"):
        compare_files([write(tmp_path / "one.json", {"results": {}})])


def test_different_limits_are_refused_in_one_line(tmp_path, capsys):
    """Scores over different document samples (lm-eval's config.limit, which `freeformer eval`
    records) are not compared; equal limits, and files that record none, are."""
    from freeformer.cli import main

    def scored(name, limit, acc):
        data = lm_eval_output({"piqa": ("acc_norm,none", acc)})
        data["config"]["limit"] = limit
        return write(tmp_path / f"{name}.json", data)

    base, same, full = scored("base", 100, 0.69), scored("ft", 100, 0.68), scored("all", None, 0.7)
    plain = write(tmp_path / "plain.json", {"results": {"piqa": {"acc_norm": 0.6}}})
    assert "| piqa (acc_norm) | 0.690 | 0.680 (-1.4%) | 0.600 (-13.0%) |" in compare_files(
        [base, same, plain]
    )
    for paths, needles in (
        ([base, full], [f"{base}: --limit 100", f"{full}: no --limit"]),
        ([base, same, scored("ft2", 2, 0.5)], [f"{same}: --limit 100", "ft2.json: --limit 2"]),
    ):
        capsys.readouterr()
        assert main(["compare", *map(str, paths), "--out", str(tmp_path / "t.md")]) == 2
        out, err = capsys.readouterr()
        assert out == "" and not (tmp_path / "t.md").exists()
        assert err.startswith("freeformer: error: results scored on different documents")
        assert err.count("\n") == 1 and "same --limit" in err, err
        assert all(n in err for n in needles), err
