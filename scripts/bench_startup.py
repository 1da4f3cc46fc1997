"""Time to the first training step of ``scripts/train.py`` -> the "startup" section of BENCHMARKS.md.

Each measurement is a fresh process running ``scripts/train.py`` as a user would (the default run: synthetic data,
a 13k-parameter shared-bottom MLP, M-SVAG), with hooks installed before it starts: the time from launching the
process to the end of the first train step (imports, data, model, initial state and the step's compilation
included), and the XLA compilations before that step (``jax.monitoring``'s backend-compile events). The child stops
right after the first step. Three settings of ``trainer.compilation_cache_dir``: ``null`` (no persistent cache),
cold (an empty cache folder) and warm (the same folder again). ``--baseline-root`` also measures another checkout
(e.g. the code before these changes) without a cache.

Run: ``.venv/bin/python scripts/bench_startup.py`` (``--repeats 3``; about 10-30 s per process on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["logger=minimal", "trainer.progress=false", "trainer.max_steps=600"]


def child(root: str, out: str, argv: list[str]) -> None:
    """Runs ``<root>/scripts/train.py argv`` in this process and writes ``{"first_step_s", "compilations"}`` to
    ``out`` (seconds since the parent launched this process) once the first train step has finished, then exits."""
    import runpy

    import jax
    from jax import monitoring

    launched = float(os.environ["BENCH_STARTUP_T0"])
    compiles: list[float] = []

    def on_duration(name: str, duration: float, **_: object) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    monitoring.register_event_duration_secs_listener(on_duration)
    import corrjax.train.sharding as sharding

    jit_setup_steps = sharding.jit_setup_steps

    def hooked(*args, **kwargs):
        steps = jit_setup_steps(*args, **kwargs)
        train = steps.train

        def first_step(*a):
            out_ = jax.block_until_ready(train(*a))
            Path(out).write_text(
                json.dumps(
                    {
                        "first_step_s": time.time() - launched,
                        "compilations": len(compiles),
                        "compile_s": sum(compiles),
                    }
                )
            )
            sys.stdout.flush()
            os._exit(0)
            return out_  # pragma: no cover

        return steps._replace(train=first_step)

    sharding.jit_setup_steps = hooked
    sys.argv = [f"{root}/scripts/train.py", *argv]
    sys.path.insert(0, f"{root}/scripts")
    runpy.run_path(f"{root}/scripts/train.py", run_name="__main__")


def measure(root: Path, overrides: list[str], workdir: Path) -> dict[str, float]:
    """One fresh process: time to the end of its first step, and its compilations before it."""
    out = workdir / f"result-{time.time_ns()}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), PYTHONPATH=str(root), HYDRA_FULL_ERROR="1")
    run_dir = workdir / f"run-{time.time_ns()}"
    argv = [*OVERRIDES, *overrides, f"hydra.run.dir={run_dir}"]
    env["BENCH_STARTUP_T0"] = repr(time.time())
    cmd = [sys.executable, __file__, "--child", str(root), str(out), *argv]
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=900)
    if not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-root", type=Path, default=None, help="another checkout, measured without cache")
    parser.add_argument("--baseline-label", default="baseline")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()

    from benchlib import machine_line, table, write_section

    rows, load_before = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        settings: list[tuple[str, Path, str]] = []
        if args.baseline_root is not None:
            settings.append((f"{args.baseline_label}, no cache", args.baseline_root, "none"))
        settings += [("this tree, no cache", ROOT, "off"), ("this tree, cold cache", ROOT, "cold")]
        results: dict[str, list[dict[str, float]]] = {}
        caches = []
        for r in range(args.repeats):
            for label, root, mode in settings:
                if mode == "none":
                    overrides = []
                elif mode == "off":
                    overrides = ["trainer.compilation_cache_dir=null"]
                else:
                    caches.append(work / f"cache-{r}")
                    overrides = [f"trainer.compilation_cache_dir={caches[-1]}"]
                results.setdefault(label, []).append(measure(root, overrides, work))
                print(label, results[label][-1], flush=True)
            # warm: the cold run's folder again
            warm = measure(ROOT, [f"trainer.compilation_cache_dir={caches[-1]}"], work)
            results.setdefault("this tree, warm cache", []).append(warm)
            print("this tree, warm cache", warm, flush=True)
        for label, values in results.items():
            rows.append(
                [
                    label,
                    statistics.median(v["first_step_s"] for v in values),
                    min(v["first_step_s"] for v in values),
                    statistics.median(v["compilations"] for v in values),
                    statistics.median(v["compile_s"] for v in values),
                ]
            )
    headers = ["run", "first step after (s, median)", "min (s)", "XLA programs before it", "their compile/load (s)"]
    text = table(headers, rows)
    print(text)
    if args.no_write:
        return
    import jax  # noqa: F401  (machine_line reads the backend)

    write_section(
        "startup",
        f"""## Start-up: time to the first train step (`scripts/bench_startup.py`)

{machine_line(["flax", "optax", "hydra-core"])}

`scripts/train.py` with the default run (synthetic data, HPS MLP of 13,255 parameters, M-SVAG; `{" ".join(OVERRIDES)}`),
one fresh process per measurement, timed from its launch to the end of its first train step (Python start and
imports included), {args.repeats} repeats per row (interleaved). XLA programs: `jax.monitoring` backend-compile
events before that step (compiled, or read from the cache when warm) and their summed time. Cache:
`trainer.compilation_cache_dir` (`null`, an empty folder, then that folder again).
Load average (1 min) at the start and end of the measurements: {load_before:.1f}, {os.getloadavg()[0]:.1f} (other
processes share the cores: compare rows of one run only).

{text}
""",
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
