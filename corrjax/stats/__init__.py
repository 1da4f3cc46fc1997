"""corrjax.stats: correlation and covariance transforms for JAX (jit, vmap, grad, ``axis_name`` collectives).

Data are ``(n, d)`` with observations in rows; see DESIGN.md for the shared conventions.
"""

from corrjax.stats.inference import PartialCorrResult, partial_corr_test
from corrjax.stats.losses import (
    barlow_twins_loss,
    concordance_loss,
    decov_loss,
    pearson_loss,
    spearman_loss,
    vicreg_loss,
)
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
from corrjax.stats.ranks import KendallTauResult, SpearmanRResult, kendalltau, rankdata, spearmanr
from corrjax.stats.shrinkage import ShrunkCovariance, ledoit_wolf, oas, shrunk_covariance
from corrjax.stats.similarity import (
    CKAState,
    cka_finalize,
    cka_init,
    cka_matrix,
    cka_merge,
    cka_update,
    linear_cka,
    rbf_cka,
)
from corrjax.stats.softsort import soft_rank, soft_sort
from corrjax.stats.streaming import (
    CovState,
    corr_finalize,
    cov_allreduce,
    cov_finalize,
    cov_init,
    cov_merge,
    cov_update,
)
from corrjax.stats.weighted_tau import WeightedTauResult, weightedtau

__all__ = [
    "CKAState",
    "ConfidenceInterval",
    "CovState",
    "KendallTauResult",
    "PartialCorrResult",
    "PearsonRResult",
    "ShrunkCovariance",
    "SpearmanRResult",
    "WeightedTauResult",
    "barlow_twins_loss",
    "cka_finalize",
    "cka_init",
    "cka_matrix",
    "cka_merge",
    "cka_update",
    "concordance",
    "concordance_loss",
    "corr_finalize",
    "corrcoef",
    "cov",
    "cov_allreduce",
    "cov_finalize",
    "cov_init",
    "cov_merge",
    "cov_update",
    "decov_loss",
    "fisher_z_ci",
    "kendalltau",
    "ledoit_wolf",
    "linear_cka",
    "nancorrcoef",
    "nancov",
    "oas",
    "partial_corr",
    "partial_corr_test",
    "pearson_loss",
    "pearsonr",
    "rankdata",
    "rbf_cka",
    "shrunk_covariance",
    "soft_rank",
    "soft_sort",
    "spearman_loss",
    "spearmanr",
    "vicreg_loss",
    "weightedtau",
]
