"""bench/: gpu_check.sh refuses to run without CUDA and its --smoke path runs every step on a
CPU; every benchmark script imports."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


def run(args, out, **env):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-CUDA path")
def test_gpu_check_fails_clearly_without_cuda(tmp_path):
    p = run([], tmp_path)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "no CUDA device" in p.stderr and "--smoke" in p.stderr
    assert not (tmp_path / "gpu_check.md").exists()


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_on_cpu(tmp_path):
    p = run(["--smoke"], tmp_path, GPU_CHECK_COMPILE="0")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    for step in ("gpu-tests", "train-step", "mapper", "decode", "fsdp-1gpu", "no-dist-ref"):
        assert f"| {step} | ok |" in report, step
    # One FSDP2 process computes the losses of no distribution at all, up to bf16 rounding:
    # under bf16 its MixedPrecisionPolicy gathers bf16 parameters, so norms and the residual
    # stream run in bf16 where autocast keeps them float32 (exact equality in float32 is
    # tests/test_distributed.py's).
    diff = re.search(r"max \|loss\(FSDP\) − loss\(no dist\)\| over 4 steps = (\S+)", report)
    assert diff and float(diff.group(1)) < 2e-2, report
    assert "MFU ours FT" in report and "static tokens = eager?" in report


def test_every_bench_script_and_study_imports():
    """Every benchmark imports (no reference to a removed candidate or moved module), and so
    do the studies in scripts/ (likelihood estimators, the latent oracle probe)."""
    code = (
        "import importlib, importlib.util, sys\n"
        "sys.path.insert(0, 'bench')\n"
        "for m in sys.argv[2:]:\n"
        "    importlib.import_module(m)\n"
        "for path in sys.argv[1].split(','):\n"
        "    spec = importlib.util.spec_from_file_location('study', path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    )
    modules = sorted(p.stem for p in (REPO / "bench").glob("*.py"))
    assert {"bench_mapper", "bench_train", "synthetic_cost"} <= set(modules)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "scripts/likelihood_estimators.py,scripts/latent_oracle_probe.py,"
            "scripts/attention_self_mass.py,scripts/shared_z_text.py",
            *modules,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
