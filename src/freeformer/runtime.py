"""Where and in what precision a run computes: the one device resolver ("auto" is resolved
here and nowhere else) and the training precision (bf16 autocast or FP32)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from freeformer.errors import ConfigError


def resolve_device(
    name: str | torch.device | None = "auto",
    *,
    flag: str = "--device",
    local_rank: int | None = None,
) -> torch.device:
    """``"auto"`` (or None): CUDA when available, else the CPU; ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"`` as given. ``local_rank`` picks the GPU of a torchrun process when the name
    gives none. A bad name, or CUDA asked for where there is none, is a ``ConfigError``
    naming ``flag``."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{flag} = {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{flag} = {name!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} = {name!r} but CUDA is not available; use 'cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device("cuda", local_rank or 0)
    return dev


@functools.lru_cache(maxsize=1)
def bf16_native_cpu() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: x86 AVX512-BF16 or AMX-BF16.

    Elsewhere oneDNN emulates bf16 GEMMs through float32, which is slower than FP32 itself.
    A capability check, not a timing at start-up: timings on a shared machine are noisy, and
    the gain was measured side by side once (bench/bench_precision.py, bench/RESULTS.md).
    """
    caps = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if caps is not None:  # torch ≥ 2.13
        c = caps()
        return bool(c.get("avx512_bf16") or c.get("amx_bf16"))
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# Below this width the casts around every small matmul cost more than bf16 matmuls save:
# measured on an AVX512-BF16 CPU (bench/RESULTS.md, precision-cpu), bf16 autocast made a
# training step 0.55 × as fast at D 32 and 0.7 × at D 64 (the debug and synthetic presets),
# and 1.2 × faster at D 128, 1.3–1.5 × at D 256, 1.6 × at D 512.
CPU_BF16_MIN_DIM = 128


def resolve_precision(device: torch.device, precision: str, dim: int | None = None) -> str:
    """ "fp32" or "bf16" for ``train.precision`` on ``device`` for a model of width ``dim``.

    "auto" means bf16 autocast on CUDA, and on CPUs with native bf16 matmuls for models at
    least ``CPU_BF16_MIN_DIM`` wide (where it was measured faster); FP32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and bf16_native_cpu() and (dim is None or dim >= CPU_BF16_MIN_DIM):
        return "bf16"
    return "fp32"


def autocast(
    device: torch.device, precision: str, dim: int | None = None
) -> contextlib.AbstractContextManager:
    """bf16 autocast (float32 master weights; the model computes CE and KL in float32) when
    ``resolve_precision`` says bf16, else no autocast."""
    if resolve_precision(device, precision, dim) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
