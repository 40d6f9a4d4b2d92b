"""What a trial run shows on the terminal: progress on stderr, the records table on stdout."""
from __future__ import annotations

import sys
import time

from trials.folder.record import LevelRecord


class Progress:
    """One line per finished level, and a line at most every `every_seconds` within a level."""

    def __init__(self, levels: int, every_seconds: float = 10.0):
        self.levels, self.every, self.last = levels, every_seconds, time.monotonic()

    def step(self, level: int, iteration: int, total: int, val_loss: float) -> None:
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(f"  level {level}/{self.levels}  iteration {iteration}/{total}  val_loss {val_loss:.4f}",
                  file=sys.stderr, flush=True)

    def level_done(self, r: LevelRecord, out) -> None:
        print(f"level {r.level}/{self.levels} done: density {r.density:.4f}  test_acc {r.test_acc:.4f}"
              f"  early stop {r.early_stop_iteration} ({r.test_acc_at_early_stop:.4f})"
              f"  {r.seconds:.1f} s", file=sys.stderr, flush=True)
        self.last = time.monotonic()


def records_table(records: list[LevelRecord]) -> str:
    """The trial's levels; an `instab.` column (error barrier, %) when any level measured it."""
    unstable = any(r.stability_error_barrier is not None for r in records)
    head = f"{'level':>5} {'density':>8} {'params':>9} {'test_acc':>9} {'es_iter':>8} {'es_acc':>8} {'seconds':>8}"
    rows = [f"{r.level:>5} {r.density:>8.4f} {r.remaining_params:>9} {r.test_acc:>9.4f} "
            f"{r.early_stop_iteration:>8} {r.test_acc_at_early_stop:>8.4f} {r.seconds:>8.1f}"
            + (f" {_percent(r.stability_error_barrier):>8}" if unstable else "") for r in records]
    return "\n".join([head + (f" {'instab.':>8}" if unstable else ""), *rows])


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
