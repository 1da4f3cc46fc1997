"""corrjax: correlation-aware multi-task deep learning in JAX.

Subpackages (imported on first attribute access, so `import corrjax` stays cheap):

- :mod:`corrjax.stats`: correlation and covariance transforms (jit/vmap/grad, ``axis_name`` collectives).
- :mod:`corrjax.optim`: Optax transformations that rescale updates by gradient variance; noise diagnostics.
- :mod:`corrjax.mtl`: task-stacked gradients and multi-task aggregators as Optax transformations.
- :mod:`corrjax.models`, :mod:`corrjax.data`: Flax NNX multi-task models and datasets.
- :mod:`corrjax.train`: the training loop behind ``scripts/train.py``.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBPACKAGES = ("stats", "optim", "mtl", "models", "data", "train")
__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
