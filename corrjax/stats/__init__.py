"""corrjax.stats: correlation and covariance transforms for JAX (jit, vmap, grad, ``axis_name`` collectives).

Data are ``(n, d)`` with observations in rows; see DESIGN.md for the shared conventions.
"""

from corrjax.stats.missing import nancorrcoef, nancov
from corrjax.stats.moments import (
    ConfidenceInterval,
    PearsonRResult,
    concordance,
    corrcoef,
    cov,
    fisher_z_ci,
    partial_corr,
    pearsonr,
)
from corrjax.stats.shrinkage import ShrunkCovariance, ledoit_wolf, oas
from corrjax.stats.streaming import (
    CovState,
    corr_finalize,
    cov_allreduce,
    cov_finalize,
    cov_init,
    cov_merge,
    cov_update,
)

__all__ = [
    "ConfidenceInterval",
    "CovState",
    "PearsonRResult",
    "ShrunkCovariance",
    "concordance",
    "corr_finalize",
    "corrcoef",
    "cov",
    "cov_allreduce",
    "cov_finalize",
    "cov_init",
    "cov_merge",
    "cov_update",
    "fisher_z_ci",
    "ledoit_wolf",
    "nancorrcoef",
    "nancov",
    "oas",
    "partial_corr",
    "pearsonr",
]
