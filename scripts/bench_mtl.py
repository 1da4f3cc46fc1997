"""Benchmark of corrjax.mtl training steps vs a summed-loss step, TorchJD and LibMTL (section "mtl" of BENCHMARKS.md).

Every JAX step is one jitted function (forward, task gradients, aggregator, SGD update, donated parameters) on a shared
trunk with ``T`` linear regression heads: an MLP (256 x 128 -> 256 -> 256 -> 128) and a small CNN (64 x 16 x 16 x 3,
three 3x3 convolutions, dense 128). Exact per-task gradients cost at least one forward plus ``T`` backward passes,
``(1 + 2T) / 3`` summed-loss steps in FLOPs; that bound is printed next to every measurement.

The PyTorch side runs in the same process on the same data and architecture: TorchJD (``mtl_backward`` +
``jac_to_grad``) and LibMTL's weighting classes (``LibMTL.weighting.*``, the real code, driven by a minimal harness in
place of LibMTL's Trainer: ``T`` backward passes with ``retain_graph``, then the method). LibMTL 1.1.5 is on PyPI but
its package ``__init__`` imports torchvision; install it with ``pip install --no-deps LibMTL==1.1.5`` and this script
loads ``LibMTL.weighting`` without the package ``__init__``. If it is missing, the LibMTL columns are left out.

    .venv/bin/python scripts/bench_mtl.py            # full run, rewrites the "mtl" section of BENCHMARKS.md
    .venv/bin/python scripts/bench_mtl.py --quick    # T=8 only, fewer repeats, prints without writing
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import logging
import os
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

import corrjax.mtl as mtl

logger = logging.getLogger("bench_mtl")

BATCH = {"mlp": 256, "cnn": 64}
MLP_WIDTHS = (128, 256, 256, 128)
CNN_CHANNELS = (3, 16, 32, 32)  # 16x16 -> 16x16 -> 8x8 -> 4x4
CNN_FEATURES = 128
LR = 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# JAX model: plain functions on a params dict {"trunk": ..., "heads": {"w": (F, T), "b": (T,)}}.


def _dense_init(key, d_in, d_out):
    return {"w": jax.random.normal(key, (d_in, d_out)) * np.sqrt(2.0 / d_in), "b": jnp.zeros(d_out)}


def init_params(arch: str, num_tasks: int, seed: int = 0) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(seed), 8)
    if arch == "mlp":
        trunk = [_dense_init(keys[i], a, b) for i, (a, b) in enumerate(itertools.pairwise(MLP_WIDTHS))]
        feat = MLP_WIDTHS[-1]
    else:
        trunk = []
        for i, (a, b) in enumerate(itertools.pairwise(CNN_CHANNELS)):
            trunk.append({"w": jax.random.normal(keys[i], (3, 3, a, b)) * np.sqrt(2.0 / (9 * a)), "b": jnp.zeros(b)})
        trunk.append(_dense_init(keys[5], 4 * 4 * CNN_CHANNELS[-1], CNN_FEATURES))
        feat = CNN_FEATURES
    heads = {"w": jax.random.normal(keys[6], (feat, num_tasks)) / np.sqrt(feat), "b": jnp.zeros(num_tasks)}
    return {"trunk": trunk, "heads": heads}


def trunk_fn(arch: str) -> Callable[[Any, jax.Array], jax.Array]:
    if arch == "mlp":

        def mlp(tp, x):
            for layer in tp:
                x = jax.nn.relu(x @ layer["w"] + layer["b"])
            return x

        return mlp

    def cnn(tp, x):
        for layer, stride in zip(tp[:3], (1, 2, 2), strict=True):
            x = jax.lax.conv_general_dilated(
                x, layer["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            x = jax.nn.relu(x + layer["b"])
        # Flatten channel-major, as torch's NCHW flatten does, so both sides hold the same dense layer.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return jax.nn.relu(x @ tp[3]["w"] + tp[3]["b"])

    return cnn


def heads_fn(hp, z, y):
    """``(T,)`` mean squared errors of the ``T`` linear heads."""
    return jnp.mean((z @ hp["w"] + hp["b"] - y) ** 2, axis=0)


def make_data(arch: str, num_tasks: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = BATCH[arch]
    x = rng.standard_normal((n, MLP_WIDTHS[0]) if arch == "mlp" else (n, 16, 16, 3)).astype(np.float32)
    y = rng.standard_normal((n, num_tasks)).astype(np.float32)
    return x, y


# ----------------------------------------------------------------------------------------------------------------------
# JAX steps.

SHARED = {"trunk": True, "heads": False}


class _RepInit(NamedTuple):
    """Marks a rep-grad step, whose state holds the aggregator's state (over the features) and the SGD state."""

    aggregator: Any


