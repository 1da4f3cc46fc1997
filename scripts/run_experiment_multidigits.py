"""Multi-task aggregators on the built-in multidigits set, with single-task baselines and LibMTL's Delta_m%.

    python scripts/run_experiment_multidigits.py [--mtl ew pcgrad mgda upgrad] [--seeds 0 1 2] [--steps 600]

Runs two local Hydra multiruns of ``experiment=multidigits_mtl``: the single-task baselines (``tasks=[left]``,
``tasks=[right]``) and the aggregators (both tasks), then ``scripts/compare.py`` on the second with the first as the
baseline: accuracy per task, mean +- std over seeds, and Delta_m%. Output: ``comparison.{md,json,png}`` in the
aggregator sweep's folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_dirs import new_sweep_dir

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mtl", nargs="+", default=["ew", "pcgrad", "mgda", "upgrad"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    base = new_sweep_dir(ROOT / "multirun" / "multidigits_mtl")
    seeds = f"seed={','.join(map(str, args.seeds))}"
    extra = [*args.overrides] + ([f"trainer.max_steps={args.steps}"] if args.steps else [])
    train = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "experiment=multidigits_mtl"]
    stl = [*train, "tasks=[left],[right]", seeds, f"hydra.sweep.dir={base / 'stl'}", *extra]
    subprocess.run(stl, check=True, cwd=ROOT)
    mtl = [*train, f"mtl={','.join(args.mtl)}", seeds, f"hydra.sweep.dir={base / 'mtl'}", *extra]
    subprocess.run(mtl, check=True, cwd=ROOT)
    compare = [
        sys.executable,
        str(ROOT / "scripts" / "compare.py"),
        str(base / "mtl"),
        "--baseline-dir",
        str(base / "stl"),
    ]
    return subprocess.run([*compare, "--metrics", "accuracy"], check=True, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
