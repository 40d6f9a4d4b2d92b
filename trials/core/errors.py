"""One error type for every bad input, so the CLI can print one line and exit 2."""
import reprlib

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 80, 80, 40
_SHORT.maxdict = _SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = 8
LONGEST = 100  # characters of a value in a message


def shown(value) -> str:
    """A value as a message shows it: its repr, cut to LONGEST characters. reprlib's limits
    on depth and items keep this cheap for any value (a YAML alias tree of 10^9 leaves too)."""
    text = _SHORT.repr(value)
    return text if len(text) <= LONGEST else text[:LONGEST - 3] + "..."


class ConfigError(ValueError):
    """A bad value for a named key: the message says the key, the value (cut, `shown`) and
    what is allowed. Pickles as itself with its message (the value travels as its cut
    text), so it crosses process boundaries (a sweep's workers to its driver) intact."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: {shown(value)} is not allowed; {allowed}")

    def __reduce__(self):
        return _rebuild, (self.key, shown(self.value), self.allowed)


class _Shown(str):
    """A value already cut for a message (after pickling): shown as it was."""

    def __repr__(self) -> str:
        return str(self)


def _rebuild(key: str, value_text: str, allowed: str) -> "ConfigError":
    return ConfigError(key, _Shown(value_text), allowed)


def check(ok: bool, key: str, value, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless `ok`: every rule's one-liner."""
    if not ok:
        raise ConfigError(key, value, allowed)


def env_number(name: str, default: float) -> float:
    """A setting from the environment that must be a finite number > 0 (ConfigError names
    the variable otherwise)."""
    import math
    import os

    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    check(math.isfinite(value) and value > 0, name, raw, "a number > 0 (environment variable)")
    return value
