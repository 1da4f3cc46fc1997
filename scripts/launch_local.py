"""Start N local JAX processes of ``scripts/train.py`` that train as one multi-process job (gloo collectives on CPU).

    python scripts/launch_local.py --num-processes 2 -- trainer=tiny seed=1

Each process gets ``--devices-per-process`` fake CPU devices (``JAX_NUM_CPU_DEVICES``) and the
``parallel.distributed.*`` overrides that make ``corrjax.train`` call ``jax.distributed.initialize`` with a
coordinator on a free loopback port. All processes share one run directory (``hydra.run.dir``, decided here unless
given, and re-broadcast from process 0 by the loop); only process 0 writes metrics, summary and plots, and only its
output is shown (the others' goes to ``launch_local.<i>.log`` in the run dir and is printed if it fails). With the same
global batch (``trainer.batch_size``) the result equals a one-process run on the same total number of devices.

If one process fails, the others are killed and the exit status is 1. A signal that reaches only some processes stops
all of them on one step with a checkpoint (the loop agrees on it at its logging steps); they exit with 128 + the
signal, and so does the launcher. Ctrl-C or SIGTERM to the launcher is passed on to every process as SIGTERM (each
finishes its step and saves a checkpoint, as a single run does), the launcher waits for them and exits with 128 + the
signal; a second Ctrl-C or SIGTERM kills them at once. On Linux the processes also get SIGTERM if the launcher itself
dies. After ``--timeout`` seconds they are killed and the status is 124.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# Exit statuses of a run stopped by SIGINT/SIGTERM after saving a checkpoint (scripts/train.py: 128 + the signal).
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the launcher dies (no orphans after a SIGKILL)."""
    try:
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: nothing to do
        pass


class _Signals:
    """Records SIGINT/SIGTERM sent to the launcher instead of dying at once (and leaving the processes behind)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, lambda signum, frame: self.received.append(signum))
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


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
    procs: list[subprocess.Popen] = []
    logs = []
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    timed_out = False
    with _Signals() as signals:
        try:
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
                    out = {"stdout": log, "stderr": subprocess.STDOUT}
                else:
                    out = {}
                procs.append(subprocess.Popen(cmd, env=env, preexec_fn=preexec, **out))
            deadline = time.monotonic() + args.timeout
            forwarded = 0
            while None in [p.poll() for p in procs]:  # poll every process (any() would stop at the first)
                if len(signals.received) > forwarded:
                    # First signal: every process stops after its step with a checkpoint; a second: kill them.
                    sig = signal.SIGTERM if forwarded == 0 else signal.SIGKILL
                    forwarded = len(signals.received)
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(sig)
                # A process that exits with 128 + SIGINT/SIGTERM stopped on a signal with a checkpoint; the others
                # stop on the same step (the loop agrees on it), so they are waited for, not killed.
                failed = [p for p in procs if p.returncode not in (None, 0, *STOPPED)]
                if time.monotonic() > deadline:
                    timed_out = True
                if (failed and not signals.received) or timed_out:
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            for log in logs:
                log.close()
    codes = [p.returncode for p in procs]
    for i, c in enumerate(codes):
        if c != 0 and i > 0:
            sys.stderr.write(f"--- process {i} (exit {c}) ---\n" + (run_dir / f"launch_local.{i}.log").read_text())
    if signals.received:
        sys.stderr.write(f"launch_local: stopped by {signal.Signals(signals.received[0]).name}; exit codes {codes}\n")
        return 128 + signals.received[0]
    if timed_out:
        sys.stderr.write(f"launch_local: killed after --timeout {args.timeout:g} s; exit codes {codes}\n")
        return 124
    if len(set(codes)) == 1 and codes[0] in STOPPED:
        sys.stderr.write(f"launch_local: the processes stopped on a signal with a checkpoint; exit codes {codes}\n")
        return codes[0]
    if any(codes):
        sys.stderr.write(f"launch_local: exit codes {codes}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
