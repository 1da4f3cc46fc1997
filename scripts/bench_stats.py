"""Benchmarks of corrjax.stats against numpy/scipy/pandas in the same process (section "stats" of BENCHMARKS.md).

Runs every module ``scripts/bench_parts/stats_*.py``; each exposes ``run(quick: bool = False) -> str`` returning a
Markdown fragment. The fragments are joined under one machine/versions line and written to BENCHMARKS.md.

    .venv/bin/python scripts/bench_stats.py            # full run, rewrites the "stats" section
    .venv/bin/python scripts/bench_stats.py --quick    # small sizes, prints without writing
    .venv/bin/python scripts/bench_stats.py --only stats_moments   # some parts only: prints without writing
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

logger = logging.getLogger("bench_stats")
PARTS = Path(__file__).resolve().parent / "bench_parts"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_parts.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_line() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:  # pragma: no cover
        return ""
    return f"Load average while measuring: {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes; print instead of writing BENCHMARKS.md")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="module names under scripts/bench_parts to run; prints instead of writing BENCHMARKS.md (the section "
        "holds every part)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    parts = sorted(PARTS.glob("stats_*.py"))
    if args.only:
        unknown = sorted(set(args.only) - {p.stem for p in parts})
        if unknown:
            parser.error(f"--only: no part {unknown}; the parts are {[p.stem for p in parts]}")
        parts = [p for p in parts if p.stem in args.only]
    sections = []
    for path in parts:
        logger.info("running %s", path.stem)
        t0 = time.perf_counter()
        module = _load(path)
        kwargs = {"quick": args.quick} if "quick" in inspect.signature(module.run).parameters else {}
        sections.append(module.run(**kwargs).strip())
        logger.info("%s done in %.0f s", path.stem, time.perf_counter() - t0)

    extra = ("scipy", "pandas", "scikit-learn")
    text = "\n\n".join(["## corrjax.stats", benchlib.machine_line(extra), _load_line(), *sections])
    if args.quick or args.only:
        print(text)
    else:
        benchlib.write_section("stats", text)
        print(text)
        logger.info("wrote section 'stats' of %s", benchlib.BENCHMARKS)


if __name__ == "__main__":
    main()