def jax_steps(arch: str, num_tasks: int, methods: dict[str, Callable[[], Any]], rep_methods: dict[str, Any]):
    """Returns ``{name: (step, state0)}``; each ``step(state, x, y) -> state`` is jitted with the state donated."""
    trunk = trunk_fn(arch)
    losses_fn = lambda p, x, y: heads_fn(p["heads"], trunk(p["trunk"], x), y)
    sgd = optax.sgd(LR)
    steps: dict[str, Any] = {}

    def summed(state, x, y):
        params, opt = state
        grads = jax.grad(lambda p: jnp.sum(losses_fn(p, x, y)))(params)
        upd, opt = sgd.update(grads, opt, params)
        return optax.apply_updates(params, upd), opt

    steps["summed loss"] = (summed, sgd)

    vtg = mtl.value_and_task_grad(losses_fn, shared=SHARED)
    for name, factory in methods.items():
        tx = optax.chain(mtl.shared_only(factory(), SHARED), sgd)

        def step(state, x, y, tx=tx):
            params, opt = state
            losses, grads = vtg(params, x, y)
            upd, opt = tx.update(grads, opt, params, task_losses=losses)
            return optax.apply_updates(params, upd), opt

        steps[name] = (step, tx)

    # The naive step: the full Jacobian with jax.jacrev (heads included, T times), then PCGrad.
    naive_tx = optax.chain(mtl.pcgrad(), sgd)

    def naive(state, x, y):
        params, opt = state
        losses = losses_fn(params, x, y)
        grads = jax.jacrev(losses_fn)(params, x, y)
        upd, opt = naive_tx.update(grads, opt, params, task_losses=losses)
        return optax.apply_updates(params, upd), opt

    steps["naive jacrev + pcgrad"] = (naive, naive_tx)

    # PCGrad with all T pullbacks in one vmap (the accelerator default) instead of the CPU default of one at a time.
    vtg_batched = mtl.value_and_task_grad(losses_fn, shared=SHARED, task_batch_size=num_tasks)
    batched_tx = optax.chain(mtl.shared_only(mtl.pcgrad(), SHARED), sgd)

    def batched(state, x, y):
        params, opt = state
        losses, grads = vtg_batched(params, x, y)
        upd, opt = batched_tx.update(grads, opt, params, task_losses=losses)
        return optax.apply_updates(params, upd), opt

    steps["pcgrad, T-batched pullback"] = (batched, batched_tx)

    vrg = mtl.value_and_rep_grad(lambda tp, x, y: trunk(tp, x), lambda hp, z, x, y: heads_fn(hp, z, y))
    for name, factory in rep_methods.items():
        agg = factory()

        def rstep(state, x, y, agg=agg):
            params, (agg_state, opt) = state
            losses, rg = vrg(params["trunk"], params["heads"], x, y)
            dz, agg_state = agg.update(rg.rep, agg_state, None, task_losses=losses)
            grads = {"trunk": rg.pullback(dz), "heads": rg.heads}
            upd, opt = sgd.update(grads, opt, params)
            return optax.apply_updates(params, upd), (agg_state, opt)

        steps[f"rep-grad {name}"] = (rstep, _RepInit(agg))
    return steps


def prepare_jax(arch: str, num_tasks: int, step, tx) -> Callable[[], Any]:
    """Compiles ``step`` (state donated), runs it once, and returns a zero-argument call that advances the state."""
    params = init_params(arch, num_tasks)
    x, y = (jnp.asarray(a) for a in make_data(arch, num_tasks))
    if isinstance(tx, _RepInit):  # rep-grad: (aggregator state over the representation, SGD state)
        z = trunk_fn(arch)(params["trunk"], x)
        state = (params, (tx.aggregator.init(z), optax.sgd(LR).init(params)))
    else:
        state = (params, tx.init(params))
    jitted = jax.jit(step, donate_argnums=0)
    box = [benchlib.block(jitted(state, x, y))]  # compile + warm up

    def run():
        box[0] = jitted(box[0], x, y)
        return box[0]

    return run


