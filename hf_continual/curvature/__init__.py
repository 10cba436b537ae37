"""Fisher representations with one interface (see :class:`Curvature`) and their estimator."""

from .base import Curvature, Params
from .diagonal import DiagonalCollector, DiagonalFisher, add_penalty_grad_
from .estimate import CompositeCollector, FisherCollector, estimate_fisher, unwrap_model

__all__ = [
    "CompositeCollector",
    "Curvature",
    "DiagonalCollector",
    "DiagonalFisher",
    "FisherCollector",
    "Params",
    "add_penalty_grad_",
    "estimate_fisher",
    "unwrap_model",
]
