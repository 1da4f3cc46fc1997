"""An allow-list for the ``_target_`` callables of a training config.

Hydra's ``instantiate`` imports and calls whatever dotted path a ``_target_`` names, so a config or a command-line
override such as ``data._target_=os.system`` would run any importable callable. Every ``_target_`` of the composed
config is checked, before anything is instantiated, against module prefixes: :data:`DEFAULT_PREFIXES` (corrjax,
optax, flax) plus the config's ``allowed_targets`` (e.g. ``allowed_targets: [mypkg]`` in a config file). A prefix
matches its module and everything below it (``mypkg`` allows ``mypkg.models.Net``, not ``mypkgevil.x``).

:func:`check_config` walks the whole config, resolving interpolations, so a ``_target_`` produced by a resolver
(``${oc.create:...}``) or an interpolation is checked as instantiation would see it. :func:`check_overrides` guards
what :func:`check_config` cannot see, from ``scripts/train.py`` before Hydra starts: overrides of Hydra's own
config (``hydra.callbacks.*`` are instantiated by Hydra before the task function runs) may only name Hydra's and
this codebase's callables, and ``allowed_targets`` cannot be set on the command line (the allow-list is extended in
config files, so one override cannot both widen it and use it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

DEFAULT_PREFIXES: tuple[str, ...] = ("corrjax", "optax", "flax")
# What Hydra's own config node (callbacks, launchers, sweepers) may name in an override.
HYDRA_PREFIXES: tuple[str, ...] = ("corrjax", "hydra", "hydra_plugins")
ALLOW_KEY = "allowed_targets"


class TargetNotAllowedError(ValueError):
    """A ``_target_`` outside the allow-list (the message names the key path and the target)."""


def allowed_prefixes(cfg: Any = None) -> tuple[str, ...]:
    """:data:`DEFAULT_PREFIXES` plus ``cfg.allowed_targets`` (validated: non-empty dotted module names)."""
    extra = []
    if cfg is not None:
        extra = OmegaConf.select(cfg, ALLOW_KEY, default=None) if isinstance(cfg, DictConfig) else cfg.get(ALLOW_KEY)
        extra = list(extra or [])
    for prefix in extra:
        if not isinstance(prefix, str) or not all(part.isidentifier() for part in prefix.split(".")):
            raise ValueError(f"`{ALLOW_KEY}` entries must be dotted module names like 'mypkg', got {prefix!r}")
    return (*DEFAULT_PREFIXES, *extra)


def is_allowed(target: Any, prefixes: Sequence[str]) -> bool:
    """Whether ``target`` is a string naming ``prefix`` or something under it for one of ``prefixes``."""
    return isinstance(target, str) and any(target == p or target.startswith(p + ".") for p in prefixes)


def find_targets(node: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    """``(key path, target)`` for every ``_target_`` in ``node`` (a config or plain containers), values resolved
    where they resolve. A value that does not resolve here is skipped unless it is a ``_target_`` itself
    (instantiation, in the same context, could not resolve it either)."""
    if isinstance(node, DictConfig):
        keys: Iterable[Any] = node.keys()
    elif isinstance(node, ListConfig | list | tuple):
        keys = range(len(node))
    elif isinstance(node, dict):
        keys = node.keys()
    else:
        return
    for key in keys:
        sub = f"{path}.{key}" if path and not isinstance(key, int) else (f"{path}[{key}]" if path else str(key))
        try:
            value = node[key]
        except Exception as e:  # an interpolation that does not resolve here
            if key == "_target_":
                raise TargetNotAllowedError(f"`{sub}` does not resolve ({e}); cannot check what it names") from e
            continue
        if key == "_target_":
            yield sub, value
        else:
            yield from find_targets(value, sub)


def check_config(cfg: Any, prefixes: Sequence[str] | None = None) -> None:
    """Raises :class:`TargetNotAllowedError` naming the key path and the target of the first ``_target_`` of
    ``cfg`` outside ``prefixes`` (default: :func:`allowed_prefixes` of ``cfg``); in Hydra's own ``hydra`` node (a
    config composed with it) :data:`HYDRA_PREFIXES` are allowed too."""
    prefixes = allowed_prefixes(cfg) if prefixes is None else tuple(prefixes)
    for path, target in find_targets(cfg):
        if path.startswith("hydra.") and is_allowed(target, HYDRA_PREFIXES):  # Hydra's own node (launchers, ...)
            continue
        if not is_allowed(target, prefixes):
            raise TargetNotAllowedError(
                f"`{path}`={target!r} is not an allowed target: `_target_` must name a callable under one of "
                f"{list(prefixes)}; add a trusted package to `{ALLOW_KEY}` in a config file (e.g. "
                f"{ALLOW_KEY}: [mypkg])"
            )


def check_overrides(overrides: Sequence[str]) -> None:
    """Checks command-line overrides before Hydra composes anything (see the module docstring): the ``_target_``
    of every ``hydra.*`` override must lie under :data:`HYDRA_PREFIXES`, and ``allowed_targets`` may not be set.
    Overrides of the task config are checked after composition by :func:`check_config`. Raises
    :class:`TargetNotAllowedError`; an override Hydra cannot parse is left for Hydra to report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # Hydra reports malformed overrides itself, with its own message
        return
    for override in parsed:
        key = override.key_or_group
        if key == ALLOW_KEY or key.startswith(ALLOW_KEY + "."):
            raise TargetNotAllowedError(
                f"`{override.input_line}`: `{ALLOW_KEY}` cannot be set on the command line; extend the allow-list "
                "in a config file (e.g. an experiment preset) so that an override cannot both widen it and use it"
            )
        if not key.startswith("hydra.") or override.is_delete():
            continue
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            node = {key.rsplit(".", 1)[-1]: value} if key.endswith("._target_") else value
            base = key.rsplit(".", 1)[0] if key.endswith("._target_") else key
            for path, target in find_targets(node, base):
                if not is_allowed(target, HYDRA_PREFIXES):
                    raise TargetNotAllowedError(
                        f"`{path}`={target!r} is not an allowed target: Hydra's own config may only name callables "
                        f"under {list(HYDRA_PREFIXES)} from the command line"
                    )