def paired_min(run_a: Callable[[], Any], run_b: Callable[[], Any], repeats: int, min_time: float = 0.03):
    """Per-call ``(cpu_a, cpu_b, wall_a, wall_b)`` seconds: minima over alternating blocks of calls.

    ``cpu`` is the process CPU time (``time.process_time``), which on a shared, oversubscribed machine measures the
    work a step does rather than how long it waited for a core; both runtimes run single-threaded (see ``main``), so
    CPU time is also the fair comparison. ``wall`` is reported alongside.
    """
    inner = []
    for fn in (run_a, run_b):
        benchlib.block(fn())
        t0 = time.process_time()
        benchlib.block(fn())
        inner.append(max(1, int(min_time / max(time.process_time() - t0, 1e-6))))
    cpu = [float("inf"), float("inf")]
    wall = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((run_a, run_b)):
            gc.collect()
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(inner[i]):
                benchlib.block(fn())
            cpu[i] = min(cpu[i], (time.process_time() - c0) / inner[i])
            wall[i] = min(wall[i], (time.perf_counter() - w0) / inner[i])
    return cpu[0], cpu[1], wall[0], wall[1]


# ----------------------------------------------------------------------------------------------------------------------
# PyTorch: the same model, TorchJD and LibMTL steps.


def torch_model(arch: str, num_tasks: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if arch == "mlp":
        layers = []
        for a, b in itertools.pairwise(MLP_WIDTHS):
            layers += [nn.Linear(a, b), nn.ReLU()]
        trunk = nn.Sequential(*layers)
        feat = MLP_WIDTHS[-1]
    else:
        c = CNN_CHANNELS
        trunk = nn.Sequential(
            nn.Conv2d(c[0], c[1], 3, 1, 1), nn.ReLU(),
            nn.Conv2d(c[1], c[2], 3, 2, 1), nn.ReLU(),
            nn.Conv2d(c[2], c[3], 3, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 4 * c[3], CNN_FEATURES), nn.ReLU(),
        )  # fmt: skip
        feat = CNN_FEATURES
    heads = nn.ModuleList([nn.Linear(feat, 1) for _ in range(num_tasks)])
    return trunk, heads


def torch_data(arch: str, num_tasks: int):
    import torch

    x, y = make_data(arch, num_tasks)
    if arch == "cnn":
        x = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    return torch.from_numpy(x), torch.from_numpy(y)


def _torch_losses(trunk, heads, x, y):
    z = trunk(x)
    return z, [((h(z)[:, 0] - y[:, t]) ** 2).mean() for t, h in enumerate(heads)]


def torch_summed_step(arch, num_tasks):
    import torch

    trunk, heads = torch_model(arch, num_tasks)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=LR)
    x, y = torch_data(arch, num_tasks)

    def step():
        opt.zero_grad()
        _, losses = _torch_losses(trunk, heads, x, y)
        torch.stack(losses).sum().backward()
        opt.step()

    return step


def torchjd_step(arch, num_tasks, aggregator):
    import torch
    from torchjd.autojac import jac_to_grad, mtl_backward

    trunk, heads = torch_model(arch, num_tasks)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=LR)
    x, y = torch_data(arch, num_tasks)

    def step():
        opt.zero_grad()
        z, losses = _torch_losses(trunk, heads, x, y)
        mtl_backward(losses, features=z)
        jac_to_grad(list(trunk.parameters()), aggregator)
        opt.step()

    return step


def torchjd_autogram_step(arch, num_tasks, weighting):
    """TorchJD's Gramian engine: the trunk's Gramian without its Jacobian, weights, then one weighted backward.

    The losses are per task (means over the batch), so the engine runs with ``batch_dim=None``. The weighted backward
    also scales each head's gradient by its weight; the heads then get their own task gradient from a second, head-only
    backward on the detached features (a few small matmuls), as ``mtl_backward`` gives them.
    """
    import torch
    from torchjd.autogram import Engine

    trunk, heads = torch_model(arch, num_tasks)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=LR)
    x, y = torch_data(arch, num_tasks)
    engine = Engine(trunk, batch_dim=None)

    def step():
        opt.zero_grad()
        z, losses = _torch_losses(trunk, heads, x, y)
        losses = torch.stack(losses)
        losses.backward(weighting(engine.compute_gramian(losses)))
        heads.zero_grad()
        torch.stack(_torch_losses(torch.nn.Identity(), heads, z.detach(), y)[1]).sum().backward()
        opt.step()

    return step


def load_libmtl_weighting() -> types.ModuleType | None:
    """``LibMTL.weighting`` without running ``LibMTL/__init__`` (which imports torchvision); None if not installed."""
    spec = importlib.util.find_spec("LibMTL") if "LibMTL" not in sys.modules else None
    if spec is None and "LibMTL" not in sys.modules:
        return None
    if "LibMTL" not in sys.modules:
        pkg = types.ModuleType("LibMTL")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = pkg
    import LibMTL.weighting as weighting

    return weighting


