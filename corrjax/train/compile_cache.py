"""The persistent XLA compilation cache of the training codebase: on by default, under the user's cache directory.

A run compiles its data generator, model initialisation, initial state and train step before its first step
(seconds on a CPU); with JAX's persistent compilation cache a second run of the same shapes reads the executables
from disk instead. :func:`configure` turns it on from ``trainer.compilation_cache_dir`` before the first compilation
(:func:`corrjax.train.loop.run` and :func:`corrjax.train.ensemble.train_seeds` call it):

- ``auto`` (the default): JAX's own setting when one is made (the ``JAX_COMPILATION_CACHE_DIR`` environment variable
  or an earlier ``jax.config.update("jax_compilation_cache_dir", ...)``), else :func:`default_dir`,
  ``$XDG_CACHE_HOME/corrjax/jax`` or ``~/.cache/corrjax/jax``;
- a path: that directory;
- null: no persistent cache (an earlier setting of this process is switched off).

Executables that compiled in less than :data:`MIN_COMPILE_TIME_S` are not written (reading a file costs about what
compiling them does); JAX's default of 1 s would leave out most of a small model's programs. The cache is trusted
code: do not point it at a directory others can write (see JAX's persistent compilation cache guide).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

__all__ = ["MIN_COMPILE_TIME_S", "configure", "default_dir"]

log = logging.getLogger(__name__)

# Seconds a compilation must take to be written to the cache (JAX's default: 1.0).
MIN_COMPILE_TIME_S = 0.1
# Executables smaller than this many bytes are not written either (JAX's default, 0, keeps every size).
MIN_ENTRY_SIZE_BYTES = 0


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/corrjax/jax``, or ``~/.cache/corrjax/jax`` when ``XDG_CACHE_HOME`` is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "corrjax" / "jax"


def configure(path: str | os.PathLike | None = "auto") -> str | None:
    """Sets JAX's persistent compilation cache from ``trainer.compilation_cache_dir`` and returns the directory in
    use (None: no cache).

    A directory set here comes with :data:`MIN_COMPILE_TIME_S` and :data:`MIN_ENTRY_SIZE_BYTES`; a directory JAX
    already has (``auto``) keeps JAX's settings as they are. Call it before the first compilation of the run: JAX
    opens the cache at its first compilation after a change. Switching the directory (or switching the cache off)
    later in a process resets JAX's cache object, so the next compilation uses the new setting.

    Raises ``ValueError`` naming the key when ``path`` is an empty string."""
    current = jax.config.jax_compilation_cache_dir
    if isinstance(path, str) and path == "auto":
        target = current or str(default_dir())
    elif path is None:
        target = None
    else:
        if not str(path).strip():
            raise ValueError(
                "`trainer.compilation_cache_dir`='' names no directory; give a path, `auto` or null (no cache)"
            )
        target = str(Path(path).expanduser())
    if target != current:
        if target is not None:
            Path(target).mkdir(parents=True, exist_ok=True)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_SIZE_BYTES)
        jax.config.update("jax_compilation_cache_dir", target)
        _jax_cache.reset_cache()
    log.debug("persistent compilation cache: %s", target or "off")
    return target
