"""docs/latent-study.md's FT-vs-baseline bars: every number the figure draws is a number the
page's tables print (so the figure cannot drift from the tables), and the script that draws it
writes the figure or refuses bad input in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "docs" / "latent-study-cost.json"
DOC = REPO / "docs" / "latent-study.md"
SCRIPT = REPO / "scripts" / "plot_latent_cost.py"


def test_every_plotted_difference_is_in_the_docs_tables():
    data = json.loads(DATA.read_text())
    doc = DOC.read_text()
    assert data["delta_nll"]
    for label, seeds in data["delta_nll"].items():
        assert len(seeds) == 3, label  # the 3 seeds per study
        for x in seeds:
            # the page prints 4 decimals, or 2 significant digits below 1e-4 (converted model)
            text = f"{x:+.4f}" if abs(x) >= 1e-4 else f"{x:+.1e}"
            assert text in doc, (label, x)


def test_plot_script_writes_the_figure_and_refuses_bad_input(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cost.png"
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"delta": {"x": [0.1]}}))  # misnamed key
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(bad), "--out", str(tmp_path / "b.png")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "delta_nll" in p.stderr
    assert not (tmp_path / "b.png").exists()