def libmtl_step(arch, num_tasks, method_cls, kwargs):
    import torch

    trunk, heads = torch_model(arch, num_tasks)

    class Harness(method_cls):
        """The attributes LibMTL's Trainer/AbsArchitecture provide to a weighting (shared encoder, task count)."""

        def __init__(self):
            super().__init__()
            self.encoder, self.decoders = trunk, heads
            self.task_num, self.device, self.rep_grad, self.epoch = num_tasks, torch.device("cpu"), False, 0
            self.task_name = [f"t{i}" for i in range(num_tasks)]
            self.train_loss_buffer = np.ones((num_tasks, 2))
            self.init_param()

        def get_share_params(self):
            return self.encoder.parameters()

        def zero_grad_share_params(self):
            self.encoder.zero_grad(set_to_none=False)

    harness = Harness()
    opt = torch.optim.SGD(harness.parameters(), lr=LR)
    x, y = torch_data(arch, num_tasks)

    def step():
        opt.zero_grad(set_to_none=False)
        _, losses = _torch_losses(trunk, heads, x, y)
        harness.backward(torch.stack(losses), **kwargs)
        opt.step()

    return step


# ----------------------------------------------------------------------------------------------------------------------
# The run.

FULL_METHODS: dict[str, Callable[[int], Any]] = {
    "mean": lambda t: mtl.mean(),
    "pcgrad": lambda t: mtl.pcgrad(),
    "mgda": lambda t: mtl.mgda(),
    "upgrad": lambda t: mtl.upgrad(),
    "dualproj": lambda t: mtl.dualproj(),
    "cagrad": lambda t: mtl.cagrad(0.4),
    "imtl_g": lambda t: mtl.imtl_g(),
    "nash_mtl": lambda t: mtl.nash_mtl(),
    "aligned_mtl": lambda t: mtl.aligned_mtl(),
    "gradvac": lambda t: mtl.gradvac(num_tasks=t),
    "graddrop": lambda t: mtl.graddrop(),
    "rlw": lambda t: mtl.rlw(),
}
SWEEP_METHODS = ("pcgrad", "mgda", "upgrad")
TARGETS = {"pcgrad": 1.3, "mgda": 1.3, "upgrad": 1.4}  # x the (1 + 2T)/3 bound at T = 8


def weighting_methods() -> dict[str, Callable[[int], Any]]:
    return {
        "uncertainty_weighting": lambda t: mtl.uncertainty_weighting(t),
        "dwa": lambda t: mtl.dwa(t),
        "famo": lambda t: mtl.famo(t),
        "geometric_mean": lambda t: mtl.geometric_mean(t),
        "gradnorm": lambda t: mtl.gradnorm(t),
    }


def available(methods: dict[str, Callable[[int], Any]], t: int) -> dict[str, Callable[[], Any]]:
    """The methods that corrjax.mtl provides at this commit, as zero-argument factories for ``T = t``."""
    out = {}
    for name, factory in methods.items():
        try:
            factory(t)
        except AttributeError:
            logger.warning("corrjax.mtl has no %s yet; skipped", name)
            continue
        out[name] = lambda factory=factory: factory(t)
    return out


def torch_peers(num_tasks: int, full: bool) -> dict[str, tuple[str, Callable[[str, int], Callable[[], None]]]]:
    """``{row name: (peer, factory(arch, T) -> step)}`` for the peers that import here."""
    peers: dict[str, Any] = {}
    try:
        from torchjd import aggregation as A

        jd = {"mean": A.Mean, "pcgrad": A.PCGrad, "mgda": A.MGDA, "upgrad": A.UPGrad}
        if full:
            jd.update({"dualproj": A.DualProj, "imtl_g": A.IMTLG, "aligned_mtl": A.AlignedMTL, "graddrop": A.GradDrop})
            jd["gradvac"] = A.GradVac
        for name, cls in jd.items():
            peers[f"TorchJD {name}"] = (name, lambda arch, t, cls=cls: torchjd_step(arch, t, cls()))
        if full:  # TorchJD's other engine, for the Gramian-based methods of the T sweep
            gram = {"pcgrad": A.PCGradWeighting, "mgda": A.MGDAWeighting, "upgrad": A.UPGradWeighting}
            for name, cls in gram.items():
                peers[f"TorchJD autogram {name}"] = (
                    name,
                    lambda arch, t, cls=cls: torchjd_autogram_step(arch, t, cls()),
                )
    except ImportError as e:  # pragma: no cover
        logger.warning("torchjd unavailable: %s", e)
    w = load_libmtl_weighting()
    if w is not None:
        # LibMTL's EW weights the losses and runs one backward: compare it with the rep-grad mean step.
        lib = {"rep-grad mean": (w.EW, {}), "pcgrad": (w.PCGrad, {}), "mgda": (w.MGDA, {"mgda_gn": "none"})}
        if full:
            lib.update(
                {
                    "cagrad": (w.CAGrad, {"calpha": 0.4, "rescale": 1}),
                    "imtl_g": (w.IMTL, {}),
                    "gradvac": (w.GradVac, {"beta": 0.5}),
                    # Loss weightings: LibMTL weights the losses and runs one backward, like our rep-grad rows.
                    "rep-grad uncertainty_weighting": (w.UW, {}),
                    "rep-grad geometric_mean": (w.GLS, {}),
                }
            )
        for name, (cls, kw) in lib.items():
            peers[f"LibMTL {name}"] = (name, lambda arch, t, cls=cls, kw=kw: libmtl_step(arch, t, cls, kw))
    return peers


