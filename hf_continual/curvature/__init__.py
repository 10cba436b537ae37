"""Fisher representations with one interface (see :class:`Curvature`) and their estimator."""

from .base import Curvature, Params

__all__ = ["Curvature", "Params"]
