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
