"""Where a sweep is: trials done / running / pending / failed, levels done of planned,
shared units, the share of the planned iterations and the time left. The live line of
`lth sweep run` (callbacks.LevelProgress) and `lth sweep status` both print `Progress.line`.

Planned work comes from the specs (orchestrator/plan.py: every grid trial, or
`num_samples` configurations drawn to estimate a search): each trial's levels as it
would train them alone, level 0 T iterations and each later level T - k (edge-popup: T per
density). The share done is the iterations of the levels finished over that total, and
the time left scales the elapsed time by what is not done yet. With shared units later
levels often arrive faster (copied, not trained), so the estimate errs long.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

STATES = ("done", "running", "pending", "failed")


def level_iterations(spec) -> list[int]:
    """The iterations of each of a trial's levels, as planned (module doc)."""
    t = spec.train.iterations
    if spec.method == "edge_popup":
        return [t] * (spec.last_level + 1)
    return [t] + [t - spec.rewind_iteration] * spec.last_level


@dataclass
class Progress:
    trials: int  # planned
    levels: int  # planned, all trials
    iterations: int  # planned, all levels
    units: int = 0  # planned shared units (0: sharing off)
    units_before: Optional[int] = 0  # published before this run started (reused); None: not known
    units_now: int = 0  # published now
    states: dict = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    levels_done: int = 0
    iterations_done: int = 0
    started: float = field(default_factory=time.time)

    @classmethod
    def of(cls, sweep, units_before: Optional[int] = 0) -> "Progress":
        from orchestrator import plan

        p = plan.plan(sweep)
        per_level = [level_iterations(spec) for spec in p.trials]
        return cls(trials=sweep.trial_count, levels=sum(map(len, per_level)),
                   iterations=sum(map(sum, per_level)), units=len(p.units), units_before=units_before)

    def add_level(self, iterations: int) -> None:
        self.levels_done += 1
        self.iterations_done += iterations

    def count(self, states: list[str]) -> None:
        """Each trial's state (done / running / pending / failed); trials not made yet
        (a search proposes them as it goes) count as pending."""
        self.states = dict.fromkeys(STATES, 0)
        for s in states:
            self.states[s] += 1
        self.states["pending"] += max(0, self.trials - len(states))

    def line(self, elapsed: bool = True) -> str:
        s = self.states
        parts = [f"{s['done']} done, {s['running']} running, {s['pending']} pending, {s['failed']} failed "
                 f"of {self.trials} trials",
                 f"levels {self.levels_done}/{self.levels}"]
        if self.units and self.units_before is None:
            parts.append(f"units {self.units_now}/{self.units} published")
        elif self.units:
            trained = max(0, self.units_now - self.units_before)
            parts.append(f"units {trained} trained, {self.units_before} reused, of {self.units}")
        share = self.iterations_done / self.iterations if self.iterations else 0.0
        parts.append(f"{100 * min(share, 1.0):.0f}% of {self.iterations:,} iterations")
        if elapsed:
            spent = time.time() - self.started
            left = spent * (1 - share) / share if 0 < share < 1 else None
            parts.append(clock(spent) + (f", ~{clock(left)} left" if left is not None else ""))
        return " | ".join(parts)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


TUNE_STATE = {"TERMINATED": "done", "ERROR": "failed", "RUNNING": "running", "PENDING": "pending",
              "PAUSED": "pending"}


def state_of(status: str) -> str:
    """A trials.csv / Tune status as one of STATES."""
    return TUNE_STATE.get(status, "pending")


def of_rows(sweep, rows: list[dict]) -> Progress:
    """Progress read from storage (`lth sweep status`, from any shell while the sweep runs):
    trials.csv's rows as results.collect builds them, and the units published."""
    from orchestrator import plan
    from orchestrator.sweeps.units import UnitStore

    p = Progress.of(sweep, units_before=None)
    last, started = {}, set()
    for r in rows:
        last[r["trial_id"]] = r["status"]
        if r.get("level") is not None and r.get("iterations") is not None:
            p.add_level(int(r["iterations"]))
            started.add(r["trial_id"])
    # Tune saves a running trial as PENDING (to restart it on restore): one with levels stored runs
    p.count([state_of(s) if state_of(s) != "pending" or t not in started else "running" for t, s in last.items()])
    if p.units:
        planned = plan.plan(sweep).units
        p.units_now = len(planned.keys() & UnitStore(sweep.storage, packed=sweep.packed).published_names())
    return p