def bound(t: int) -> float:
    return (1 + 2 * t) / 3


def run(archs, tasks, repeats, full_at):
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    results = []  # (arch, T, name, seconds, summed-loss seconds timed alongside)
    torch_results = []  # (arch, T, peer row, method, peer seconds, JAX seconds of the same method timed alongside)
    for arch in archs:
        for t in tasks:
            full = t == full_at
            methods = available(FULL_METHODS if full else {k: FULL_METHODS[k] for k in SWEEP_METHODS}, t)
            if full:
                methods.update(available(weighting_methods(), t))
            rep = available(
                {k: FULL_METHODS[k] for k in (("mean", "mgda", "upgrad") if full else ("mgda", "upgrad"))}, t
            )
            if full:
                rep.update(available({k: v for k, v in weighting_methods().items() if k != "gradnorm"}, t))
            steps = jax_steps(arch, t, methods, rep)
            base_run = prepare_jax(arch, t, *steps.pop("summed loss"))
            runs = {"summed loss": base_run}
            bases = []
            for name, (step, tx) in steps.items():
                runs[name] = prepare_jax(arch, t, step, tx)
                base, sec, _, wall = paired_min(base_run, runs[name], repeats)
                bases.append(base)
                results.append((arch, t, name, sec, base, wall))
                rel = sec / base
                print(f"{arch} T={t:2d} {name:28s} {sec * 1e3:8.2f} ms  {rel:5.2f}x summed ({base * 1e3:.2f} ms), "
                      f"{rel / bound(t):4.2f}x bound {bound(t):.2f}", flush=True)  # fmt: skip
            base_wall = paired_min(base_run, base_run, 3)[2]
            results.insert(len(results) - len(bases), (arch, t, "summed loss", min(bases), min(bases), base_wall))
            peers = {"PyTorch summed loss": ("summed loss", lambda arch, t: torch_summed_step(arch, t))}
            peers.update(torch_peers(t, full))
            for row, (method, factory) in peers.items():
                if method not in runs:
                    continue
                try:
                    peer_run = factory(arch, t)
                    jax_sec, sec, _, _ = paired_min(runs[method], peer_run, repeats)
                except Exception as e:  # a peer failing (e.g. a missing optional solver) is reported, not fatal
                    logger.warning("%s failed at %s T=%d: %s", row, arch, t, e)
                    continue
                torch_results.append((arch, t, row, method, sec, jax_sec))
                print(f"{arch} T={t:2d} {row:28s} {sec * 1e3:8.2f} ms  ({sec / jax_sec:.1f}x the JAX step)", flush=True)
            del runs, base_run
    return results, torch_results


NOTES = """
With the machine oversubscribed, wall time mostly measures waiting for a core, so both runtimes run single-threaded
(XLA without its Eigen thread pool, `torch.set_num_threads(1)`, the process pinned to one core) and the tables report
the process CPU time of one whole training step (forward, task gradients, aggregation, SGD update): the minimum over
alternating blocks in which each row is timed next to its reference (the summed-loss step, or the JAX step of the same
method for the peers); wall-clock minima are given alongside. Ratios are what matter. `bound` = (1 + 2T)/3, the FLOP
cost of exact per-task gradients in summed-loss steps (backward = 2 forward; the CNN's first layer needs no input
gradient, so its true bound is lower); `/bound` = (step / summed) / bound. JAX rows use
`value_and_task_grad(shared=...)` with its CPU default (the T one-hot pullbacks one after another in the same program)
+ `shared_only(aggregator)` (heads outside the Jacobian) unless marked: `T-batched pullback` pulls the T cotangents
back in one `vmap` (`task_batch_size=T`, the accelerator default; XLA's CPU runtime runs the T-batched convolution
backward slowly); `naive jacrev` differentiates everything with `jax.jacrev` and applies PCGrad; `rep-grad` aggregates
the gradient w.r.t. the shared features (`value_and_rep_grad`) and pulls it back with one VJP, which is exact for the
loss weightings. LibMTL rows run LibMTL 1.1.5's own weighting classes (T `backward(retain_graph=True)` passes, then
the method) in a minimal harness in place of its Trainer; TorchJD rows use `mtl_backward` + `jac_to_grad`. TorchJD's
CAGrad and Nash-MTL need cvxpy (not installed) and are absent, as is Nash-MTL in LibMTL 1.1.5. Both runtimes allocate
from a heap that glibc is told to keep (`benchlib.keep_freed_memory`): in a fresh process TorchJD's CNN step at T = 8
otherwise takes 55-60 ms instead of 36 ms, its Jacobian buffers taking ~11k page faults per step.
"""

