"""Shared work (ARCHITECTURE.md, "Shared work"): a sweep trains each piece of work once.

Work units, content-addressed by what decides their numbers:

    dense/<D>            level 0: the dense net trained from init (final weights, its level-0
                         record) and its weights at each rewind point asked for when it ran
                         (points/<k>.safetensors). D: the spec without prune.*, the rewind
                         point, the control, the retraining/stability settings, the method
                         and at_init.* (IMP and pruning at init train the same dense run)
    point/<D>-<k>        the dense run's weights after k iterations, for a k that dense/<D> did
                         not keep: trained again from init to k (bit-identical), never guessed
    trunk/<T>/level_XX   IMP level XX >= 1 of the ticket: mask, final weights, record.
                         T: the spec without the control and prune.levels (a longer trunk
                         serves a shorter trial: level XX does not depend on how many follow)

A ticket trial (control none) *is* its trunk: its folder is filled level by level from the
units. A control's IMP run in OUT/imp/ (the same folder the unshared control fills by
rerunning IMP) is filled the same way, and the control trains only its own levels.

Every trial, alone or in a pack, runs its levels through trials/runner/levels.py run_pack, and
on units through its `Shared`: per level, a published unit is copied in, one this process
claims is trained there (by the same code an unshared trial runs, so a trial's records
are the unshared trial's, bit for bit) and published, one another process holds is
waited for. Instability copies (trials/methods/stability.py) of a trunk level are part of its
unit (its key holds the stability section); those of level 0 start at the trial's own
rewind point and are measured in the trial's folder, never in a dense unit.

`Units` is the store's side: the sweep's (orchestrator/sweeps/units.py) finds a published
unit, or makes sure one process produces it while the others help elsewhere, and publishes
it whole. This module never touches storage itself.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional, Protocol

from trials.folder import layout
from trials.folder.record import STABILITY, LevelRecord
from trials.folder.store import TrialDir, copy_draws, load_tensors, save_tensors, write_json
from trials.loop.training import Job, TrainingDiverged
from trials.nets import masks
from trials.spec.sharing import (  # noqa: F401 - the units' names, with the units
    dense_name, level_name, plan, point_name, shareable, shares_levels, trunk_name,
)

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


def unit_record(folder: Path) -> LevelRecord:
    return LevelRecord.from_dict(json.loads((folder / layout.RECORD).read_text()))


def point(spec, dense: Path, units: Units, data, device, producer) -> dict:
    """The dense run's weights at spec's rewind point: kept in unit folder `dense`, else its
    point unit (trained by `producer.point`: trials/runner/levels.py Producer)."""
    k = spec.rewind_iteration
    kept = dense / POINTS / f"{k}{layout.TENSOR_SUFFIX}"
    if kept.exists():
        return load_tensors(kept)
    folder, _ = units.obtain(point_name(spec, k), lambda dest: producer.point(spec, k, dest, data, device))
    return load_tensors(folder / f"{k}{layout.TENSOR_SUFFIX}")


def hand_over(trial: TrialDir, level: int, dest: Path) -> None:
    """A trained level's unit files from its trial folder: mask (trunk levels), final weights,
    record. A dense unit's record leaves out instability: each trial measures its own
    from its own rewind point (module doc), whoever trained the unit."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (layout.MASK, layout.FINAL)[0 if level else 1:]:
        shutil.copyfile(trial.level_dir(level) / name, dest / name)
    copy_draws(trial.level_dir(level), dest)
    record = trial.record(level)
    write_json(dest / layout.RECORD, (record if level else record.replace(**dict.fromkeys(STABILITY))).to_dict())


def note(ledger: Path, spec, level: int, mine: bool) -> None:
    """units.json: which units a trial used, and which levels someone else trained."""
    entries = json.loads(ledger.read_text()) if ledger.exists() else {"trained": [], "reused": []}
    entries.update(dense=dense_name(spec), **({"trunk": trunk_name(spec)} if shares_levels(spec) else {}))
    kind, other = ("trained", "reused") if mine else ("reused", "trained")
    entries[other] = [lv for lv in entries[other] if lv != level]
    entries[kind] = sorted({*entries[kind], level})
    write_json(ledger, entries)


# ---------------------------------------------------------------- producing units


class Stop(Exception):
    """Ends a partial dense run once it has reached its rewind point."""


