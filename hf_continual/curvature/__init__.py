"""Fisher representations with one interface (:class:`Curvature`), their collectors and the estimator.

Layout: :mod:`.base` (interface, registry of kinds, the generic penalty kernel), :mod:`.diagonal` and
:mod:`.kfac` (representations, each with its own penalty kernel), :mod:`.factors` (K-FAC factor forms),
:mod:`.collectors` (what one estimation pass accumulates), :mod:`.estimate` (the pass itself).
"""

from .base import CURVATURE_KINDS, Curvature, Params, curvature_class, curvature_penalty_grad_
from .collectors import DiagonalCollector, KFACCollector
from .diagonal import DiagonalFisher, add_penalty_grad_
from .estimate import FisherCollector, estimate_fisher, unwrap_model
from .kfac import KFACFisher

__all__ = [
    "CURVATURE_KINDS",
    "Curvature",
    "DiagonalCollector",
    "DiagonalFisher",
    "FisherCollector",
    "KFACCollector",
    "KFACFisher",
    "Params",
    "add_penalty_grad_",
    "curvature_class",
    "curvature_penalty_grad_",
    "estimate_fisher",
    "unwrap_model",
]
