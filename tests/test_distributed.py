"""Two CPU processes (gloo via torchrun) see the same global batch as one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

COMMON = ["--preset", "debug", "--train.max_steps=4", "--train.log_every=1",
          "--train.eval_every=0", "--train.ckpt_every=2", "--quiet"]


def run(args, port=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if port is None:
        cmd = [sys.executable, "-m", "freeformer", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={port}", "-m", "freeformer", "train", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "kind" not in json.loads(x)]


@pytest.mark.parametrize("mode,port", [("ddp", 29631), ("fsdp", 29632)])
def test_two_processes_match_one_and_resume(tmp_path, mode, port):
    single = tmp_path / "single"
    run(["--out", str(single), *COMMON])
    multi = tmp_path / mode
    run(["--out", str(multi), *COMMON, f"--train.dist={mode}"], port)
    a, b = losses(single), losses(multi)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    # Checkpoints written under DDP/FSDP are full, and resume under the same mode continues
    # exactly where the uninterrupted distributed run went.
    shutil.rmtree(multi / "checkpoints" / "step_00000004")
    run(["--resume", str(multi), f"--train.dist={mode}", "--quiet"], port + 10)
    c = losses(multi)
    assert max(abs(x - y) for x, y in zip(b, c)) < 1e-6
