"""Start N local JAX processes of ``scripts/train.py`` that train as one multi-process job (gloo collectives on CPU).

    python scripts/launch_local.py --num-processes 2 -- trainer=tiny seed=1

Each process gets ``--devices-per-process`` fake CPU devices (``JAX_NUM_CPU_DEVICES``) and the
``parallel.distributed.*`` overrides that make ``corrjax.train`` call ``jax.distributed.initialize`` with a
coordinator on a free loopback port. All processes share one run directory (``hydra.run.dir``, decided here unless
given, and re-broadcast from process 0 by the loop); only process 0 writes metrics, summary and plots, and only its
output is shown (the others' goes to ``launch_local.<i>.log`` in the run dir and is printed if it fails). With the same
global batch (``trainer.batch_size``) the result equals a one-process run on the same total number of devices.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the processes are killed")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for scripts/train.py (after --)")
    args = parser.parse_args(argv)
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num-processes and --devices-per-process must be >= 1")
    overrides = list(args.overrides)
    run_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    if run_dirs:
        run_dir = Path(run_dirs[-1])
    else:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = Path("outputs") / "launch_local" / stamp
        overrides.append(f"hydra.run.dir={run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    procs, logs = [], []
    for i in range(args.num_processes):
        env = dict(os.environ)
        env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(args.devices_per_process))
        env["XLA_FLAGS"] = " ".join(
            f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
        )
        cmd = [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            *overrides,
            "parallel.distributed.enabled=true",
            f"parallel.distributed.coordinator_address={address}",
            f"parallel.distributed.num_processes={args.num_processes}",
            f"parallel.distributed.process_id={i}",
        ]
        if i > 0:
            cmd += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "trainer.progress=false"]
            log = (run_dir / f"launch_local.{i}.log").open("w")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        else:
            procs.append(subprocess.Popen(cmd, env=env))
    deadline = time.monotonic() + args.timeout
    codes: list[int | None] = [None] * len(procs)
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = p.poll()
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            break
        time.sleep(0.2)
    for log in logs:
        log.close()
    codes = [p.returncode for p in procs]
    for i, c in enumerate(codes):
        if c != 0 and i > 0:
            sys.stderr.write(f"--- process {i} (exit {c}) ---\n" + (run_dir / f"launch_local.{i}.log").read_text())
    if any(codes):
        sys.stderr.write(f"launch_local: exit codes {codes}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
