"""Resume = uninterrupted, the one way the tests check it: train a run to the end, copy it,
cut the copy back to one checkpoint (as if the job had died right after writing it), resume
the copy and hand both back for comparison."""

import shutil
from pathlib import Path

import torch

from freeformer.checkpoint import list_checkpoints, load_checkpoint
from freeformer.train import train


def train_then_resume(cfg, tmp_path: Path, keep_step: int) -> tuple[Path, Path]:
    """The uninterrupted run and the run resumed from its step-``keep_step`` checkpoint."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(cfg, full, quiet=True)
    shutil.copytree(full, cut)
    kept = f"step_{keep_step:08d}"
    assert any(ck.name == kept for ck in list_checkpoints(cut)), kept
    for ck in list_checkpoints(cut):
        if ck.name != kept:
            shutil.rmtree(ck)
    train(cfg, cut, resume=True, quiet=True)
    return full, cut


def assert_same_final_weights(full: Path, cut: Path) -> None:
    a, b = load_checkpoint(full).model_state, load_checkpoint(cut).model_state
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact, not approximate
