"""Where a sweep is: trials done / running / pending / failed, levels done of planned,
shared units published, the share of the planned iterations and the time left. The live
line of `lth sweep run` (callbacks.LevelProgress), `lth sweep status` and the end of a
sweep all count here, and `lth sweep plan` prints the same planned totals (plan.totals).

Planned work comes from the specs (orchestrator/plan.py: every grid trial, or
`num_samples` configurations drawn to estimate a search). "Iterations" are those of the
trials' levels, each trial's levels counted once as it records them: level 0 T
iterations and each later level T - k (edge-popup: T per density), whether the trial
trained the level or took it from a shared unit. Optimizer steps actually run are fewer
with sharing and more for a control that retrains IMP (`lth sweep plan`'s "to train").
The share done is the iterations of the levels recorded over that total, levels recorded
before a resume included, and the time left is what is not done yet at the pace of this
driver (the iterations recorded since it started, over its time). With shared units later levels often arrive faster (copied, not
trained), so the estimate errs long.

A line fits a width (the terminal's at a terminal): fields shorten first, from the
right, then the least needed go (units, levels, the time), and a last resort cuts the line.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

STATES = ("done", "running", "pending", "failed")


def tally(states: list[str], trials: int) -> dict:
    """Trials per state (STATES); trials not made yet (a search proposes them as it goes,
    or Tune had not created them when the driver last saved) count as pending."""
    counts = dict.fromkeys(STATES, 0)
    for s in states:
        counts[s] += 1
    counts["pending"] += max(0, trials - len(states))
    return counts


def trials_field(counts: dict, trials: int, short: bool = False) -> str:
    """Failed trials are named only when there are some: a sweep that goes well says nothing of failing."""
    failed = f", {counts['failed']} failed" if counts["failed"] else ""
    if not short:
        return f"{counts['done']} done, {counts['running']} running, {counts['pending']} pending{failed} of {trials} trials"
    return f"{counts['done']}/{trials} done" + (f", {counts['running']} running" if counts["running"] else "") + failed


@dataclass
class Progress:
    trials: int  # planned
    levels: int  # planned, all trials
    iterations: int  # planned, all levels (module doc)
    units: int = 0  # planned shared units (0: sharing off)
    units_before: Optional[int] = 0  # published before this run started (reused); None: not known
    units_now: int = 0  # published now
    states: dict = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    levels_done: int = 0
    iterations_done: int = 0
    iterations_before: int = 0  # done before this driver started (a resume): not in its pace
    started: float = field(default_factory=time.time)

    @classmethod
    def of(cls, sweep, units_before: Optional[int] = 0, summary: "Optional[Planned]" = None) -> "Progress":
        """`summary`: the sweep's `planned` when the caller has it already."""
        t = summary or planned(sweep)
        return cls(trials=t.trials, levels=t.levels, iterations=t.iterations, units=len(t.units),
                   units_before=units_before)

    def add_level(self, iterations: int) -> None:
        self.levels_done += 1
        self.iterations_done += iterations

    def stopped(self, planned: list[int], recorded: int) -> None:
        """A trial that stop_when_not_matching ended after `recorded` of its `planned` levels
        (their iterations): the levels it will never run leave the totals, so a finished
        sweep reads 100%."""
        for iterations in planned[recorded:]:
            self.levels -= 1
            self.iterations -= iterations

    def count(self, states: list[str]) -> None:
        """Each trial's state (done / running / pending / failed): tally."""
        self.states = tally(states, self.trials)

    @property
    def share(self) -> float:
        return min(self.iterations_done / self.iterations, 1.0) if self.iterations else 0.0

    def fields(self, elapsed: bool = True, trials: bool = True) -> list[tuple[str, str, int]]:
        """(full text, short text, rank) of each field, left to right; the highest rank is
        the first to go where the line must be narrower (fit)."""
        out = []
        if trials:
            out.append((trials_field(self.states, self.trials), trials_field(self.states, self.trials, short=True), 0))
        out.append((f"levels {self.levels_done}/{self.levels}",) * 2 + (3,))
        if self.units:
            units = f"units {self.units_now}/{self.units}"
            out.append((units + (f" ({self.units_before} reused)" if self.units_before else ""), units, 4))
        pct = f"{100 * self.share:.0f}%"
        out.append((f"{pct} of {self.iterations:,} iterations", pct, 1))
        if elapsed:
            spent = time.time() - self.started
            new = self.iterations_done - self.iterations_before  # at this driver's pace
            todo = self.iterations - self.iterations_done
            left = f"~{clock(spent * todo / new)} left" if new > 0 and todo > 0 else ""
            out.append((clock(spent) + (f", {left}" if left else ""), left or clock(spent), 2))
        return out

    def line(self, elapsed: bool = True, width: Optional[int] = None, prefix: str = "", trials: bool = True) -> str:
        """`prefix` and the fields, in `width` characters at most when given (module doc)."""
        return fit(prefix, self.fields(elapsed, trials), width)