HEADERS = [
    "T",
    "step",
    "JAX CPU ms",
    "JAX wall ms",
    "x summed",
    "bound",
    "/bound",
    "PyTorch+TorchJD (JAX speed-up)",
    "PyTorch+LibMTL (JAX speed-up)",
]


def core_peak_gflops(size: int = 1024, repeats: int = 20) -> float:
    """This core's float32 GEMM rate (single-threaded XLA and torch, the faster), GFLOP/s."""
    import torch

    a = jnp.ones((size, size), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    ta = torch.ones(size, size)
    best = float("inf")
    for fn in (lambda: mm(a, a).block_until_ready(), lambda: torch.mm(ta, ta)):
        fn()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


FLOOR_HEADERS = [
    "trunk",
    "T",
    "step MFLOP",
    "floor at peak (ms)",
    "JAX ms",
    "JAX % of peak",
    "TorchJD ms",
    "TorchJD % of peak",
    "2x TorchJD needs (ms)",
    "2x needs % of peak",
]


def flop_floor(results, torch_results, archs, t: int = 8) -> str:
    """How fast a PCGrad step could be at this core's GEMM peak, next to the 2x-TorchJD target."""
    peak = core_peak_gflops()
    rows, needs = [], {}
    for arch in archs:
        step, tx = jax_steps(arch, t, {"pcgrad": mtl.pcgrad}, {})["pcgrad"]
        params = init_params(arch, t)
        x, y = (jnp.asarray(a) for a in make_data(arch, t))
        cost = jax.jit(step).lower((params, tx.init(params)), x, y).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost["flops"])
        ours = [r[3] for r in results if r[0] == arch and r[1] == t and r[2] == "pcgrad"]
        peer = [r[4] for r in torch_results if r[0] == arch and r[1] == t and r[2] == "TorchJD pcgrad"]
        if not ours or not peer:
            continue
        floor = flops / (peak * 1e9)
        needs[arch] = floor / (peer[0] / 2)
        rows.append(
            [arch.upper(), t, f"{flops / 1e6:.0f}", f"{floor * 1e3:.2f}", f"{ours[0] * 1e3:.2f}",
             f"{floor / ours[0]:.0%}", f"{peer[0] * 1e3:.2f}", f"{floor / peer[0]:.0%}", f"{peer[0] / 2 * 1e3:.2f}",
             f"{needs[arch]:.0%}"]
        )  # fmt: skip
    verdicts = []
    for arch, need in needs.items():
        if need >= 0.9:
            verdicts.append(
                f"on the {arch.upper()} a 2x step would have to run at {need:.0%} of the core's GEMM peak from start "
                "to end, memory-bound work (activations, masks, the stacking of the task gradients) included, which no "
                "exact implementation does on this CPU"
            )
        else:
            verdicts.append(f"on the {arch.upper()} it needs {need:.0%} of the peak")
    rep = [s / js for _, _, r, _, s, js in torch_results if r.startswith("LibMTL rep-grad")]
    return "\n".join(
        [
            f"### What a 2x-faster-than-TorchJD step would need (T = {t}, PCGrad)",
            "",
            f"This core's float32 GEMM peak, measured in the same run (single-threaded XLA and torch, the faster): "
            f"{peak:.0f} GFLOP/s. Step FLOPs from XLA's `cost_analysis` of the compiled JAX step (forward, T "
            "pullbacks, aggregation, update); `% of peak` = the time those FLOPs take at the peak / the step time.",
            "",
            benchlib.table(FLOOR_HEADERS, rows),
            "",
            "Exact per-task gradients cost one forward and T backward passes whatever the framework, so no step runs "
            "faster than its FLOPs at the core's peak: " + "; ".join(verdicts) + ". On the CNN the limit is XLA's "
            "CPU convolution kernels, which run well below the GEMM peak (PyTorch's oneDNN summed-loss step is about "
            "as fast as XLA's; XLA's oneDNN, XNNPACK and YNNPACK flags measured no faster); the aggregation itself "
            "adds little (compare the `/bound` column). A profile of the T = 8 PCGrad steps (jax.profiler read with "
            "xprof, 2026-11-21) puts ~80% of the MLP step in matmuls at ~90 GFLOP/s and the rest in layout copies of "
            "the cotangents and the stacking of the task gradients; in the CNN step, a third of the time goes to the "
            "stride-2 layers' input gradients, which XLA runs as lhs-dilated convolutions (~48 GFLOP/s), 13% to "
            "layout transposes before the weight-gradient convolutions and 5% to the 3-channel first convolution "
            "(~10 GFLOP/s)."
            + (
                f" Rep-grad mode, which needs one backward pass, is {min(rep):.1f}-{max(rep):.1f}x LibMTL's rep-grad "
                "steps."
                if rep
                else ""
            ),
            "",
        ]
    )


