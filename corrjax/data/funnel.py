"""A synthetic purchase funnel (impression -> click -> add-to-cart -> purchase) with known conversion probabilities.

The sample-selection setting of ESMM (Ma et al., SIGIR 2018): the post-click conversion rate
``pCVR = p(purchase | click, x)`` is learnt from clicked impressions but needed on all of them, and when the click
and conversion propensities are correlated the clicked impressions are a biased sample of the conversion problem.
Here every probability is known, so a model's pCVR can be checked against the truth on every impression.

**World** (drawn from ``seed``, shared by the splits): ``num_users`` users, each in one of ``num_segments``
segments and with a bag of up to ``history_len`` categories it engaged with (drawn from its segment's affinities);
``num_items`` items, each with a category, a price and a popularity rank. Two independent latent utilities
``z_1, z_2`` of a (user, item) pair, each a sum of standard-normal effects with fixed variance shares (user 0.25,
item 0.3, category 0.15, segment x category 0.15, user-item factor interaction ``<p_u, q_i> / sqrt(k)`` 0.15), so
``Var z = 1`` over users and items. With ``rho`` = ``correlation``::

    s_click = click_bias + scale * z_1                                 p(click | x)          = sigmoid(s_click)
    z_conv  = rho * z_1 + sqrt(1 - rho^2) * z_2                        (corr(z_1, z_conv) = rho)
    s_cart  = cart_bias + scale * z_conv                               p(cart | click, x)    = sigmoid(s_cart)
    s_buy   = buy_bias + scale / 2 * z_conv - price_effect * price     p(buy | cart, x)      = sigmoid(s_buy)

so the ground truth is ``true_ctr = sigmoid(s_click)``, ``true_cvr = p(purchase | click, x) = sigmoid(s_cart)
sigmoid(s_buy)`` and ``true_ctcvr = true_ctr * true_cvr`` (every probability depends on the observed features
only: ``x`` determines it). ``click_bias`` sets the click rate, hence how selective the clicked sample is;
``correlation`` sets how far the clicked sample's conversion rate is from the whole space's (``info["selection_bias"]``
records the realised gap of the mean true CVR, clicked minus all impressions).

**Impressions** (per split, independent draws): a user uniformly at random, an item by popularity
(``p(rank r) ~ (r + 1)^-popularity_exponent``: a long tail of rarely shown, rarely clicked items), then
``click ~ Bernoulli(true_ctr)``, ``cart = click * Bernoulli(sigmoid(s_cart))``, ``purchase = cart *
Bernoulli(sigmoid(s_buy))``.

**Dataset**: features ``user_id``, ``item_id``, ``category``, ``segment`` (categorical), ``price`` (numeric,
standardised log price) and ``history`` (multi-hot categories, padded with -1); binary tasks ``click``, ``cart``,
``purchase`` (on every impression: ``purchase`` is ESMM's CTCVR label) and ``cvr`` (the purchase label on clicked
impressions, -1, i.e. missing, elsewhere: a CVR model trained on it learns from clicks alone). The ground truth is
``dataset.true_ctr``, ``dataset.true_cvr``, ``dataset.true_ctcvr`` (float64 ``(n,)``), and
``dataset.would_purchase`` (bool ``(n,)``), the counterfactual conversion label of every impression (``Bernoulli(
true_cvr)``, equal to ``purchase`` where clicked), against which a pCVR can be scored on the entire impression
space (unobservable in real data). Everything is vectorised
NumPy and deterministic by seed (200k impressions in well under a second).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from corrjax.data.features import FeatureSpec
from corrjax.data.iterator import check_seed
from corrjax.data.source import TabularDataset
from corrjax.data.spec import TaskSpec

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES: dict[str, int] = {"train": 100_000, "val": 20_000, "test": 50_000}
TASKS: tuple[TaskSpec, ...] = tuple(TaskSpec(n, "binary", 1) for n in ("click", "cart", "purchase", "cvr"))
# Variance shares of the latent utility's effects (they sum to 1).
SHARES: dict[str, float] = {"user": 0.25, "item": 0.3, "category": 0.15, "segment_category": 0.15, "interaction": 0.15}
FACTOR_DIM = 8


def _sigmoid(s: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * s))


def _check_positive(**kwargs: int) -> None:
    for key, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"`{key}` must be a positive int, got {value!r}")


def make_world(
    seed: int,
    *,
    num_users: int,
    num_items: int,
    num_categories: int,
    num_segments: int,
    history_len: int,
) -> dict[str, np.ndarray]:
    """The entities of the funnel: attributes and the standard-normal effects of two independent utilities."""
    rng = np.random.default_rng([check_seed(seed), 0])
    world: dict[str, np.ndarray] = {
        "segment": rng.integers(num_segments, size=num_users),
        "category": rng.integers(num_categories, size=num_items),
        "price": rng.standard_normal(num_items),  # standardised log price
        "rank": rng.permutation(num_items),  # popularity rank of each item
    }
    for j in (1, 2):  # the two independent utilities
        world[f"user{j}"] = rng.standard_normal(num_users)
        world[f"item{j}"] = rng.standard_normal(num_items)
        world[f"category{j}"] = rng.standard_normal(num_categories)
        world[f"segment_category{j}"] = rng.standard_normal((num_segments, num_categories))
        world[f"user_factors{j}"] = rng.standard_normal((num_users, FACTOR_DIM))
        world[f"item_factors{j}"] = rng.standard_normal((num_items, FACTOR_DIM))
    # History: up to history_len distinct categories drawn by the segment's click affinities, the rest -1.
    logits = 2.0 * world["segment_category1"][world["segment"]]  # (U, C)
    gumbel = logits - np.log(-np.log(rng.uniform(size=logits.shape)))
    top = np.argsort(-gumbel, axis=1)[:, : min(history_len, num_categories)]  # sampling without replacement
    lengths = rng.integers(0, top.shape[1] + 1, size=num_users)
    history = np.where(np.arange(top.shape[1]) < lengths[:, None], top, -1)
    world["history"] = np.pad(history, [(0, 0), (0, history_len - top.shape[1])], constant_values=-1)
    return world


def utilities(world: dict[str, np.ndarray], users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two independent standard latent utilities ``z_1, z_2 (n,)`` of (user, item) pairs."""
    seg, cat = world["segment"][users], world["category"][items]
    out = []
    for j in (1, 2):
        inter = (world[f"user_factors{j}"][users] * world[f"item_factors{j}"][items]).sum(1) / math.sqrt(FACTOR_DIM)
        effects = {
            "user": world[f"user{j}"][users],
            "item": world[f"item{j}"][items],
            "category": world[f"category{j}"][cat],
            "segment_category": world[f"segment_category{j}"][seg, cat],
            "interaction": inter,
        }
        out.append(sum(math.sqrt(SHARES[k]) * v for k, v in effects.items()))
    return out[0], out[1]


