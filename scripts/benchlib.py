"""Shared machinery for scripts/bench_*.py: timing, machine/version facts, and BENCHMARKS.md sections.

Each bench script owns one section of BENCHMARKS.md, delimited by HTML comments, and rewrites only that section,
so the scripts can be rerun independently:

    <!-- bench:stats:start --> ... <!-- bench:stats:end -->
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def keep_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed memory in the process instead of returning it to the kernel.

    With glibc's defaults, a step that allocates its buffers afresh (a PyTorch Jacobian, for instance) may get new
    pages from the kernel every time, each zero-filled on first touch: TorchJD's CNN step at T = 8 measured 55-60 ms
    with ~11k page faults per step in a fresh process, 36 ms with none. Whether a process is in that state depends on
    what ran before, so a benchmark that compares runtimes sets it explicitly: allocations up to 32 MB (glibc's
    ceiling for the mmap threshold) come from the heap, and the heap is not trimmed. Returns False where this is not
    glibc (nothing is changed).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def block(x: Any) -> Any:
    """Waits for every JAX array in ``x`` (no-op for NumPy/torch values)."""
    try:
        import jax

        return jax.block_until_ready(x)
    except ImportError:  # pragma: no cover
        return x


def timeit(fn: Callable[[], Any], *, repeats: int = 7, warmup: int = 1, min_time: float = 0.0) -> dict[str, float]:
    """Median/min wall time in seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    ``fn`` must finish its work before returning (call :func:`block` on JAX results). If one run is shorter than
    ``min_time`` the call is looped and the per-call time reported.
    """
    for _ in range(warmup):
        block(fn())
    inner = 1
    if min_time > 0:
        t0 = time.perf_counter()
        block(fn())
        once = time.perf_counter() - t0
        inner = max(1, int(min_time / max(once, 1e-9)))
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(inner):
            block(fn())
        times.append((time.perf_counter() - t0) / inner)
    return {"median": statistics.median(times), "min": min(times), "runs": repeats * inner}


def cpu_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median process CPU time (all threads) of one warm call of ``fn``.

    A measure of the work done that is less distorted than wall time when other processes share the cores.
    """
    block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        block(fn())
        times.append(time.process_time() - t0)
    return statistics.median(times)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(extra_packages: Sequence[str] = ()) -> str:
    """One Markdown paragraph naming the machine, the JAX backend and the versions of the packages measured."""
    import jax

    devices = jax.devices()
    dev = f"{devices[0].platform}: {devices[0].device_kind} x{len(devices)}"
    pkgs = ["jax", "jaxlib", "numpy", *extra_packages]
    versions = ", ".join(f"{p} {v}" for p in pkgs if (v := _version(p)))
    return (
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"JAX backend {dev}. Versions: {versions}. Measured {time.strftime('%Y-%m-%d')}."
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def write_section(name: str, markdown: str, path: Path | str | None = None) -> None:
    """Replaces (or appends) the ``name`` section of ``path`` (default BENCHMARKS.md) with ``markdown``.

    The file is locked (``flock``) from the read to the write, so bench scripts that finish at the same time do not
    drop each other's sections. A section whose markers are not one start followed by one end (a hand edit gone
    wrong) raises ``ValueError`` instead of being rewritten, since the replacement could swallow the sections between
    a stray start marker and the next end marker.
    """
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block_text = f"{start}\n{markdown.strip()}\n{end}"
    path = BENCHMARKS if path is None else Path(path)
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            text = f.read() or "# Benchmarks\n\nWritten by `scripts/bench_*.py`.\n"
            n_start, n_end = text.count(start), text.count(end)
            if (n_start, n_end) not in ((0, 0), (1, 1)) or (n_start and text.index(start) > text.index(end)):
                raise ValueError(
                    f"{path}: the markers of section {name!r} are broken ({n_start} start, {n_end} end); "
                    "fix them by hand first"
                )
            if n_start:
                i, j = text.index(start), text.index(end) + len(end)
                text = text[:i] + block_text + text[j:]
            else:
                text = text.rstrip() + "\n\n" + block_text
            f.seek(0)
            f.truncate()
            f.write(text.rstrip() + "\n")
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