def fit(prefix: str, fields: list[tuple[str, str, int]], width: Optional[int] = None, sep: str = " | ") -> str:
    """`prefix` + the fields joined: in full; else, to fit `width`, shortened one field at
    a time from the right; then without the fields of highest rank (what a glance needs
    least: units, levels, the time); at last cut."""
    texts = [full for full, _, _ in fields]
    line = prefix + sep.join(texts)
    if width is None or len(line) <= width:
        return line
    for i in reversed(range(len(fields))):
        texts[i] = fields[i][1]
        line = prefix + sep.join(texts)
        if len(line) <= width:
            return line
    keep = list(range(len(fields)))
    for i in sorted(keep, key=lambda i: -fields[i][2])[:-1]:
        keep.remove(i)
        line = prefix + sep.join(texts[j] for j in keep)
        if len(line) <= width:
            return line
    return line[: max(0, width - 3)] + "..." if width >= 3 else line[:width]


def columns(stream) -> int:
    """The width of the terminal `stream` writes to: COLUMNS where set (as shutil reads
    it), else the terminal's own, else 80 (a terminal that reports no size, or none)."""
    import os

    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


TUNE_STATE = {"TERMINATED": "done", "ERROR": "failed", "RUNNING": "running", "PENDING": "pending",
              "PAUSED": "pending"}


def state_of(status: str) -> str:
    """A trials.csv / Tune status as one of STATES."""
    return TUNE_STATE.get(status, "pending")


def row_states(rows: list[dict]) -> list[str]:
    """Each trial's state from trials.csv's rows (results.collect): Tune saves a running
    trial as PENDING (to restart it on restore), so one with levels stored counts as
    running (started, not finished)."""
    last, started = {}, set()
    for r in rows:
        last[r["trial_id"]] = r["status"]
        if r.get("level") is not None:
            started.add(r["trial_id"])
    return [state_of(s) if state_of(s) != "pending" or t not in started else "running" for t, s in last.items()]


PLAN_FILE = "plan.json"  # in the sweep's folder: the planned totals and unit names (Planned)
_PLANS: dict = {}  # this process: plan_key -> plan.Plan


@dataclass
class Planned:
    """What progress counts against: plan.totals and the planned units' names."""
    trials: int
    levels: int
    iterations: int
    units: list  # names, breadth-first (plan.work_units)
    estimated: bool  # a search's draw (plan.Plan.estimated)


def plan_key(sweep) -> str:
    """The sweep (every key) and the code that plans it: a saved plan is used only where both match."""
    import hashlib
    import json

    from trials.folder.version import code_version

    text = json.dumps([sweep.to_dict(), code_version()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def full_plan(sweep):
    """plan.plan(sweep), made once per process: it builds every trial's spec and names its
    units (seconds at 10,000 trials), and a driver asks at its start for the units' broker
    and for the progress line."""
    from orchestrator import plan

    key = plan_key(sweep)
    if key not in _PLANS:
        _PLANS[key] = plan.plan(sweep)
    return _PLANS[key]


def planned(sweep, save: bool = False) -> Planned:
    """The sweep's Planned: from its folder's PLAN_FILE where the driver saved it for this
    sweep and code (`lth sweep status` then plans nothing), else planned here; `save`
    writes it there (the driver, at its start)."""
    import json

    from orchestrator import plan
    from orchestrator.sweeps.storage import read_text, sweep_path, write_text

    key, path = plan_key(sweep), f"{sweep_path(sweep.storage, sweep.name)}/{PLAN_FILE}"
    if key not in _PLANS:
        try:
            saved = json.loads(read_text(path) or "{}")
        except (OSError, ValueError):
            saved = {}
        if saved.get("key") == key:
            return Planned(**saved["plan"])
    p = full_plan(sweep)
    t = plan.totals(sweep, p)
    summary = Planned(t.trials, t.levels, t.iterations, list(p.units), p.estimated)
    if save:
        write_text(path, json.dumps({"key": key, "plan": summary.__dict__}))
    return summary


def of_rows(sweep, rows: list[dict], save: bool = False) -> Progress:
    """Progress read from storage (`lth sweep status`, from any shell while the sweep runs;
    the live line's start after a resume): trials.csv's rows as results.collect builds
    them, and the units published. `save`: a plan made here is saved (`planned`)."""
    from orchestrator.config import spec_at
    from orchestrator.objectives import STOPPED
    from orchestrator.sweeps.units import published_names

    summary = planned(sweep, save)
    p = Progress.of(sweep, units_before=None, summary=summary)
    recorded: dict = {}
    for r in rows:
        if r.get("level") is not None and r.get("iterations") is not None:
            p.add_level(int(r["iterations"]))
            recorded[r["trial_id"]] = recorded.get(r["trial_id"], 0) + 1
    p.count(row_states(rows))
    made = {r["trial_id"]: {**{k: r.get(k) for k in sweep.varied}, "seed": r.get("seed")} for r in rows}
    for trial_id, r in {r["trial_id"]: r for r in rows}.items():  # each trial's last row
        if r.get(STOPPED) is True:
            from orchestrator import plan  # here: a reader rarely needs the planner

            p.stopped(plan.level_iterations(spec_at(sweep.base, made[trial_id])), recorded.get(trial_id, 0))
    if p.units:
        names = set(summary.units)
        if summary.estimated:  # a search's units are those of the configurations it made, not of the draw
            from orchestrator import plan

            names = set(plan.work_units([spec_at(sweep.base, c) for c in made.values()]))
        p.units_now = len(names & published_names(sweep.storage, sweep.packed))
    return p
