"""Registries: plain dicts filled by a decorator; a miss names every known entry."""
from __future__ import annotations

from typing import Callable, Generic, Optional, TypeVar

from trials.core.errors import ConfigError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    def __init__(self, kind: str, key: Optional[str]):
        super().__init__()
        self.kind = kind  # "model", "dataset", ... used in messages
        self.key = key  # the config key that names an entry, e.g. "model.name"; None: code picks it

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:  # type: ignore[override]
        if name not in self:
            known = f"known {self.kind}s: {', '.join(sorted(self))}"
            if self.key is None:  # no config names it: a miss is a programming error, not bad input
                raise KeyError(f"{self.kind} {name!r}; {known}")
            raise ConfigError(self.key, name, known)
        return self[name]
