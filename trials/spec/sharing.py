"""What a trial shares in a sweep (ARCHITECTURE.md, "Shared work"): the names of its work
units, content-addressed by what decides their numbers (dense/<D>, point/<D>-<k>,
trunk/<T>/level_XX; trials/runner/shared.py says what each holds), and the units it needs
(`plan`). Beside the spec, so that a planner (orchestrator/plan.py) names and orders units
without importing the engine; trials/runner/shared.py trains, copies and publishes them.
"""
from __future__ import annotations

import hashlib
import json

from trials import methods
from trials.folder import layout
from trials.spec.trial_spec import non_default

# what cannot change level 0's training: left out of the dense key
DENSE_FREE = ("prune", "rewind_iteration", "control", "retrain", "stability", "method", "at_init")
TRUNK_FREE = ("control", "prune.levels")  # what a trunk level does not depend on


def _key(spec, free: tuple[str, ...]) -> str:
    data = non_default(spec)
    for path in free:
        *parents, last = path.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# early-bird IMP levels (trials/methods/early_bird_watch.py) stop where the next level's mask stabilises, so
# their dense run depends on the pruning rule and k too, and a trunk level on whether it is the last
EARLY_DENSE_FREE = ("prune.levels", "control", "retrain", "stability", "method", "at_init")
EARLY_TRUNK_FREE = ("control",)


def dense_name(spec) -> str:
    return f"dense/{_key(spec, EARLY_DENSE_FREE if spec.early_bird.imp_levels else DENSE_FREE)}"


def point_name(spec, k: int) -> str:
    """A rewind point is the plain dense run's first k iterations, early-bird or not."""
    return f"point/{_key(spec, DENSE_FREE + ('early_bird',))}-{k}"


def trunk_name(spec) -> str:
    return f"trunk/{_key(spec, EARLY_TRUNK_FREE if spec.early_bird.imp_levels else TRUNK_FREE)}"


def level_name(spec, level: int) -> str:
    return f"{trunk_name(spec)}/{layout.level_dir(level)}"


def shareable(spec) -> bool:
    """IMP trials share; so does an at-init trial's dense level (IMP's); edge-popup levels are
    independent searches (each is its own work); method=early_bird's dense run stops where
    its own densities' masks stabilise and keeps its draws: its trial's own work (it trains
    that prefix, never the full dense run, whose unit keeps no draws)."""
    return methods.of(spec).shares != "none"


def shares_levels(spec) -> bool:
    """Whether levels >= 1 are trunk units: IMP's; an at-init level is its trial's own."""
    return methods.of(spec).shares == "trunk"


def plan(spec) -> list[dict]:
    """The units a trial needs, each {name, deps, iterations}: what a sweep's planner
    (orchestrator/plan.py) and the store's helpers need to know ahead of time."""
    t = spec.train
    units = [{"name": dense_name(spec), "deps": [], "iterations": t.iterations}]
    previous, trunk = units[0]["name"], None
    for level in range(1, spec.prune.levels + 1 if shares_levels(spec) else 1):
        trunk = trunk or trunk_name(spec)
        name = f"{trunk}/{layout.level_dir(level)}"  # level_name, its trunk named once
        units.append({"name": name, "deps": [previous], "iterations": t.iterations - spec.rewind_iteration})
        previous = name
    return units
