"""The code style is enforced, not suggested: `ruff check` and `ruff format --check` over
src/, tests/, bench/ and scripts/ (ruff pinned in the dev extra, so every machine formats
alike). Fix with `ruff format src tests bench scripts && ruff check --fix ...`."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIRS = ["src", "tests", "bench", "scripts"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    p = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *DIRS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