def autogram_table(torch_results) -> str:
    """TorchJD's two engines side by side (the main tables' TorchJD column is ``autojac``); '' if not measured."""
    rows = []
    for arch, t, row, method, sec, jax_sec in torch_results:
        if not row.startswith("TorchJD autogram"):
            continue
        jac = [s for a, tt, r, m, s, _ in torch_results if (a, tt, r) == (arch, t, f"TorchJD {method}")]
        rows.append(
            [arch.upper(), t, method, f"{jac[0] * 1e3:.2f}" if jac else "", f"{sec * 1e3:.2f}",
             f"{sec / jac[0]:.2f}" if jac else "", f"{jax_sec * 1e3:.2f}", f"{sec / jax_sec:.1f}x"]
        )  # fmt: skip
    if not rows:
        return ""
    headers = ["trunk", "T", "method", "autojac ms", "autogram ms", "autogram / autojac", "JAX ms", "JAX speed-up"]
    return "\n".join(
        [
            "### TorchJD's engines: autojac (the Jacobian) and autogram (its Gramian only)",
            "",
            "`autogram.Engine(trunk, batch_dim=None)` (the losses are per task, not per example) computes the trunk's "
            "Gramian layer by layer without storing the Jacobian, then `losses.backward(weights)`; "
            "`JAX speed-up` = autogram step / the JAX step timed alongside. The tables above use autojac.",
            "",
            benchlib.table(headers, rows),
            "",
        ]
    )


def render(results, torch_results, full_at, load: str) -> str:
    out = [
        "## corrjax.mtl: multi-task steps",
        "",
        benchlib.machine_line(["optax", "torch", "torchjd", "LibMTL"]),
        "",
        f"Load during the run (the 2 cores are shared): {load}. " + " ".join(NOTES.split()),
        "",
    ]
    for arch in dict.fromkeys(a for a, *_ in results):
        tasks = sorted({t for a, t, *_ in results if a == arch})
        rows = []
        for t in tasks:
            for a, tt, name, sec, paired_base, wall in results:
                if a != arch or tt != t:
                    continue
                rel = sec / paired_base  # against the summed-loss step timed alongside this row
                peer_cells = []
                for lib in ("TorchJD", "LibMTL"):
                    match = [(r, s, js) for a2, t2, r, m, s, js in torch_results
                             if a2 == arch and t2 == t and r.startswith(lib) and m == name
                             and not r.startswith("TorchJD autogram")]  # fmt: skip
                    if not match:
                        peer_cells.append("")
                    else:
                        peer_cells.append(f"{match[0][1] * 1e3:.2f} ms ({match[0][1] / match[0][2]:.1f}x)")
                if name == "summed loss":
                    tsum = [(s, js) for a2, t2, r, m, s, js in torch_results
                            if a2 == arch and t2 == t and r.startswith("PyTorch")]  # fmt: skip
                    peer_cells = [f"{tsum[0][0] * 1e3:.2f} ms ({tsum[0][0] / tsum[0][1]:.1f}x)" if tsum else "", ""]
                target = TARGETS.get(name) if t == 8 else None
                rows.append(
                    [
                        t,
                        name,
                        f"{sec * 1e3:.2f}",
                        "n/a" if np.isnan(wall) else f"{wall * 1e3:.2f}",
                        f"{rel:.2f}",
                        f"{bound(t):.2f}",
                        ""
                        if name == "summed loss"
                        else f"{rel / bound(t):.2f}" + (f" (target {target})" if target else ""),
                        *peer_cells,
                    ]
                )
        out += [
            f"### {arch.upper()} trunk, batch {BATCH[arch]}",
            "",
            benchlib.table(HEADERS, rows),
            "",
        ]
    out.append(autogram_table(torch_results))
    out.append(flop_floor(results, torch_results, list(dict.fromkeys(a for a, *_ in results)), full_at))
    out.append(
        "Speed-up = peer step time / JAX step time for the same method, architecture, batch and T (summed-loss row: "
        "plain PyTorch `sum(losses).backward()`). Full method list at T = "
        f"{full_at}; the T sweep covers the summed step, PCGrad, MGDA, UPGrad, the naive step and rep-grad mode."
    )
    return "\n".join(out)


