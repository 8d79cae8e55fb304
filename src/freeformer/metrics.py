"""Training metrics: the log (RUN_DIR/metrics.jsonl plus optional TensorBoard / W&B), its
reader, and the KL monitor that warns when the latent goes unused or copies the sequence."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from freeformer.errors import UserError
from freeformer.runconfig import RunConfig


class LatentMonitor:
    """Warns when the KL sits far below κ for long (the latent is unused) or near H bits
    (the latent copies the sequence). ``update`` returns a warning once per condition."""

    def __init__(self, kappa_bits: float, n_bits: int, patience: int = 20) -> None:
        self.kappa, self.n_bits, self.patience = kappa_bits, n_bits, patience
        self.low = self.high = 0
        self.warned: set[str] = set()

    def update(self, step: int, kl_bits: float) -> str | None:
        self.low = self.low + 1 if kl_bits < 0.1 * self.kappa else 0
        self.high = self.high + 1 if kl_bits > 0.5 * self.n_bits else 0
        if self.low >= self.patience and "low" not in self.warned:
            self.warned.add("low")
            return (
                f"step {step}: KL has stayed at {kl_bits:.4f} bits/token, far below "
                f"κ = {self.kappa:g} bits, for {self.low} logs: the decoder is not using Z"
            )
        if self.high >= self.patience and "high" not in self.warned:
            self.warned.add("high")
            return (
                f"step {step}: KL is {kl_bits:.2f} bits/token, near H = {self.n_bits} bits: "
                "the latent may be copying the sequence (generation will break)"
            )
        return None


class MetricsLog:
    """RUN_DIR/metrics.jsonl plus optional TensorBoard / W&B sinks (main process only)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, enabled: bool, resume_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            # Drop lines logged after the checkpoint we resume from: they will be re-made.
            lines = self.path.read_text().splitlines()
            kept = [
                ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif not resume_step:
            self.path.write_text("")
        tc = cfg.train
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "train.tensorboard needs TensorBoard: pip install 'freeformer[logging]'"
                ) from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if tc.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError(
                    "train.wandb needs Weights & Biases: pip install 'freeformer[logging]'"
                ) from None
            self.wandb = wandb.init(
                project=tc.wandb_project, config=cfg.to_dict(), dir=str(run_dir), resume="allow"
            )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        prefix = "val/" if record.get("kind") == "val" else "train/"
        scalars = {
            prefix + k: v
            for k, v in record.items()
            if isinstance(v, (int, float)) and k not in ("step", "kind")
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def iter_metrics(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl, in order (training and validation lines)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a training run directory?")
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i} is not valid JSON") from None
