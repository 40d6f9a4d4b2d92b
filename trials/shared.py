"""Shared work (ARCHITECTURE.md, "Shared work"): a sweep trains each piece of work once.

Work units, content-addressed by what decides their numbers:

    dense/<D>            level 0: the dense net trained from init (final weights, its level-0
                         record) and its weights at each rewind point asked for when it ran
                         (points/<k>.safetensors). D: the spec without prune.*, the rewind
                         point, the control and the retraining/stability settings
    point/<D>-<k>        the dense run's weights after k iterations, for a k that dense/<D> did
                         not keep: trained again from init to k (bit-identical), never guessed
    trunk/<T>/level_XX   IMP level XX >= 1 of the ticket: mask, final weights, record.
                         T: the spec without the control and prune.levels (a longer trunk
                         serves a shorter trial: level XX does not depend on how many follow)

A ticket trial (control none) *is* its trunk: its folder is filled level by level from the
units (`Trunk`). A control gets a `Trunk` in OUT/imp/ (the same folder the unshared
control fills by rerunning IMP) and trains only its own levels (trials/lottery.py Control).

Every unit is produced by the same engine code an unshared trial runs (Lottery.train_dense,
Lottery.level on a trunk folder), so a trial's records are the unshared trial's, bit for bit.
Instability copies (trials/stability.py) of a trunk level are part of its unit (its key holds
the stability section); those of level 0 start at the trial's own rewind point and are
measured in the trial's folder, not shared.

A pack of trials (trials/packed.py run_pack) takes its members' levels from the same units,
through the same helpers (unit_record, point, hand_over, note) and the store's non-blocking
`claim`: a unit the pack holds is trained there, beside the pack's other members.

`Units` is the store's side: the sweep's (orchestrator/sweeps/units.py) finds a published
unit, or makes sure one process produces it while the others help elsewhere, and publishes
it whole. This module never touches storage itself.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Protocol

from trials import layout, masks, models, stability
from trials.lottery import Control, Lottery, engine
from trials.record import STABILITY, LevelRecord
from trials.spec import non_default
from trials.store import TrialDir, load_tensors, save_tensors, write_json
from trials.training import train_level

# what cannot change level 0's training: left out of the dense key
DENSE_FREE = ("prune", "rewind_iteration", "control", "retrain", "stability")
TRUNK_FREE = ("control", "prune.levels")  # what a trunk level does not depend on
POINTS = "points"  # a dense unit's folder of rewind points: points/<k>.safetensors


class Units(Protocol):
    def claim(self, name: str) -> tuple[str, Optional[Path]]:
        """Without waiting: ("published", a local folder holding unit `name`, read-only),
        ("yours", None): this process holds its lease and must `publish` it, or ("held",
        None): another process is producing it."""

    def publish(self, name: str, produce: Callable[[Path], None], pack: int = 1,
                seconds: Optional[float] = None) -> Path:
        """Publish unit `name`, claimed "yours", from the files `produce(folder)` writes (an
        exception from it releases the lease, marked failed); returns its local folder. The
        training log records `pack` (how many trials trained together) and `seconds` (this
        unit's share of training done before the call; default: produce's own time)."""

    def obtain(self, name: str, produce: Callable[[Path], None], pack: int = 1) -> tuple[Path, bool]:
        """A local folder holding unit `name` (read-only), produced by `produce(folder)`
        here when nobody has it yet; True when this process produced it. Blocks while
        another process holds it (and helps with other units meanwhile)."""

    def points(self, dense: str) -> set[int]:
        """The rewind points a dense run should keep: every one the sweep asks for."""


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


def dense_name(spec) -> str:
    return f"dense/{_key(spec, DENSE_FREE)}"


def point_name(spec, k: int) -> str:
    return f"point/{_key(spec, DENSE_FREE)}-{k}"


def trunk_name(spec) -> str:
    return f"trunk/{_key(spec, TRUNK_FREE)}"


def level_name(spec, level: int) -> str:
    return f"{trunk_name(spec)}/{layout.level_dir(level)}"


def unit_record(folder: Path) -> LevelRecord:
    return LevelRecord.from_dict(json.loads((folder / layout.RECORD).read_text()))


def point(spec, dense: Path, units: Units, data, device, trainer: Optional["Trainer"] = None) -> dict:
    """The dense run's weights at spec's rewind point: kept in unit folder `dense`, else its point unit."""
    k = spec.rewind_iteration
    kept = dense / POINTS / f"{k}{layout.TENSOR_SUFFIX}"
    if kept.exists():
        return load_tensors(kept)
    trainer = trainer or SINGLE
    folder, _ = units.obtain(point_name(spec, k), lambda dest: trainer.point(spec, k, dest, data, device))
    return load_tensors(folder / f"{k}{layout.TENSOR_SUFFIX}")


def hand_over(trial: TrialDir, level: int, dest: Path) -> None:
    """A trained level's unit files from its trial folder: mask (trunk levels), final weights,
    record. A dense unit's record leaves out instability: each trial measures its own
    from its own rewind point (module doc), whoever trained the unit."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (layout.MASK, layout.FINAL)[0 if level else 1:]:
        shutil.copyfile(trial.level_dir(level) / name, dest / name)
    record = trial.record(level)
    write_json(dest / layout.RECORD, (record if level else record.replace(**dict.fromkeys(STABILITY))).to_dict())


