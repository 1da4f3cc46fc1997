"""corrjax.train: the Hydra training codebase behind ``scripts/train.py``.

One module per job:

- :mod:`~corrjax.train.config`: structured config schemas registered in Hydra's ConfigStore.
- :mod:`~corrjax.train.distributed`: ``jax.distributed.initialize`` (configured or from SLURM), shared run dir.
- :mod:`~corrjax.train.builders`, :mod:`~corrjax.train.optimizer`: model and optax chain from the config groups.
- :mod:`~corrjax.train.state`, :mod:`~corrjax.train.step`: the pytree train state and the pure jitted steps.
- :mod:`~corrjax.train.losses`, :mod:`~corrjax.train.evaluate`, :mod:`~corrjax.train.regularizers`: task losses,
  evaluation metrics and CKA diagnostics, representation regularisers.
- :mod:`~corrjax.train.checkpoint`, :mod:`~corrjax.train.writers`, :mod:`~corrjax.train.plots`,
  :mod:`~corrjax.train.report`: verified Orbax checkpoints, atomic metrics files, PNG plots, the end-of-run printout.
- :mod:`~corrjax.train.rundir`: one run per run directory (the lock; no silent deletion of a previous run's results).
- :mod:`~corrjax.train.targets`: the ``_target_`` allow-list checked before anything is instantiated.
- :mod:`~corrjax.train.loop`: ``run(cfg)``, the loop tying them together.

Submodules are imported explicitly (``from corrjax.train.loop import run``) so that importing the package touches
no JAX device before ``jax.distributed.initialize``.
"""