_JAX_LINE = re.compile(r"^(\w+) T=\s*(\d+) (.+?)\s+([\d.]+) ms\s+([\d.]+)x summed \(([\d.]+) ms\)")
_PEER_LINE = re.compile(
    r"^(\w+) T=\s*(\d+) ((?:PyTorch|TorchJD|LibMTL) .+?)\s+([\d.]+) ms\s+\(([\d.]+)x the JAX step\)"
)


def parse_log(text: str) -> tuple[list[tuple], list[tuple]]:
    """Results from the progress lines a run prints (for runs cut short; JAX wall times are not in the log)."""
    results, torch_results, bases = [], [], {}
    for line in text.splitlines():
        if m := _JAX_LINE.match(line):
            arch, t, name, sec, _, base = m.group(1), int(m.group(2)), m.group(3), *map(float, m.group(4, 5, 6))
            results.append((arch, t, name, sec / 1e3, base / 1e3, float("nan")))
            bases.setdefault((arch, t), []).append(base / 1e3)
        elif m := _PEER_LINE.match(line):
            arch, t, row, sec, ratio = m.group(1), int(m.group(2)), m.group(3), float(m.group(4)), float(m.group(5))
            if row == "LibMTL mean":  # logs of older runs timed LibMTL's EW (one backward) against the Jacobian step
                continue
            method = "summed loss" if row.startswith("PyTorch") else row.split(" ", 1)[1].removeprefix("autogram ")
            torch_results.append((arch, t, row, method, sec / 1e3, sec / 1e3 / ratio))
    for (arch, t), b in bases.items():
        first = next(i for i, r in enumerate(results) if r[0] == arch and r[1] == t)
        results.insert(first, (arch, t, "summed loss", min(b), min(b), float("nan")))
    return results, torch_results


def main() -> None:
    # Single-threaded XLA:CPU (set before JAX starts its backend; torch is set in `run`), and the whole process pinned
    # to one core so that no runtime gets more cores than the other.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not benchlib.keep_freed_memory():
        logger.warning("not glibc: freed memory may go back to the kernel between steps (page faults in the timings)")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=8 on the MLP only, 5 repeats, do not write BENCHMARKS.md")
    ap.add_argument("--archs", default="mlp,cnn")
    ap.add_argument("--tasks", default="2,4,8,16")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the first allowed one)")
    ap.add_argument("--save", default=None, help="save raw results as JSON instead of writing BENCHMARKS.md")
    ap.add_argument("--merge", nargs="+", default=None, help="render saved JSON results and write BENCHMARKS.md")
    ap.add_argument("--from-log", nargs="+", default=None, help="render the progress logs of runs cut short")
    ap.add_argument("--load", default=None, help="with --from-log: how loaded the machine was during the runs")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):  # also for --merge, which measures the core's GEMM peak
        os.sched_setaffinity(0, {args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))})
    if args.from_log:
        results, torch_results = [], []
        for path in args.from_log:
            r, tr = parse_log(Path(path).read_text())
            results += r
            torch_results += tr
        load = args.load or f"1-min load average {os.getloadavg()[0]:.1f} at the end"
        text = render(results, torch_results, 8, load + " (rendered from the progress logs; wall times not logged)")
        print(text)
        if not args.no_write:
            benchlib.write_section("mtl", text)
        return
    if args.merge:
        import torch

        torch.set_num_threads(1)
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        results = [tuple(r) for part in parts for r in part["results"]]
        torch_results = [tuple(r) for part in parts for r in part["torch_results"]]
        text = render(results, torch_results, 8, "; ".join(f"{part['archs']}: {part['load']}" for part in parts))
        print(text)
        benchlib.write_section("mtl", text)
        return
    archs = ["mlp"] if args.quick else args.archs.split(",")
    tasks = [8] if args.quick else [int(t) for t in args.tasks.split(",")]
    repeats = 5 if args.quick else args.repeats
    load_before = os.getloadavg()
    results, torch_results = run(archs, tasks, repeats, full_at=8)
    load_after = os.getloadavg()
    load = f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    if args.save:
        payload = {"archs": ",".join(archs), "load": load, "results": results, "torch_results": torch_results}
        Path(args.save).write_text(json.dumps(payload))
        return
    text = render(results, torch_results, 8, load)
    print(text)
    if not (args.quick or args.no_write):
        benchlib.write_section("mtl", text)


if __name__ == "__main__":
    main()
