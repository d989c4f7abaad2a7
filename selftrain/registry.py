"""Name -> constructor registries with errors that list the valid names (timm / torchvision style).

Entries carry metadata given at registration, e.g. ``@POLICIES.register("wst", task="detection",
kind="online")``: what the builders, ``selftrain list`` and the contract tests read instead of
building an object to ask it. ``task`` is one task or a tuple of tasks; a registry's keyword
defaults apply to every entry that does not set its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    build: Callable[..., T]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> tuple[str, ...]:
        task = self.meta.get("task", ())
        return (task,) if isinstance(task, str) else tuple(task)

    def supports(self, task: str) -> bool:
        return task in self.tasks


class Registry(Generic[T]):
    """A dictionary of constructors keyed by name; duplicates raise, misses list the options."""

    def __init__(self, kind: str, **defaults: Any) -> None:
        self.kind = kind
        self.defaults = defaults
        self._items: dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = Entry(name, fn, {**self.defaults, **meta})
            return fn

        return deco

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._items[name]
        except KeyError:
            options = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {options}") from None

    def get(self, name: str) -> Callable[..., T]:
        return self.entry(name).build

    def names(self, task: str | None = None, **where: Any) -> list[str]:
        """Sorted names, those for ``task`` and with the metadata ``where`` only when given."""
        return sorted(n for n, e in self._items.items()
                      if (task is None or e.supports(task)) and all(e.meta.get(k) == v for k, v in where.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
