"""The registry of training methods: every method class by its name, filled as classes are defined."""

from __future__ import annotations

REGISTRY: dict[str, type] = {}
"""Every method class (a :class:`~flatlora.methods.base.LoRAMethod`) by its ``name``."""


def register(cls: type) -> None:
    """Register the method class ``cls`` under its own class attribute ``name``.

    Raises:
        TypeError: the class sets no ``name`` of its own, or the name is taken.
    """
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"method class {cls.__qualname__} sets no name: give it a class attribute name = '<method-name>' "
            "(or define it with register=False if it is an abstract helper)"
        )
    if name in REGISTRY:
        raise TypeError(f"method name {name!r} is taken by {REGISTRY[name].__qualname__}: choose another name")
    REGISTRY[name] = cls
