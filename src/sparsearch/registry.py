"""One way to register things: models, data sets, study arms, search spaces, scorers and search methods.

A :class:`Registry` maps names to objects (usually factories). Built-ins and user code register the same
way, with a decorator (as ``timm`` registers models)::

    from sparsearch.models import MODELS

    @MODELS.register("my-net")
    def my_net(input_shape: tuple[int, ...], num_classes: int, widths=None) -> nn.Module: ...

An installed package can add entries without editing sparsearch through an entry-point group
(``[project.entry-points."sparsearch.arms"] my-arm = "my_package.arms:my_arm"``); entry points are loaded
the first time a registry is asked for a name it does not hold, or for its list of names. The registries:
``models.MODELS``, ``data.DATASETS``, ``algorithms.ARMS``, ``search.SPACES``, ``search.SCORERS``,
``sparsity.distribution.DISTRIBUTIONS`` and ``sparsity.scores.SCORES``.

This module is the lowest layer: it imports nothing from sparsearch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that no registry entry has; the message names the registry and every allowed name."""


class Registry(Generic[T]):
    """Names -> objects of one kind, filled by decorators and by an entry-point group.

    Args:
        kind: what an entry is, for messages ("study arm", "search space").
        entry_point_group: the ``importlib.metadata`` group whose entries are added on first lookup.
    """

    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` and return it unchanged."""

        def decorate(obj: T) -> T:
            self.add(name, obj, replace=replace)
            return obj

        return decorate

    def add(self, name: str, obj: T, *, replace: bool = False) -> None:
        """Register ``obj`` under ``name``; a taken name is refused unless ``replace``."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        if name in self._entries and not replace and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass replace=True to replace it)")
        self._entries[name] = obj

    def remove(self, name: str) -> None:
        """Forget ``name`` (for tests and for code that registered something temporarily)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry called ``name``; raises :class:`UnknownNameError` naming every allowed name."""
        if name not in self._entries:
            self._load_entry_points()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}") from None

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order (built-ins first)."""
        self._load_entry_points()
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry in entry_points(group=self.entry_point_group):
            if entry.name in self._entries:
                continue
            try:
                obj = entry.load()
            except Exception as error:  # a broken plug-in must not hide the built-ins
                raise ImportError(
                    f"entry point {entry.name!r} = {entry.value!r} of group {self.entry_point_group!r} "
                    f"failed to load: {error}"
                ) from error
            self._entries[entry.name] = obj


def resolve_reference(reference: str, *, what: str) -> object:
    """The object named by ``"package.module:attribute"`` (importable from the environment or the cwd).

    ``what`` says what the reference is for ("model", "dataset") so errors name it.
    """
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} {reference!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ValueError(f"{what} {reference!r}: cannot import module {module_name!r}: {error}") from error
    obj: object = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{what} {reference!r}: module {module_name!r} has no attribute {attribute!r}") from None
    return obj