def note(ledger: Path, spec, level: int, mine: bool) -> None:
    """units.json: which units a trial used, and which levels someone else trained."""
    entries = json.loads(ledger.read_text()) if ledger.exists() else {"trained": [], "reused": []}
    entries.update(dense=dense_name(spec), trunk=trunk_name(spec))
    kind, other = ("trained", "reused") if mine else ("reused", "trained")
    entries[other] = [lv for lv in entries[other] if lv != level]
    entries[kind] = sorted({*entries[kind], level})
    write_json(ledger, entries)


def shareable(spec) -> bool:
    """IMP trials share; edge-popup levels are independent searches (each is its own work)."""
    return spec.method == "imp"


def plan(spec) -> list[dict]:
    """The units a trial needs, each {name, deps, iterations}: what a sweep's planner
    (orchestrator/plan.py) and the store's helpers need to know ahead of time."""
    t = spec.train
    units = [{"name": dense_name(spec), "deps": [], "iterations": t.iterations}]
    previous = units[0]["name"]
    for level in range(1, spec.prune.levels + 1):
        name = level_name(spec, level)
        units.append({"name": name, "deps": [previous], "iterations": t.iterations - spec.rewind_iteration})
        previous = name
    return units


# ---------------------------------------------------------------- producing units


class Stop(Exception):
    """Ends a partial dense run once it has reached its rewind point."""


def produce_dense(spec, dest: Path, data, device, points: set[int], progress=None) -> None:
    """dense/<D>: level 0 exactly as Lottery.train_dense trains it, keeping every point."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        run = Lottery(spec.replace(control="none"), Path(tmp) / "trial", data, device, progress)
        (dest / POINTS).mkdir(parents=True, exist_ok=True)
        keep = {k: (lambda state, k=k: save_tensors(dest / POINTS / f"{k}{layout.TENSOR_SUFFIX}", state))
                for k in sorted(points)}
        record = run.train_dense(keep, measure=False)  # instability: the trials' own (module doc)
        shutil.copyfile(run.trial.level_dir(0) / layout.FINAL, dest / layout.FINAL)
        write_json(dest / layout.RECORD, record.to_dict())


def produce_point(spec, k: int, dest: Path, data, device) -> None:
    """point/<D>-<k>: the dense run's first k iterations again, stopped at k."""
    net = models.build(spec.model, data.info, seed=spec.seed, device=device)
    layers = masks.Layers.of(net)
    dest.mkdir(parents=True, exist_ok=True)

    def keep(state):
        save_tensors(dest / f"{k}{layout.TENSOR_SUFFIX}", state)
        raise Stop

    try:
        train_level(net, masks.ones(layers), data, spec.train, spec.seed, 0, {k: keep})
    except Stop:
        return
    raise RuntimeError(f"the dense run never reached iteration {k}")  # validate() bounds k


class Trainer:
    """How a trial that must produce a unit trains it: the single-trial engine (this class),
    or, in a sweep with packs, trials/packed.py's pack of one, so that every unit of such
    a sweep has the numbers a pack gives it, whoever trains it (ARCHITECTURE.md, "Packs in
    sweeps")."""

    def level(self, spec, out: Path, level: int, data, device, progress=None) -> None:
        """Train and write level `level` >= 1 of the trial in `out` (its earlier levels are there)."""
        Lottery(spec, out, data, device, progress).level(level)

    def dense(self, spec, dest: Path, data, device, points: set, progress=None) -> None:
        produce_dense(spec, dest, data, device, points, progress)

    def point(self, spec, k: int, dest: Path, data, device) -> None:
        produce_point(spec, k, dest, data, device)