def funnel(
    split: str = "train",
    *,
    num_examples: int | None = None,
    num_users: int = 2000,
    num_items: int = 1000,
    num_categories: int = 20,
    num_segments: int = 8,
    history_len: int = 5,
    correlation: float = 0.7,
    click_bias: float = -2.5,
    cart_bias: float = 0.0,
    buy_bias: float = 0.5,
    scale: float = 1.5,
    price_effect: float = 0.5,
    popularity_exponent: float = 1.0,
    seed: int = 0,
) -> TabularDataset:
    """The synthetic purchase funnel's ``split`` (see the module docstring) as an in-memory tabular dataset.

    Args:
      split: ``"train"``, ``"val"`` or ``"test"``: independent impressions of one world.
      num_examples: impressions in the split (default 100k / 20k / 50k).
      num_users, num_items, num_categories, num_segments, history_len: the world's sizes.
      correlation: ``rho``, the correlation of the click and conversion utilities, in [-1, 1].
      click_bias, cart_bias, buy_bias: intercepts of the click, add-to-cart and purchase logits.
      scale: the utilities' standard deviation in the logits.
      price_effect: how much a higher price lowers the purchase logit.
      popularity_exponent: Zipf exponent of the items' exposure (0: uniform).
      seed: an int in ``[0, 2**31)``; the world and every split are deterministic functions of it.

    Returns a :class:`TabularDataset` with ``features`` (``user_feature="user_id"``, so evaluation reports GAUC),
    ``tasks`` (``click``, ``cart``, ``purchase``, ``cvr``), the ground truth ``true_ctr``, ``true_cvr``,
    ``true_ctcvr``, the counterfactual labels ``would_purchase``, and ``info`` (the parameters, the realised rates,
    the realised correlation of the click and conversion logits, and ``selection_bias``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown `split`={split!r}; expected one of {', '.join(map(repr, SPLITS))}")
    seed = check_seed(seed)
    n = DEFAULT_SIZES[split] if num_examples is None else num_examples
    _check_positive(
        num_examples=n,
        num_users=num_users,
        num_items=num_items,
        num_categories=num_categories,
        num_segments=num_segments,
        history_len=history_len,
    )
    if not -1.0 <= float(correlation) <= 1.0:
        raise ValueError(f"`correlation` must lie in [-1, 1], got {correlation}")
    if popularity_exponent < 0 or scale < 0:
        raise ValueError(f"`popularity_exponent`={popularity_exponent} and `scale`={scale} must be >= 0")
    world = make_world(
        seed,
        num_users=num_users,
        num_items=num_items,
        num_categories=num_categories,
        num_segments=num_segments,
        history_len=history_len,
    )
    rng = np.random.default_rng([seed, 1 + SPLITS[split]])
    users = rng.integers(num_users, size=n)
    exposure = (world["rank"] + 1.0) ** -float(popularity_exponent)
    items = rng.choice(num_items, size=n, p=exposure / exposure.sum())
    z1, z2 = utilities(world, users, items)
    rho = float(correlation)
    z_conv = rho * z1 + math.sqrt(max(1.0 - rho * rho, 0.0)) * z2
    price = world["price"][items]
    s_click = click_bias + scale * z1
    s_cart = cart_bias + scale * z_conv
    s_buy = buy_bias + 0.5 * scale * z_conv - price_effect * price
    true_ctr = _sigmoid(s_click)
    p_cart, p_buy = _sigmoid(s_cart), _sigmoid(s_buy)
    true_cvr = p_cart * p_buy
    u = rng.uniform(size=(3, n))
    click = u[0] < true_ctr
    # The conversion each impression would have had if clicked (drawn for all; observed only where clicked).
    would_purchase = (u[1] < p_cart) & (u[2] < p_buy)
    cart = click & (u[1] < p_cart)
    purchase = click & would_purchase
    x = {
        "user_id": users.astype(np.int32),
        "item_id": items.astype(np.int32),
        "category": world["category"][items].astype(np.int32),
        "segment": world["segment"][users].astype(np.int32),
        "price": price.astype(np.float32),
        "history": world["history"][users].astype(np.int32),
    }
    features = (
        FeatureSpec("user_id", "categorical", num_users),
        FeatureSpec("item_id", "categorical", num_items),
        FeatureSpec("category", "categorical", num_categories),
        FeatureSpec("segment", "categorical", num_segments),
        FeatureSpec("price", "numeric"),
        FeatureSpec("history", "multi_hot", num_categories, max_len=history_len),
    )
    labels = {
        "click": click.astype(np.float32),
        "cart": cart.astype(np.float32),
        "purchase": purchase.astype(np.float32),
        "cvr": np.where(click, purchase, -1).astype(np.float32),
    }
    clicked_cvr = float(true_cvr[click].mean()) if click.any() else float("nan")
    info: dict[str, Any] = {
        "split": split,
        "seed": seed,
        "correlation": rho,
        "logit_correlation": float(np.corrcoef(s_click, s_cart)[0, 1]) if n > 1 else float("nan"),
        "ctr": float(click.mean()),
        "cvr_on_clicks": float(purchase[click].mean()) if click.any() else float("nan"),
        "ctcvr": float(purchase.mean()),
        "true_cvr_mean": float(true_cvr.mean()),
        "true_cvr_mean_on_clicks": clicked_cvr,
        "selection_bias": clicked_cvr - float(true_cvr.mean()),
    }
    dataset = TabularDataset(
        {"x": x, **labels}, TASKS, features, user_feature="user_id", name=f"funnel/{split}", info=info
    )
    dataset.true_ctr, dataset.true_cvr, dataset.true_ctcvr = true_ctr, true_cvr, true_ctr * true_cvr
    dataset.would_purchase = would_purchase
    return dataset
