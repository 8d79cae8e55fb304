"""Random packed windows over prepared token shards, deterministic, resumable and sharded.

Training and evaluation consume data through one small protocol, implemented here by
:class:`TokenWindows` (token shards from :mod:`freeformer.data.prepare`) and elsewhere by
the synthetic task stream::

    class Batches(Protocol):
        def next_batch(self) -> tuple[Tensor, Tensor]: ...
        def state_dict(self) -> dict[str, Any]: ...
        def load_state_dict(self, state: dict[str, Any]) -> None: ...
        def fixed_batches(self, n_batches: int) -> list[tuple[Tensor, Tensor]]: ...

``next_batch`` returns this rank's ``(x, y)`` int64 tensors of shape
``(batch_size // world_size, seq_len)`` where ``y`` is ``x`` shifted left by one token.
The *global* batch of step ``s`` is a pure function of ``(seed, s)`` and rank ``r`` takes
rows ``[r*b, (r+1)*b)`` of it, so ``world_size`` processes see, together, exactly what one
process with the same global batch sees, and a run resumed from ``state_dict()`` -- even
on a different number of ranks -- continues with the batches it would have seen.
``fixed_batches`` is a deterministic evaluation set, independent of the training state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from freeformer.data.prepare import FORMAT_VERSION, MANIFEST
from freeformer.errors import CheckpointError, ConfigError, DataError

_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SPLITS = ("train", "val")


@runtime_checkable
class Batches(Protocol):
    """A source of ``(x, y)`` batches; see the module docstring for the contract."""

    def next_batch(self) -> tuple[Tensor, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def fixed_batches(self, n_batches: int) -> list[tuple[Tensor, Tensor]]: ...


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read and check ``data_dir/manifest.json``: format, dtype, and that every shard exists
    with exactly the size the manifest states (catches truncated copies)."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise DataError(
            f"no {MANIFEST} in {data_dir}; run `freeformer prepare ... --out {data_dir}`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}); re-run freeformer prepare") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(
            f"{path} has format {got!r}, expected {FORMAT_VERSION}; re-run freeformer prepare"
        )
    for key in ("vocab_size", "eos_id", "dtype", *SPLITS):
        if key not in manifest:
            raise DataError(f"{path} lacks {key!r}; re-run freeformer prepare")
    dtype = _DTYPES.get(manifest["dtype"])
    if dtype is None:
        raise DataError(
            f"{path} has dtype {manifest['dtype']!r}, expected uint16 or uint32; "
            "re-run freeformer prepare"
        )
    for split in SPLITS:
        for shard in manifest[split]:
            try:
                f, want = data_dir / shard["file"], int(shard["tokens"]) * dtype.itemsize
            except (KeyError, TypeError, ValueError):
                raise DataError(
                    f"{path} has a malformed {split} shard entry {shard!r}; re-run freeformer prepare"
                ) from None
            if not f.is_file():
                raise DataError(f"shard {f} listed in {path} is missing; re-run freeformer prepare")
            got = f.stat().st_size
            if got != want:
                raise DataError(
                    f"shard {f} has {got} bytes, manifest says {want}; the copy is truncated "
                    "or corrupted, re-run freeformer prepare"
                )
    return manifest


class TokenWindows:
    """Windows of ``seq_len + 1`` consecutive tokens from one split of a prepared directory.

    The shards of the split form a single stream; windows may cross document (EOS) and
    shard boundaries, as in standard packed pre-training. ``batch_size`` is the global
    batch; this rank returns ``batch_size // world_size`` rows of it.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for name, value, low in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("seed", seed, 0),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ConfigError(f"rank={rank} must be < world_size={world_size}")
        if batch_size % world_size:
            raise ConfigError(
                f"batch_size={batch_size} (global) is not divisible by world_size={world_size}; "
                f"use a multiple of {world_size}"
            )
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        self.split, self.seq_len, self.batch_size = split, int(seq_len), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.local_batch_size = self.batch_size // self.world_size
        self.vocab_size = int(self.manifest["vocab_size"])
        self.eos_id = int(self.manifest["eos_id"])
        self.step = 0

        dtype = _DTYPES[self.manifest["dtype"]]
        self._shards: list[np.memmap] = []
        for shard in self.manifest[split]:
            if int(shard["tokens"]) == 0:
                continue  # np.memmap cannot map an empty file
            mm = np.memmap(self.data_dir / shard["file"], dtype=dtype, mode="r")
            # One pass over the data at load (~10 ms per 30M tokens) turns a wrong
            # tokenizer/vocab into a clear error instead of an index error on the GPU.
            top = int(mm.max())
            if top >= self.vocab_size:
                raise DataError(
                    f"token id {top} >= vocab_size {self.vocab_size} in {shard['file']}; "
                    "the shards do not match the manifest, re-run freeformer prepare"
                )
            self._shards.append(mm)
        sizes = np.array([len(s) for s in self._shards], dtype=np.int64)
        self._ends = np.cumsum(sizes)
        self._starts = self._ends - sizes
        self.n_tokens = int(sizes.sum())
        if self.n_tokens < self.seq_len + 1:
            hint = " (prepared with val_fraction=0)" if split == "val" and not self.n_tokens else ""
            raise DataError(
                f"split {split!r} of {self.data_dir} has {self.n_tokens} tokens{hint}, fewer than "
                f"seq_len+1={self.seq_len + 1}; use a smaller seq_len or more data"
            )

    # -- reading -----------------------------------------------------------------------

    def _window(self, start: int) -> np.ndarray:
        """Tokens ``[start, start + seq_len + 1)`` of the concatenated stream."""
        length = self.seq_len + 1
        i = int(np.searchsorted(self._ends, start, side="right"))
        off = start - int(self._starts[i])
        first = self._shards[i][off : off + length]
        if len(first) == length:
            return first
        pieces = [first]
        need = length - len(first)
        while need:
            i += 1
            piece = self._shards[i][:need]
            pieces.append(piece)
            need -= len(piece)
        return np.concatenate(pieces)

    def _batch(self, starts: np.ndarray) -> tuple[Tensor, Tensor]:
        rows = np.stack([self._window(int(s)) for s in starts]).astype(np.int64)
        w = torch.from_numpy(rows)  # (b, seq_len + 1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def _local(self, global_rows: np.ndarray) -> np.ndarray:
        b = self.local_batch_size
        return global_rows[self.rank * b : (self.rank + 1) * b]

    # -- the Batches protocol ----------------------------------------------------------

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """This rank's rows of the global batch of the current step; advances the step."""
        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, self.n_tokens - self.seq_len, size=self.batch_size)
        self.step += 1
        return self._batch(self._local(starts))

    def state_dict(self) -> dict[str, Any]:
        """The step, plus what must not change for a resume to replay the same data."""
        return {
            "step": self.step,
            "seed": self.seed,
            "split": self.split,
            "n_tokens": self.n_tokens,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["step"]`` batches.

        Refuses a state from another seed, split or corpus, since the resumed run would
        silently see different data; ``world_size`` may differ (the global batch does not).
        """
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise CheckpointError(f"data loader state has step={step!r}; expected an int >= 0")
        for key in ("seed", "split", "n_tokens"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"data loader state has {key}={state[key]!r} but this loader has "
                    f"{getattr(self, key)!r}; resume with the same data and seed"
                )
        self.step = int(step)

    def max_fixed_batches(self) -> int:
        """How many global batches of non-overlapping windows the split holds."""
        return (self.n_tokens // (self.seq_len + 1)) // self.batch_size

    def fixed_batches(self, n_batches: int) -> list[tuple[Tensor, Tensor]]:
        """``n_batches`` deterministic batches (this rank's rows) for evaluation.

        Windows do not overlap and are spread evenly from the start to the end of the
        stream, so a small set still covers the whole split. If the split is too short,
        fewer batches (:meth:`max_fixed_batches`) are returned.
        """
        if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
            raise ConfigError(f"n_batches must be an int >= 1, got {n_batches!r}")
        length = self.seq_len + 1
        n = min(n_batches, self.max_fixed_batches())
        if n == 0:
            raise DataError(
                f"split {self.split!r} of {self.data_dir} has {self.n_tokens} tokens, too few for "
                f"one batch of {self.batch_size} windows of {length}; lower batch_size or seq_len"
            )
        total = n * self.batch_size
        # Spacing (n_tokens - length) / (total - 1) >= length since total <= n_tokens // length.
        starts = (np.arange(total, dtype=np.int64) * (self.n_tokens - length)) // max(total - 1, 1)
        return [self._batch(self._local(g)) for g in starts.reshape(n, self.batch_size)]