SINGLE = Trainer()


class Trunk:
    """The ticket's IMP levels in folder `out`, filled from shared units (module doc).
    Same interface as trials.lottery.Lottery: `level(n) -> LevelRecord` and `.trial`."""

    def __init__(self, spec, out: Path, data, device, units: Units, progress=None,
                 ledger: Optional[Path] = None, measure: bool = True, trainer: Trainer = SINGLE):
        """`measure`: level 0's instability too, where the spec asks (a helper's scratch
        trunk, which only produces a unit, skips it). `trainer`: what trains a unit this
        trunk must produce."""
        self.trainer = trainer
        self.spec = spec.replace(control="none")
        self.data, self.device, self.units, self.progress = data, device, units, progress
        self.trial = TrialDir(out, self.spec)
        self.trial.begin()
        self.trial.reopen_from(self.trial.first_missing(self.spec.prune.levels))
        self.ledger = ledger or Path(out) / layout.UNITS
        self.measure = measure

    def level(self, level: int) -> LevelRecord:
        if self.trial.done(level):
            return self.trial.record(level)
        if level == 0:
            return self._dense()
        self.level(level - 1)
        name = level_name(self.spec, level)
        folder, mine = self.units.obtain(name, lambda dest: self._train(level, dest))
        if not mine:
            self.trial.copy_level_from(folder, level, unit_record(folder))
        note(self.ledger, self.spec, level, mine)
        return self.trial.record(level)

    def _train(self, level: int, dest: Path) -> None:
        """Train trunk level `level` in this folder (levels before it are here), then hand
        its files to the store."""
        self.trainer.level(self.spec, self.trial.path, level, self.data, self.device, self.progress)
        hand_over(self.trial, level, dest)

    def _dense(self) -> LevelRecord:
        name = dense_name(self.spec)
        folder, mine = self.units.obtain(
            name, lambda dest: self.trainer.dense(self.spec, dest, self.data, self.device,
                                                  self.units.points(name) | {self.spec.rewind_iteration},
                                                  self.progress))
        self.trial.save_rewind(point(self.spec, folder, self.units, self.data, self.device, self.trainer))
        record = unit_record(folder)
        info, m = self.data.info, self.spec.model
        layers = masks.Layers.of(models.shell(m.name, info.shape, info.num_classes, m.width))
        ones = masks.ones(layers)
        if self.measure and stability.asked(self.spec, 0):  # copies from this trial's rewind point: its own work
            record = Lottery(self.spec, self.trial.path, self.data, self.device).measure_stability(0, record, ones)
        self.trial.finish(0, ones, load_tensors(folder / layout.FINAL), record)
        note(self.ledger, self.spec, 0, mine)
        return record


def runner(units: Units, trainer: Trainer = SINGLE) -> Callable:
    """run_lottery's `runner` for a trial whose IMP work comes from `units`."""
    def build(spec, out: Path, data, device, progress=None):
        if not shareable(spec):
            return engine(spec, out, data, device, progress)
        if spec.control == "none":
            return Trunk(spec, out, data, device, units, progress, trainer=trainer)
        trunk = Trunk(spec, out / layout.IMP, data, device, units, progress, ledger=out / layout.UNITS,
                      trainer=trainer)
        return Control(spec, out, data, device, progress, imp=trunk)

    return build


def produce(name: str, spec, units: Units, data, device, scratch: Path, trainer: Trainer = SINGLE) -> None:
    """Produce unit `name`, one of `spec`'s (plan(spec)), for the store's helpers: a trunk
    level through a Trunk in a scratch folder (its earlier levels are fetched)."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        trunk = Trunk(spec, Path(tmp) / "trunk", data, device, units, ledger=Path(tmp) / layout.UNITS,
                      measure=False, trainer=trainer)
        if name.startswith("dense/"):
            trunk.level(0)
        else:
            trunk.level(layout.level_of(name.rsplit("/", 1)[1]))
