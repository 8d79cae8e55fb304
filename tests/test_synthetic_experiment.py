"""The `freeformer synthetic` runner: outputs, resumability, regime checks."""

import argparse
import json

import pytest

from freeformer.cli import main
from freeformer.errors import UserError
from freeformer.experiments.synthetic import (
    QUICK_OVERRIDES,
    add_arguments,
    kappa_key,
    make_plan,
    parse_kappas,
    plain_summary,
    regime_checks,
    rounds,
)


def test_runner_writes_every_output_and_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "syn"
    argv = [
        "synthetic",
        "--kappa-bits",
        "1/64,8",
        "--steps",
        "3",
        "--groups",
        "2",
        "--jobs",
        "1",
        "--threads",
        "1",
        "--reconstruction",
        "8",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "shared latent #2" in printed and "total runtime" in printed
    samples = json.loads((out / "samples.json").read_text())
    assert set(samples) == {"0.015625", "8", "baseline"}
    for groups in samples.values():
        assert len(groups["independent"]) == 2 and len(groups["shared"]) == 2
        assert all(len(g) == 5 and all(len(s) == 66 for s in g) for g in groups["independent"])
    md = (out / "results.md").read_text()
    assert "κ = 1/64 bit" in md and "baseline" in md and "Command:" in md
    assert (out / "figure4.png").read_bytes()[:4] == b"\x89PNG"
    cfg = json.loads((out / "runs" / "kappa_8" / "config.json").read_text())
    assert cfg["model"]["latent_bits"] == 8 and cfg["model"]["free_bits"] == 8
    # A second invocation reuses the finished runs instead of training again.
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 3


@pytest.mark.slow
def test_parallel_models_give_the_sequential_results(tmp_path, capsys):
    """--jobs 2 trains and scores each model in its own process: same numbers as --jobs 1."""
    outs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert (
            main(
                [
                    "synthetic",
                    "--kappa-bits",
                    "1",
                    "--steps",
                    "4",
                    "--groups",
                    "2",
                    "--reconstruction",
                    "8",
                    "--jobs",
                    jobs,
                    "--threads",
                    "1",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        outs[jobs] = (
            json.loads((out / "samples.json").read_text()),
            json.loads((out / "scores.json").read_text()),
        )
    printed = capsys.readouterr().out
    assert "trained in" in printed and "What you are looking at" in printed
    assert outs["1"][0] == outs["2"][0]
    for key in ("ind", "sha", "val", "recon", "steps"):
        assert outs["1"][1]["1"][key] == outs["2"][1]["1"][key]


def test_quick_trains_the_quick_config(tmp_path, capsys):
    """--quick is κ = 2 bits alone: the shipped config with the quick overrides."""
    from freeformer.runconfig import load_run_config

    shipped = load_run_config(preset="synthetic").to_dict()
    out = tmp_path / "q"
    argv = ["synthetic", "--quick", "--groups", "1", "--reconstruction", "4"]
    assert main([*argv, "--steps", "2", "--jobs", "1", "--threads", "1", "--out", str(out)]) == 0
    assert set(json.loads((out / "samples.json").read_text())) == {"2"}
    cfg = json.loads((out / "runs" / "kappa_2" / "config.json").read_text())
    assert cfg["train"]["lr"] == shipped["train"]["lr"]
    assert cfg["train"]["max_steps"] == 2 and cfg["train"]["batch_size"] == 64
    assert cfg["model"]["dim"] == shipped["model"]["dim"] and cfg["model"]["latent"]
    # Without --steps the quick overrides set the length (the demo's 1600 steps).
    quick = load_run_config(preset="synthetic", overrides=QUICK_OVERRIDES)
    assert quick.train.max_steps == 1600 != shipped["train"]["max_steps"]


def test_quick_skips_the_baseline_unless_asked():
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def plan(*flags):
        return make_plan(parser.parse_args(list(flags)), 100)

    assert plan("--quick").baseline is False and plan("--quick").kappas == (2.0,)
    assert plan("--quick", "--baseline").baseline is True
    assert plan().baseline is True and plan("--no-baseline").baseline is False
    with pytest.raises(UserError, match="contradict"):
        plan("--baseline", "--no-baseline")


def test_rounds_give_the_leftover_models_the_idle_cores():
    five = ["a", "b", "c", "d", "baseline"]
    # Four κ two at a time on one thread each, then the baseline alone on both cores.
    assert rounds(five, 2, 1, False) == [(five[:4], 2, 1), (["baseline"], 1, 2)]
    # --threads fixes the count in every round.
    assert rounds(five, 2, 1, True) == [(five[:4], 2, 1), (["baseline"], 1, 1)]
    assert rounds(five[:4], 2, 1, False) == [(five[:4], 2, 1)]
    assert rounds(five, 4, 1, False) == [(five[:4], 4, 1), (["baseline"], 1, 4)]
    # Fewer models than cores: main() never asks for more processes than models.
    assert rounds(five[:2], 2, 1, False) == [(five[:2], 2, 1)]
    assert rounds(five[:3], 2, 2, False) == [(five[:2], 2, 2), (["c"], 1, 2)]


def test_kappa_parsing_and_keys():
    assert parse_kappas("1/64, 1/8,1,8") == (1 / 64, 0.125, 1.0, 8.0)
    assert [kappa_key(k) for k in (1 / 64, 1 / 8, 1.0, 8.0)] == ["0.015625", "0.125", "1", "8"]
    for bad in ("abc", "0", "1/0", "-1"):
        with pytest.raises(UserError):
            parse_kappas(bad)


def scores(validity, pos_ind, pos_sha, jac_ind, jac_sha):
    def agg(pos, jac):
        return {"validity": validity, "position_agreement": pos, "noise_jaccard": jac}

    return {"ind": agg(pos_ind, jac_ind), "sha": agg(pos_sha, jac_sha)}


def test_regime_checks_apply_the_issue_thresholds():
    results = {
        "0.015625": scores(0.9, 0.03, 0.05, 0.03, 0.03),
        "0.125": scores(0.95, 0.03, 0.85, 0.03, 0.10),
        "1": scores(0.95, 0.03, 0.9, 0.03, 0.40),
        "8": scores(0.70, 0.03, 0.3, 0.5, 0.8),
    }
    assert [ok for _, _, ok in regime_checks(results)] == [True, True, True, True, True]
    results["0.125"] = scores(0.95, 0.03, 0.79, 0.03, 0.10)  # position agreement < 0.8
    results["1"] = scores(0.95, 0.03, 0.9, 0.03, 0.30)  # Jaccard only +0.27
    results["8"] = scores(0.80, 0.31, 0.3, 0.5, 0.8)  # 15 points below; ind. agree
    checks = regime_checks(results)
    assert [ok for _, _, ok in checks] == [True, False, False, False, False]
    assert "0.310, κ = 8 bits" in checks[-1][1]


def test_plain_summary_names_what_sharing_z_did():
    def res(validity, pos_ind, pos_sha, jac_ind, jac_sha, kl=1.0):
        r = scores(validity, pos_ind, pos_sha, jac_ind, jac_sha)
        r["val"] = {"kl_bits": kl}
        return r

    lines = plain_summary(
        {
            "1": res(0.9, 0.05, 0.45, 0.09, 0.29),
            "0.015625": res(0.95, 0.03, 0.05, 0.03, 0.04, kl=0.01),
            "8": res(0.3, 0.1, 0.9, 0.1, 0.9, kl=7.9),
            "baseline": {**scores(0.96, 0.03, 0.03, 0.03, 0.03), "val": {}},
        }
    )
    assert "steers generation: it decides where the target goes (" in lines[0]
    assert "45 % of pairs" in lines[0] and "5 %" in lines[0]
    assert "changes little" in lines[1]
    assert "generation breaks" in lines[2] and "7.9 bits/token" in lines[2]
    assert "96 % well formed for the baseline" in lines[2]
    # 20 points below the baseline is a breakdown even above 50 % validity.
    mild = plain_summary(
        {
            "8": res(0.7, 0.1, 0.2, 0.1, 0.2, kl=7.9),
            "baseline": {**scores(0.95, 0.03, 0.03, 0.03, 0.03), "val": {}},
        }
    )
    assert "generation breaks" in mild[0]
    assert lines[3].startswith("baseline")
    weak = plain_summary({"1": res(0.93, 0.04, 0.21, 0.03, 0.03)})[0]
    assert "weak effect" in weak
    both = plain_summary({"1": res(0.9, 0.05, 0.85, 0.09, 0.6)})[0]
    assert "where the target goes and where the noise falls" in both
