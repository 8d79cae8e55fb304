"""Shared helpers for the benchmarks: machine description, alternating timing, peak memory,
Markdown tables and the sections of bench/RESULTS.md (whose "How it was measured" explains
the methods)."""

from __future__ import annotations

import ctypes
import datetime
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
MiB = float(1 << 20)
CPU = torch.device("cpu")


def machine_line(device: torch.device) -> str:
    """One line naming the machine, thread count, library versions, load and date."""
    info = Path("/proc/cpuinfo")
    m = re.search(r"model name\s*:\s*(.+)", info.read_text() if info.exists() else "")
    la = os.getloadavg()
    parts = [
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"CPU: {m.group(1).strip() if m else 'unknown'} ({os.cpu_count()} logical cores)",
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)",
        f"load avg {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f} at start",
    ]
    if device.type == "cuda":
        parts.insert(2, f"GPU: {torch.cuda.get_device_name(device)}")
    try:
        git = ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]
        rev = subprocess.run(git, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return "; ".join(parts + ([f"repo at {rev}"] if rev else []))


def pin_malloc() -> None:
    """Fix glibc's mmap threshold so freed large blocks go back to the OS at once: RSS then
    tracks live large allocations."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD = 128 KiB
        libc.mallopt(-1, 1 << 17)  # M_TRIM_THRESHOLD = 128 KiB
    except OSError:
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds per call for each competitor, one entry per round, and the load per round."""

    times: dict[str, list[float]]
    loads: list[float] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of time(a) / time(b), both measured in the same round."""
        return statistics.median(x / y for x, y in zip(self.times[a], self.times[b]))

    def ratio_range(self, a: str, b: str) -> tuple[float, float]:
        rs = [x / y for x, y in zip(self.times[a], self.times[b])]
        return min(rs), max(rs)

    def load_range(self) -> str:
        return f"{min(self.loads):.1f}–{max(self.loads):.1f}" if self.loads else "?"


def alternate(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    *,
    warmup: int = 1,
    before: dict[str, Callable[[], object]] | None = None,
    device: torch.device = CPU,
    inner: int = 1,
) -> Timings:
    """Time each callable once per round, rotating the order every round (A B C, B C A, ...).
    ``before[name]`` runs untimed before each call; ``inner`` calls are averaged per round."""
    names = list(fns)
    before = {n: (before or {}).get(n, lambda: None) for n in names}
    for name in names:
        for _ in range(warmup):
            before[name]()
            fns[name]()
    sync(device)
    out = Timings({n: [] for n in names})
    for r in range(rounds):
        out.loads.append(os.getloadavg()[0])
        k = r % len(names)
        for name in names[k:] + names[:k]:
            total = 0.0
            for _ in range(inner):
                before[name]()
                sync(device)
                t0 = time.perf_counter()
                fns[name]()
                sync(device)
                total += time.perf_counter() - t0
            out.times[name].append(total / inner)
    return out


@dataclass
class PeakMemory:
    """Bytes allocated during one call, above its start: highest live total, still live at
    the end, and highest live total of the blocks also freed during the call (working memory)."""

    peak: int
    final: int
    transient: int


def peak_alloc(fn: Callable[[], object], device: torch.device = CPU) -> PeakMemory:
    """Peak memory of ``fn()``: CUDA from the allocator's counters; CPU by replaying the
    profiler's allocation events in time order (exact for tensor memory; frees of blocks
    allocated before the call are ignored, which can only overstate)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
        final = torch.cuda.memory_allocated(device) - start
        return PeakMemory(peak, final, peak - final)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.ptr))
        stack.extend(e.children)
    events.sort()
    # Which allocation events are later freed (matched by address, in order)?
    open_at: dict[int, int] = {}
    freed: set[int] = set()
    for i, (_, size, ptr) in enumerate(events):
        if size > 0:
            open_at[ptr] = i
        elif ptr in open_at:
            freed.add(open_at.pop(ptr))
    live = peak = tr = tr_peak = 0
    open_size: dict[int, int] = {}
    for i, (_, size, ptr) in enumerate(events):
        live += size
        peak = max(peak, live)
        if size > 0 and i in freed:
            tr += size
            open_size[ptr] = size
        elif size < 0 and ptr in open_size:
            tr -= open_size.pop(ptr)
        tr_peak = max(tr_peak, tr)
    return PeakMemory(peak, live, tr_peak)


def peak_rss(fn: Callable[[], object]) -> int | None:
    """Peak resident set during ``fn()`` above the one before it (bytes; VmHWM reset through
    /proc/self/clear_refs), or None where the kernel does not allow the reset."""

    def status(key: str) -> int:
        m = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024 if m else 0

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return status("VmHWM") - before


def md_table(headers: Sequence[str] | str, rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; ``headers`` may be one string with the names separated by "|"."""
    if isinstance(headers, str):
        headers = headers.split("|")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the block between ``<!-- BEGIN name -->`` and ``<!-- END name -->``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def report(
    title: str, machine: str, method: str, head: str, rows: Sequence[Sequence[object]], args
) -> None:
    """Print a benchmark's section (title; the command, ``machine`` and ``method`` lines; the
    table) and, with ``args.write`` and without ``args.smoke``, write it to RESULTS.md as
    section ``args.section``."""
    intro = f"Command: `{command_line(sys.argv)}`  \nMachine: {machine}  \n{method}"
    body = "\n\n".join([title, intro, md_table(head, rows)])
    print()
    print(body)
    if args.write and not args.smoke:
        write_section(args.section, body)
        print(f"\nwrote {RESULTS}")


def command_line(argv: Sequence[str]) -> str:
    return "python " + " ".join(argv)


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def fmt_s(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def parser(doc: str, **kw):
    """An ArgumentParser whose description is ``doc``'s first paragraph, the rest its epilog."""
    import argparse

    head, _, rest = doc.partition("\n\n")
    fmt = argparse.RawDescriptionHelpFormatter
    return argparse.ArgumentParser(description=head, epilog=rest, formatter_class=fmt, **kw)