def keepers(folder: Path, points: set) -> dict:
    """Job hooks that save a dense run's weights at each rewind point in `points` to
    folder/<k>.safetensors (a dense unit's points/)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {k: (lambda state, k=k: save_tensors(folder / f"{k}{layout.TENSOR_SUFFIX}", state)) for k in sorted(points)}


class Shared:
    """A trial's or a pack's levels as shared work units (module doc): per unit its members need, taken
    when published; trained in the pack by one of them when the lease is ours; waited for
    (the store helps elsewhere meanwhile) after the rest when another process holds it."""

    def __init__(self, units: Units, members: list, train: Callable, measure: Optional[Callable], producer,
                 data, stage: Path):
        """`members`: the level runner's (trials/runner/levels.py Member); `train(work, level)`: its
        training of jobs {member: Job}, writing their levels; `measure(todo)`: the
        instability fields of [(member, level, mask)] (None: members taking a dense unit do
        not measure their own); `producer`: what trains a rewind point (point); `stage`: a
        scratch folder for dense runs' rewind points until their unit is published."""
        self.units, self.members, self.train, self.measure = units, members, train, measure
        self.producer, self.data, self.stage = producer, data, stage

    def level(self, todo: list, level: int, own: Optional[dict] = None) -> dict:
        """Level `level` of members `todo`: member -> its record, or the exception that ended it.
        `own` {member: Job}: levels that are no unit (a method's own, trials/methods/at_init.py), trained
        in the same pass as the units this pack trains."""
        own = own or {}
        needs: dict = {}
        for i in todo:
            spec = self.members[i].spec
            needs.setdefault(level_name(spec, level) if level else dense_name(spec), []).append(i)
        out, work, held = {}, {}, []
        for name, group in needs.items():  # one member trains a unit; the others take it after
            verdict, folder = self.units.claim(name)
            if verdict == "published":
                out.update(self.take(group, level, folder))
            elif verdict == "held":
                held.append((name, group))
            else:
                work[group[0]] = (name, group, self.job(name, group, level))
        trained = self.train({**{i: job for i, (_, _, job) in work.items()}, **own}, level) if work or own else {}
        for i, result in trained.items():
            if i in own:
                out[i] = result
                continue
            name, group, _ = work[i]
            out.update(self.publish(name, group, level, result, len(work) + len(own)))
        for name, group in held:
            out.update(self.wait(name, group, level))
        return out

    def job(self, name: str, group: list, level: int) -> Job:
        """group[0]'s job; a dense run keeps every rewind point the store and the group ask for."""
        if level:
            return self.members[group[0]].job(level)
        points = self.units.points(name) | {self.members[i].spec.rewind_iteration for i in group}
        return self.members[group[0]].job(0, keepers(self.stage / str(group[0]), points))

    def publish(self, name: str, group: list, level: int, result, pack: int) -> dict:
        """Publish the unit group[0] trained in a pack of `pack` (its failure: release the
        lease, and the group fails with it: the same work would fail the same way)."""
        def files(dest: Path) -> None:
            if isinstance(result, BaseException):
                raise result
            self.hand_over(group[0], level, dest)

        try:
            folder = self.units.publish(name, files, pack, None if isinstance(result, BaseException)
                                        else result.seconds / pack)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is the member's own failure
            if e is not result:
                raise
            return {i: result for i in group}
        note(self.members[group[0]].ledger, self.members[group[0]].spec, level, True)
        return {group[0]: result, **self.take(group[1:], level, folder)}

    def wait(self, name: str, group: list, level: int) -> dict:
        """A unit another process holds: blocks (helping elsewhere); if that process died, the
        lease passes to us and group[0] trains it here alone."""
        first = group[0]

        def alone(dest: Path) -> None:
            result = self.train({first: self.job(name, group, level)}, level)[first]
            if isinstance(result, BaseException):
                raise result
            self.hand_over(first, level, dest)

        try:
            folder, mine = self.units.obtain(name, alone)
        except TrainingDiverged as e:
            return {i: e for i in group}
        if not mine:
            return self.take(group, level, folder)
        note(self.members[first].ledger, self.members[first].spec, level, True)
        return {first: self.members[first].trial.record(level), **self.take(group[1:], level, folder)}

    def hand_over(self, i: int, level: int, dest: Path) -> None:
        hand_over(self.members[i].trial, level, dest)
        if level == 0:
            shutil.move(self.stage / str(i), dest / POINTS)

    def take(self, group: list, level: int, folder: Path) -> dict:
        """Copy a published unit into members' folders, as a trial alone would (a dense
        unit holds no instability: the members' own, from their own rewind points, is
        measured first, their copies together)."""
        record = unit_record(folder)
        fields: dict = {}
        if level == 0:
            for i in group:
                m = self.members[i]
                m.save_rewind(point(m.spec, folder, self.units, self.data, m.device, self.producer))
            if self.measure:
                fields = self.measure([(i, 0, masks.ones(self.members[i].layers)) for i in group])
        out = {}
        for i in group:
            m = self.members[i]
            if isinstance(fields.get(i), BaseException):
                out[i] = fields[i]
                continue
            if level == 0:
                out[i] = record.replace(**fields.get(i, {}))
                m.trial.level_dir(0).mkdir(parents=True, exist_ok=True)
                copy_draws(folder, m.trial.level_dir(0))
                m.trial.finish(0, masks.ones(m.layers), load_tensors(folder / layout.FINAL), out[i])
            else:
                out[i] = record
                m.trial.copy_level_from(folder, level, record)
            note(m.ledger, m.spec, level, False)
        return out
