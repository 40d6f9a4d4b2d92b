"""Set up once in each process a sweep runs on Ray (Tune's trial actors, the units
broker): a SIGTERM that lands in a callback ends no sweep with a traceback.

Ray's raylet stops a worker it no longer needs with SIGTERM, and Ray's handler for it
raises SystemExit in the worker's main thread. Most of the time that ends the worker
quietly. When the signal is handled while the main thread runs a weakref callback or a
`__del__` (a WeakSet's `_remove`, say), Python cannot raise it there: it reports it as
"Exception ignored in ..." with a traceback ending in `SystemExit: 1` on the worker's
stderr, which Ray forwards to the driver, after a sweep that went well. Python hands such
exceptions to `sys.unraisablehook`; the hook installed here drops SystemExit and passes
everything else on. The worker's fate is Ray's as before: it goes when the raylet kills
it, or when the raylet goes (ARCHITECTURE.md, "The sweep runner").
"""
from __future__ import annotations

import sys


def quiet_exit() -> None:
    """Drop unraisable SystemExit reports in this process (idempotent; any thread)."""
    hook = sys.unraisablehook
    if getattr(hook, "lth_quiet_exit", False):
        return

    def drop_exit(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, SystemExit):
            return
        hook(unraisable)

    drop_exit.lth_quiet_exit = True
    sys.unraisablehook = drop_exit
