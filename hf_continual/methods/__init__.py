"""Continual methods and their registry (method name -> implementation, PEFT-style).

Layout: :mod:`.registry` (names, refuses duplicates), :mod:`.base` (interface, context, ``none``),
:mod:`.rehearsal` (``joint``, ``replay``), :mod:`.penalty` (``ewc``, ``online_ewc``, ``kfac``), :mod:`.fish`.
Methods get a :class:`MethodContext` (model, config, collator, process group), never a Trainer.
"""

from .base import ContinualMethod, MethodContext, concat_datasets, fp32_copy, subset, trainable_parameters
from .fish import Fish
from .penalty import EWC, KFACEWC, OnlineEWC, PenaltyMethod, estimate_task_fisher
from .registry import METHOD_REGISTRY, build_method, method_names, register_method
from .rehearsal import JointTraining, Replay

__all__ = [
    "EWC",
    "KFACEWC",
    "METHOD_REGISTRY",
    "ContinualMethod",
    "Fish",
    "JointTraining",
    "MethodContext",
    "OnlineEWC",
    "PenaltyMethod",
    "Replay",
    "build_method",
    "concat_datasets",
    "estimate_task_fisher",
    "fp32_copy",
    "method_names",
    "register_method",
    "subset",
    "trainable_parameters",
]
