"""Method registry: ``continual_method`` name -> implementation class (PEFT-style); refuses duplicate names."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ContinualConfig
    from .base import ContinualMethod

METHOD_REGISTRY: dict[str, type[ContinualMethod]] = {}


def register_method(name: str):
    """Class decorator: make a :class:`~hf_continual.methods.base.ContinualMethod` available as
    ``continual_method=name``. A name can be registered once (a second registration is an error, not a silent
    replacement of the first)."""

    def wrap(cls: type[ContinualMethod]) -> type[ContinualMethod]:
        if name in METHOD_REGISTRY:
            raise ValueError(
                f"continual method {name!r} is already registered (by {METHOD_REGISTRY[name].__qualname__}); "
                "choose another name"
            )
        cls.name = name
        METHOD_REGISTRY[name] = cls
        return cls

    return wrap


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(METHOD_REGISTRY)


def build_method(config: ContinualConfig) -> ContinualMethod:
    """Instantiate the method named by ``config.continual_method``; warn about fields it does not use."""
    try:
        cls = METHOD_REGISTRY[config.continual_method]
    except KeyError:
        raise ValueError(
            f"continual_method={config.continual_method!r} has no implementation; "
            f"registered: {', '.join(sorted(METHOD_REGISTRY))}"
        ) from None
    cls.warn_unused_fields(config)
    return cls(config)
