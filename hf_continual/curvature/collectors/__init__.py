"""Collectors: what one pass of :func:`~hf_continual.curvature.estimate.estimate_fisher` accumulates.

:mod:`.hooks` captures layer inputs and output gradients; :mod:`.diagonal` turns them into exact per-example
squared gradients, :mod:`.kfac` into Kronecker factors (and uses the diagonal collector for the other parameters).
"""

from .diagonal import DiagonalCollector
from .kfac import KFACCollector

__all__ = ["DiagonalCollector", "KFACCollector"]
