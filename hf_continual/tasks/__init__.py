"""Task families for continual-learning streams."""

from .entity_linking import TASK_REGISTRY, EntityLinkingTask, build_entity_linking_task

__all__ = ["TASK_REGISTRY", "EntityLinkingTask", "build_entity_linking_task"]
