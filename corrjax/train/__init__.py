"""corrjax.train: the Hydra training codebase behind ``scripts/train.py``.

One module per job:

- :mod:`~corrjax.train.config`: structured config schemas registered in Hydra's ConfigStore.
- :mod:`~corrjax.train.distributed`: ``jax.distributed.initialize`` (configured or from SLURM), shared run dir.
- :mod:`~corrjax.train.setup`: ``build(cfg, seed) -> Setup``, the one assembly of a run (tasks, model, optimiser,
  pure steps, initial state) that every driver uses.
- :mod:`~corrjax.train.builders`, :mod:`~corrjax.train.optimizer`: model and optax chain from the config groups.
- :mod:`~corrjax.train.state`, :mod:`~corrjax.train.step`: the pytree train state and the pure steps.
- :mod:`~corrjax.train.sharding`: the mesh, global arrays and the jitted steps' shardings.
- :mod:`~corrjax.train.tasks`, :mod:`~corrjax.train.evaluate`, :mod:`~corrjax.train.regularizers`: the per-kind task
  table (loss, metrics, score), evaluation and CKA diagnostics, representation regularisers.
- :mod:`~corrjax.train.tracking`, :mod:`~corrjax.train.signals`: train records, summaries and the CKA-over-training
  history; stopping on SIGINT/SIGTERM (agreed across processes).
- :mod:`~corrjax.train.checkpoint`, :mod:`~corrjax.train.writers`, :mod:`~corrjax.train.plots`,
  :mod:`~corrjax.train.report`: verified Orbax checkpoints, atomic metrics files, PNG plots, the end-of-run printout.
- :mod:`~corrjax.train.selection`, :mod:`~corrjax.train.eval_run`: model selection on the validation split (the
  monitor, best checkpoint, early stopping), the test of the selected checkpoint, ``ckpt_path=`` and eval-only runs.
- :mod:`~corrjax.train.rundir`: one run per run directory (the lock; no silent deletion of a previous run's results).
- :mod:`~corrjax.train.targets`: the ``_target_`` allow-list checked before anything is instantiated.
- :mod:`~corrjax.train.loop`, :mod:`~corrjax.train.ensemble`: ``run(cfg)``, the loop of one run, and
  ``train_seeds``, many seeds of one config in one compiled program.

Submodules are imported explicitly (``from corrjax.train.loop import run``) so that importing the package touches
no JAX device before ``jax.distributed.initialize``.
"""
