"""Atomic, verifiable checkpoints that never unpickle anything.

Layout of a run directory::

    RUN_DIR/config.json             resolved RunConfig (+ freeformer version)
    RUN_DIR/metrics.jsonl           one JSON object per logged step / validation
    RUN_DIR/tokenizer/              how to turn text into ids (absent for the synthetic task)
    RUN_DIR/checkpoints/step_00001000/
        model.safetensors           weights (full, unsharded)
        optimizer.safetensors       AdamW moments, keyed by parameter name
        state.json                  step, tokens seen, data position, RNG states, param
                                    groups, config, and size + sha256 of each file above

A checkpoint is written into ``step_X.tmp-PID/`` (each file fsync'ed), then renamed to
``step_X`` — a rename is atomic, so a crash leaves either the old set of checkpoints or the
new one, never a half-written ``step_X``. ``state.json`` is written last and lists the
checksums, so truncation or corruption is detected on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from freeformer.config import ModelConfig
from freeformer.errors import CheckpointError, ConfigError
from freeformer.lora import merged_state

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_json(tmp, obj)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Write a whole directory at once: yields a fresh temporary sibling of ``out`` to fill,
    then renames it to ``out`` (which must be absent or empty); on any error nothing is left
    at ``out`` and the temporary is removed. Used by convert and export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            try:
                out.rmdir()  # empty (checked by the caller)
            except OSError:  # filled meanwhile: another process wrote the same --out
                raise CheckpointError(
                    f"{out} was filled by another process while this one was writing it; "
                    "nothing was written: choose another --out"
                ) from None
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------
# Optimizer state <-> flat tensors (names instead of pickled objects)
# ---------------------------------------------------------------------------------------
def flatten_optimizer_state(
    osd: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Name-keyed optimizer state (torch.distributed.checkpoint's "full" format, which every
    mode — plain, DDP, FSDP2 — produces) → ({"param/key": tensor}, param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, st in osd["state"].items():
        for key, val in st.items():
            tensors[f"{name}/{key}"] = val if isinstance(val, torch.Tensor) else torch.tensor(val)
    return tensors, [dict(g) for g in osd["param_groups"]]


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]], param_names: set[str]
) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition("/")
        if name not in param_names:
            raise CheckpointError(
                f"optimizer state names parameter {name!r}, which the model "
                "does not have; the checkpoint belongs to another model"
            )
        state.setdefault(name, {})[field] = t
    for g in groups:
        unknown = [n for n in g["params"] if n not in param_names]
        if unknown:
            raise CheckpointError(f"optimizer param group names unknown parameter {unknown[0]!r}")
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write ``RUN_DIR/checkpoints/step_{step}`` atomically; prune to the newest ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = {"model.safetensors": model_state}
        if optimizer_tensors is not None:
            files["optimizer.safetensors"] = optimizer_tensors
        manifest = {}
        for name, tensors in files.items():
            _save_tensors(tensors, tmp / name)
            manifest[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        _write_json(
            tmp / "state.json", {**state, "format": FORMAT_VERSION, "step": step, "files": manifest}
        )
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. end of run == last periodic)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


# ---------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    model_state: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.state["config"]["model"])

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        return _load_tensors(self.path / "optimizer.safetensors")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}".splitlines()[0]) from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest one of a run directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{str(p)!r} does not exist; pass a run directory or a checkpoints/step_* directory"
        )
    if (p / "state.json").is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise CheckpointError(f"{str(p)!r} holds no checkpoint (no checkpoints/step_*/state.json)")
    return found[-1]


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Load weights and metadata; a missing, truncated, corrupted or foreign file is an error."""
    ck = resolve_checkpoint(path)
    try:
        state = json.loads((ck / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ck / 'state.json'} is unreadable or corrupted ({e})") from None
    if (
        not isinstance(state, dict)
        or state.get("format") != FORMAT_VERSION
        or "config" not in state
    ):
        raise CheckpointError(f"{ck} is not a freeformer checkpoint of format {FORMAT_VERSION}")
    for name, meta in state.get("files", {}).items():
        f = ck / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{f} has {f.stat().st_size} bytes, expected {meta['bytes']}: "
                "truncated or overwritten"
            )
        if verify and _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} fails its sha256 check: the file is corrupted")
    try:
        ModelConfig.from_dict(state["config"]["model"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ck}: its model config is invalid ({e})") from None
    return Checkpoint(ck, state, _load_tensors(ck / "model.safetensors"))


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """A ready-to-use model (eval mode) from a run directory or checkpoint."""
    ck = load_checkpoint(path)
    tensors = merged_state(ck.model_state, ck.state["config"])  # LoRA adapters folded in
    return model_from_state(ck.model_config, tensors, device).eval(), ck


def model_from_state(
    config: ModelConfig, tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu"
):
    """A ``FreeTransformer`` of ``config`` holding exactly ``tensors`` (no random init is
    drawn: ``FreeTransformer.empty``), in training mode: for loading, resuming and
    fine-tuning from a checkpoint."""
    from freeformer.model import FreeTransformer

    model = FreeTransformer.empty(config, device)
    load_model_state(model, tensors)
    return model


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Strict load with a one-line error naming the first mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise CheckpointError(
            f"checkpoint does not match the model ({what}; "
            f"{len(missing)} missing, {len(extra)} unexpected)"
        )
    for k, t in tensors.items():
        if tuple(own[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"checkpoint tensor {k!r} has shape {tuple(t.shape)}, the model "
                f"expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(tensors, strict=True, assign=False)
    # Non-persistent buffers (RoPE tables) are rebuilt, not loaded: recompute after to_empty.
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()


def load_run_tokenizer(ck: Checkpoint):
    """The tokenizer a checkpoint's run was trained with."""
    if ck.state["config"]["data"]["source"] == "synthetic":
        from freeformer.data.synthetic import SyntheticTokenizer

        return SyntheticTokenizer()
    from freeformer.data.tokenizer import load_tokenizer

    run_dir = ck.path.parent.parent
    if not (run_dir / "tokenizer").is_dir():
        raise CheckpointError(
            f"{run_dir} has no tokenizer/ directory; copy the data's tokenizer there"
        )
    return load_tokenizer(run_dir / "tokenizer")
