"""multidigits: an offline MultiMNIST built from scikit-learn's bundled 8x8 digits.

The MultiMNIST construction (Sabour et al., 2017; Sener & Koltun, NeurIPS 2018) overlays two digits in a larger
canvas, one shifted towards the top-left and one towards the bottom-right, and asks for both: task ``left`` is the
top-left digit, task ``right`` the bottom-right one. Here the sources are the 1,797 digits of
``sklearn.datasets.load_digits`` (shipped with scikit-learn, no network), the canvas is 12x12, each digit is offset
by 0..2 pixels from its corner and the overlap is the pixel-wise maximum, scaled to [0, 1].

The source images are first partitioned into train / val / test pools (70 / 10 / 20 %), and each split pairs images
only from its own pool, so no source digit appears in two splits. Everything is deterministic given ``seed``.
Optional derived tasks: ``sum`` (left + right, 19 classes) and ``same`` (binary: left == right).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from corrjax.data.iterator import check_seed
from corrjax.data.source import ArrayDataset
from corrjax.data.spec import TaskSpec

CANVAS = 12
DIGIT = 8
MAX_SHIFT = CANVAS - DIGIT - 2  # each digit moves 0..2 px away from its corner
POOL_FRACTIONS: dict[str, tuple[float, float]] = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}
DEFAULT_SIZES: dict[str, int] = {"train": 20000, "val": 2000, "test": 4000}
DERIVED_TASKS: dict[str, TaskSpec] = {
    "sum": TaskSpec("sum", "classification", 19),
    "same": TaskSpec("same", "binary", 1),
}


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int32)


def source_pools(seed: int = 0, num_sources: int = 1797) -> dict[str, np.ndarray]:
    """Disjoint index sets into ``load_digits()`` for each split (a seeded permutation cut 70/10/20)."""
    perm = np.random.default_rng([check_seed(seed), 0x5EED]).permutation(num_sources)
    return {s: np.sort(perm[int(a * num_sources) : int(b * num_sources)]) for s, (a, b) in POOL_FRACTIONS.items()}


def compose(left: np.ndarray, right: np.ndarray, offsets: np.ndarray, canvas_size: int = CANVAS) -> np.ndarray:
    """Overlays square digits ``left, right (n, k, k)`` on ``(n, S, S)`` canvases (``S = canvas_size``).

    ``offsets (n, 4) = (rl, cl, rr, cr)``: the left digit's top-left corner goes to ``(rl, cl)``, the right digit's
    bottom-right corner to ``(S - rr, S - cr)``; overlapping pixels take the maximum.
    """
    n, k = left.shape[0], left.shape[1]
    canvas = np.zeros((n, canvas_size, canvas_size), np.float32)
    rows = np.arange(k)
    i = np.arange(n)[:, None, None]
    rl, cl, rr, cr = (offsets[:, j, None, None] for j in range(4))
    canvas[i, rl + rows[:, None], cl + rows[None, :]] = left
    r0, c0 = canvas_size - k - rr, canvas_size - k - cr
    ridx, cidx = r0 + rows[:, None], c0 + rows[None, :]
    canvas[i, ridx, cidx] = np.maximum(canvas[i, ridx, cidx], right)
    return canvas


def multidigits(
    split: str = "train",
    *,
    num_examples: int | None = None,
    seed: int = 0,
    extra_tasks: Sequence[str] = (),
) -> ArrayDataset:
    """The multidigits dataset: ``x`` float32 ``(n, 12, 12, 1)`` in [0, 1]; tasks ``left``, ``right`` (10 classes).

    Args:
      split: ``"train"``, ``"val"`` or ``"test"``; each uses its own disjoint pool of source digits.
      num_examples: pairs to draw (defaults 20000 / 2000 / 4000). Pairs are drawn with replacement from the pool
        (the pool of a split has ``p`` images, hence ``p^2`` distinct pairs before offsets).
      seed: fixes the pools, the pairs and the offsets (an int in ``[0, 2**31)``).
      extra_tasks: any of ``"sum"`` (19 classes) and ``"same"`` (binary).

    ``info["source_index"] (n, 2)`` gives the ``load_digits`` indices of the left and right digit; ``info["offsets"]``
    the placements.
    """
    if split not in POOL_FRACTIONS:
        raise ValueError(f"unknown `split`={split!r}; expected one of {', '.join(map(repr, POOL_FRACTIONS))}")
    seed = check_seed(seed)
    unknown = [t for t in extra_tasks if t not in DERIVED_TASKS]
    if unknown:
        raise ValueError(f"unknown `extra_tasks` {unknown}; expected any of {sorted(DERIVED_TASKS)}")
    n = DEFAULT_SIZES[split] if num_examples is None else int(num_examples)
    if n < 1:
        raise ValueError(f"`num_examples` must be positive, got {n}")
    images, targets = _load_digits()
    pool = source_pools(seed, len(images))[split]
    rng = np.random.default_rng([seed, 1 + list(POOL_FRACTIONS).index(split)])
    src = pool[rng.integers(0, len(pool), size=(n, 2))]
    offsets = rng.integers(0, MAX_SHIFT + 1, size=(n, 4))
    x = compose(images[src[:, 0]], images[src[:, 1]], offsets)[..., None]
    left, right = targets[src[:, 0]], targets[src[:, 1]]
    arrays = {"x": x, "left": left, "right": right}
    derived = {"sum": (left + right).astype(np.int32), "same": (left == right).astype(np.float32)}
    tasks = [TaskSpec("left", "classification", 10), TaskSpec("right", "classification", 10)]
    for t in dict.fromkeys(extra_tasks):
        arrays[t] = derived[t]
        tasks.append(DERIVED_TASKS[t])
    info = {"source_index": src, "offsets": offsets, "pool": pool, "split": split, "seed": seed}
    return ArrayDataset(arrays, tasks, name=f"multidigits/{split}", info=info)
