"""One error type for every bad input, so the CLI can print one line and exit 2."""


class ConfigError(ValueError):
    """A bad value for a named key: the message says the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: {value!r} is not allowed; {allowed}")


def check(ok: bool, key: str, value, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless `ok`: every rule's one-liner."""
    if not ok:
        raise ConfigError(key, value, allowed)
