"""Packs: K IMP trials trained together in one process, each in its own trial folder
(ARCHITECTURE.md, "Speed and packs" and "Packs in sweeps").

A pack's members share the model architecture (`model.name`, `width`), the dataset,
`train.batch_size`, `iterations`, `eval_interval`, `precision`, `optimizer` and the
device (check_pack); everything else may differ: seed (init, data order, augmentation),
`model.init`, the learning-rate schedule, weight decay, momentum, `prune.*`,
`rewind_iteration`. They train through the one training loop (trials/training.py
train_members) with the stacked arithmetic (trials/stacked.py Stacked), level by level:

    member    its own masks, batches, schedule, optimizer state, rewind point, early
              stopping, divergence check and trial folder (the same files and state keys
              as the trial alone, LevelRecords as trials.lottery.run_lottery writes).
              `seconds` in its record is the pack's wall clock for the level.
    rewind    members whose level starts at different iterations share one loop from the
              smallest k; a member is carried along untouched until its k, then starts
              with a fresh optimizer state and its start's running statistics.
    failure   a member whose training loss becomes NaN/inf fails alone (into `errors`, or
              PackFailed once the others have finished).

Shared units (`run_pack(..., units=store)`, trials/shared.py): every member's level L is
a work unit, as for a single trial (`shared.Trunk`): dense/<D> at level 0, the trunk's
level_XX after. Per level and unit (`Shared`): a published unit is copied into the
members' folders; one the store leases to this process is trained in the pack by one
member and published from its folder (a dense run keeping every rewind point the store
and the members ask for), the members needing the same unit copying it after; one that
another process holds is waited for after the rest of the level has trained
(`Units.obtain`: it helps elsewhere meanwhile, and trains the member alone if that
process died). The unit log records `pack` (how many members trained together) and
`seconds` (the unit's share of their wall clock). A unit that one trial of a packed sweep
must produce alone goes through `PackOfOne`, so on CPU a unit's numbers do not depend on
who trained it.

Instability copies (trials/stability.py) of every member that asks for them at a level
train together after the level, as one pack (`instability`).

Controls (reinit, random_prune) pack too: a control member's IMP run is a member of its
own in OUT/imp/ (as trials.lottery.Control keeps it; not reported), trained or taken
from units with the pack's IMP members at each level, before the controls' levels, which
then train together.

Not packed yet (check_pack names the reason): edge-popup; and models with parameters or running state in a
module without a stacked layer (trials/stacked.py why_not_packable).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch.nn as nn

from trials import datasets, layout, masks, models, pruning, shared, stability
from trials.errors import ConfigError
from trials.lottery import control_mask, control_start, resolve_device
from trials.record import LevelRecord
from trials.store import TrialDir, load_tensors, save_tensors, state_of
from trials.stacked import Stacked, why_not_packable
from trials.training import Job, TrainingDiverged, train_members

SHARED_TRAIN = ("optimizer", "batch_size", "iterations", "eval_interval", "precision")


class PackFailed(RuntimeError):
    """Members of a pack failed; the others finished. `errors`: member index -> exception."""

    def __init__(self, errors: dict, records: list):
        self.errors, self.records = errors, records
        super().__init__("; ".join(f"member {i}: {e}" for i, e in sorted(errors.items())))


# ---------------------------------------------------------------- whole trials


def check_pack(specs: list, outs: list) -> None:
    """Refuse a pack that cannot train together, before anything is written."""
    if not specs or len(specs) != len(outs):
        raise ConfigError("pack", len(specs), f"allowed: one or more specs, one folder each (got {len(outs)} folders)")
    if len({str(Path(o).resolve()) for o in outs}) != len(outs):
        raise ConfigError("pack", [str(o) for o in outs], "allowed: a distinct folder per member")
    first = specs[0]
    for i, s in enumerate(specs):
        if s.method != "imp":
            raise ConfigError("method", s.method, "allowed in a pack: imp (edge-popup trials run one per process)")
        for path, a, b in (("model.name", s.model.name, first.model.name), ("model.width", s.model.width, first.model.width),
                           ("dataset", s.dataset, first.dataset), ("device", s.device, first.device),
                           *((f"train.{f}", getattr(s.train, f), getattr(first.train, f)) for f in SHARED_TRAIN)):
            if a != b:
                raise ConfigError(path, a, f"allowed in this pack: {b!r} (member 0's); a pack's members share "
                                  "model architecture, dataset, device and train." + "/".join(SHARED_TRAIN))
    template = models.shell(first.model.name, datasets.info(first.dataset).shape,
                            datasets.info(first.dataset).num_classes, first.model.width)
    reason = why_not_packable(template)
    if reason:
        raise ConfigError("model.name", first.model.name, f"not packable: {reason}")


def why_not_packed(spec) -> Optional[ConfigError]:
    """Why this trial cannot be packed (check_pack's error, naming the key), or None."""
    try:
        check_pack([spec], [Path(".")])
    except ConfigError as e:
        return e
    return None


def pack_key(spec) -> Optional[tuple]:
    """What members of one pack must share (None: this trial cannot be packed): a planner
    groups trials by it and packs each group's trials K at a time."""
    if why_not_packed(spec) is not None:
        return None
    return (spec.model.name, spec.model.width, spec.dataset, spec.device,
            *(getattr(spec.train, f) for f in SHARED_TRAIN))


class Member:
    """One trial of a pack: its folder, init and layers; job(L) -> the Job of its level L."""

    def __init__(self, spec, out: Path, data, device, ledger: Optional[Path] = None):
        """`ledger`: its units.json (a control's IMP trunk member writes its control's)."""
        self.spec, self.device, self.out, self.info = spec, device, Path(out), data.info
        self.ledger = ledger or self.out / layout.UNITS
        self.trial = TrialDir(out, spec)
        self.trial.begin()
        self.trial.reopen_from(self.trial.first_missing(spec.prune.levels))
        net = models.build(spec.model, data.info, seed=spec.seed, device=device)
        self.init, self.layers = state_of(net), masks.Layers.of(net)

    def job(self, level: int, keep: Optional[dict] = None) -> Job:
        """As trials.lottery.Lottery.level: level 0 from init keeping the rewind point at k
        (and handing the iterations in `keep` to their callbacks, as Lottery.train_dense);
        level L prunes L-1's final weights and starts where spec.retrain says
        (Lottery.start_weights_of, stability.retraining): the survivors at the rewind
        point, or L-1's final weights under the new mask (lr_rewind, finetune)."""
        k = self.spec.rewind_iteration
        if level == 0:
            hooks = {**(keep or {}), k: self.trial.save_rewind}
            if keep and k in keep:
                hooks[k] = lambda state: (keep[k](state), self.trial.save_rewind(state))
            return Job(self.spec.train, self.spec.seed, masks.ones(self.layers), self.init, 0, hooks)
        mask = pruning.prune(self.spec.prune, self.trial.final(level - 1), self.trial.mask(level - 1), self.layers)
        start, schedule = stability.retraining(self.spec, level)
        return Job(self.spec.train, self.spec.seed, mask, self.start_weights_of(level), start, schedule=schedule)

    def control_job(self, level: int, imp: "Member") -> Job:
        """A control's level L >= 1 (trials.lottery.Control.level): the control network at
        control_mask(L) of its IMP run `imp`, from where spec.retrain starts in its own folder."""
        mask = control_mask(self.spec, level, imp.trial, self.trial, self.layers)
        start, schedule = stability.retraining(self.spec, level)
        return Job(self.spec.train, self.spec.seed, mask, self.start_weights_of(level), start, schedule=schedule)

    def control_dense(self, imp: "Member", record: LevelRecord) -> LevelRecord:
        """A control's level 0: its IMP run's (record included), from its own rewind point."""
        self.trial.save_rewind(control_start(self.spec, imp.trial, self.info))
        self.trial.copy_level(imp.trial, 0, record)
        return record

    def start_weights_of(self, level: int) -> dict:
        """As Lottery.start_weights_of: the rewind point (level 0's copies, weight_rewind), or
        level L-1's final weights (lr_rewind, finetune)."""
        if level == 0 or self.spec.retrain == "weight_rewind":
            return self.trial.rewind(self.device)
        return self.trial.final(level - 1)

    def finish(self, level: int, job: Job, result: dict, fields: Optional[dict] = None) -> LevelRecord:
        """Write the level; `fields`: its instability, measured before (the record is
        complete before the level's files and DONE exist)."""
        final = result.pop("final")
        record = LevelRecord(level=level, **masks.describe(job.mask, self.layers), **result, **(fields or {}))
        self.trial.finish(level, job.mask, final, record)
        return record


def instability(members: list, template: nn.Module, data, todo: list) -> dict:
    """The stability fields of the levels `todo` [(member, level, mask)] that ask for them:
    every member's copies (trials/stability.py copy_jobs) train together, as one pack.
    member -> fields, or the exception of a copy that failed (the member fails with it,
    as a lone trial does)."""
    todo = [(i, level, mask) for i, level, mask in todo if stability.asked(members[i].spec, level)]
    jobs = {i: stability.copy_jobs(members[i].spec, level, members[i].start_weights_of(level), mask)
            for i, level, mask in todo}
    if not jobs:
        return {}
    results = iter(train_pack(template, [job for group in jobs.values() for job in group], data))
    out = {}
    for i, level, mask in todo:
        copies = [next(results) for _ in jobs[i]]
        failed = [r for r in copies if isinstance(r, BaseException)]
        out[i] = failed[0] if failed else stability.measure(
            members[i].spec, level, None, mask, data, members[i].device, finals=[r["final"] for r in copies])
    return out


def finish_all(members: list, template: nn.Module, data, level: int, work: dict, results: list) -> dict:
    """Measure (instability) and write the trained levels: member -> record, or the
    exception that ended it."""
    ok = {i: (job, r) for (i, job), r in zip(work.items(), results) if not isinstance(r, BaseException)}
    fields = instability(members, template, data, [(i, level, job.mask) for i, (job, _) in ok.items()])
    out = {i: r for i, r in zip(work, results) if isinstance(r, BaseException)}
    for i, (job, r) in ok.items():
        f = fields.get(i)
        out[i] = f if isinstance(f, BaseException) else members[i].finish(level, job, r, f)
    return out


class Shared:
    """A pack's levels as shared work units (module doc): per unit its members need, taken
    when published; trained in the pack by one of them when the lease is ours; waited for
    (the store helps elsewhere meanwhile) after the rest when another process holds it."""

    def __init__(self, units, members: list, train: Callable, data, stage: Path, template: nn.Module):
        """`train(work, level)`: the pack's training of jobs {member: Job}; `stage`: a scratch
        folder for dense runs' rewind points until their unit is published."""
        self.units, self.members, self.train, self.data, self.stage = units, members, train, data, stage
        self.template = template

    def level(self, todo: list, level: int) -> dict:
        """Level `level` of members `todo`: member -> its record, or the exception that ended it."""
        needs: dict = {}
        for i in todo:
            spec = self.members[i].spec
            needs.setdefault(shared.level_name(spec, level) if level else shared.dense_name(spec), []).append(i)
        out, work, held = {}, {}, []
        for name, group in needs.items():  # one member trains a unit; the others take it after
            verdict, folder = self.units.claim(name)
            if verdict == "published":
                out.update(self.take(group, level, folder))
            elif verdict == "held":
                held.append((name, group))
            else:
                work[group[0]] = (name, group, self.job(name, group, level))
        trained = self.train({i: job for i, (_, _, job) in work.items()}, level) if work else {}
        for i, result in trained.items():
            name, group, _ = work[i]
            out.update(self.publish(name, group, level, result, len(work)))
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
        shared.note(self.members[group[0]].ledger, self.members[group[0]].spec, level, True)
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
        shared.note(self.members[first].ledger, self.members[first].spec, level, True)
        return {first: self.members[first].trial.record(level), **self.take(group[1:], level, folder)}

    def hand_over(self, i: int, level: int, dest: Path) -> None:
        shared.hand_over(self.members[i].trial, level, dest)
        if level == 0:
            shutil.move(self.stage / str(i), dest / shared.POINTS)

    def take(self, group: list, level: int, folder: Path) -> dict:
        """Copy a published unit into members' folders, as trials.shared.Trunk does (a dense
        unit holds no instability: the members' own, from their own rewind points, is
        measured first, their copies together)."""
        record = shared.unit_record(folder)
        fields: dict = {}
        if level == 0:
            for i in group:
                m = self.members[i]
                m.trial.save_rewind(shared.point(m.spec, folder, self.units, self.data, m.device, PACK_OF_ONE))
            fields = instability(self.members, self.template, self.data,
                                 [(i, 0, masks.ones(self.members[i].layers)) for i in group])
        out = {}
        for i in group:
            m = self.members[i]
            if isinstance(fields.get(i), BaseException):
                out[i] = fields[i]
                continue
            if level == 0:
                out[i] = record.replace(**fields.get(i, {}))
                m.trial.finish(0, masks.ones(m.layers), load_tensors(folder / layout.FINAL), out[i])
            else:
                out[i] = record
                m.trial.copy_level_from(folder, level, record)
            shared.note(m.ledger, m.spec, level, False)
        return out


class PackOfOne(shared.Trainer):
    """shared.Trainer of a sweep with packs: a unit that one trial must produce alone (a
    control's trunk, a helper's unit, a point, a dense run) is trained as a pack of one,
    so it has the numbers a pack gives it (module doc: for Linear models on CPU, whatever
    the pack). Units of trials that cannot be packed are trained as alone: no pack makes them."""

    def level(self, spec, out: Path, level: int, data, device, progress=None) -> None:
        if pack_key(spec) is None:
            return super().level(spec, out, level, data, device, progress)
        _alone(Member(spec, out, data, device), level, data)

    def dense(self, spec, dest: Path, data, device, points: set, progress=None) -> None:
        spec = spec.replace(control="none")
        if pack_key(spec) is None:
            return super().dense(spec, dest, data, device, points, progress)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            member = Member(spec, Path(tmp) / "trial", data, device)
            _alone(member, 0, data, keepers(dest / shared.POINTS, points), measure=False)
            shared.hand_over(member.trial, 0, dest)

    def point(self, spec, k: int, dest: Path, data, device) -> None:
        spec = spec.replace(control="none")
        if pack_key(spec) is None:
            return super().point(spec, k, dest, data, device)
        dest.mkdir(parents=True, exist_ok=True)

        def stop(state):
            save_tensors(dest / f"{k}{layout.TENSOR_SUFFIX}", state)
            raise shared.Stop

        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                _alone(Member(spec, Path(tmp) / "trial", data, device), 0, data, {k: stop}, measure=False)
            except shared.Stop:
                return
        raise RuntimeError(f"the dense run never reached iteration {k}")  # validate() bounds k


def keepers(folder: Path, points: set) -> dict:
    """Job hooks that save a dense run's weights at each rewind point in `points` to
    folder/<k>.safetensors (a dense unit's points/)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {k: (lambda state, k=k: save_tensors(folder / f"{k}{layout.TENSOR_SUFFIX}", state)) for k in sorted(points)}


def _alone(member: Member, level: int, data, keep: Optional[dict] = None, measure: bool = True) -> LevelRecord:
    """Train and write one member's level as a pack of one (its instability measured where
    its spec asks, unless `measure` is off: a dense unit leaves that to its trials)."""
    template = models.build(member.spec.model, data.info, seed=0, device="cpu")
    job = member.job(level, keep)
    if not measure:
        result, = train_pack(template, [job], data)
        if isinstance(result, BaseException):
            raise result
        return member.finish(level, job, result)
    result, = finish_all([member], template, data, level, {0: job}, train_pack(template, [job], data))
    if isinstance(result, BaseException):
        raise result
    return result


PACK_OF_ONE = PackOfOne()


def train_pack(template: nn.Module, jobs: list, data, progress: Optional[Callable] = None) -> list:
    """The jobs' members trained together: the training loop with the stacked arithmetic."""
    return train_members(jobs, data, Stacked(template, len(jobs), data.train_x.device), progress)


def run_pack(specs: list, outs: list, report: Callable = lambda record, out: None,
             progress: Optional[Callable] = None, data=None, errors: Optional[dict] = None,
             units: Optional[shared.Units] = None, after_level: Optional[Callable] = None) -> list:
    """Run (or resume) the IMP trials `specs` together, member i in folder outs[i]; returns
    each member's level records, as trials.lottery.run_lottery would for it alone.
    `report(record, out)` after every member's level (True ends that member, as in
    run_lottery); `progress(member, level, iteration, total, val_loss)`. A member that
    fails (divergence) stops alone: its exception goes into `errors` (index -> exception)
    when given, else PackFailed is raised once the others have finished.
    `units` (a trials.shared.Units store): every member's levels are shared work units, as
    trials.shared.Trunk shares a single trial's (Shared). `after_level(level)`: once per
    level that some member still ran (trained, took from a unit, or read back done),
    after that level's `report` calls."""
    check_pack(specs, outs)
    device = data.train_x.device if data is not None else resolve_device(specs[0].device)
    if data is None:
        data = datasets.load(specs[0].dataset, device, specs[0].train.batch_size)
    for spec, out in zip(specs, outs):
        TrialDir(out, spec).check()
    members = [Member(spec, out, data, device) for spec, out in zip(specs, outs)]
    trunk: dict = {}  # a control member -> its IMP run, a member of its own in OUT/imp/ (not reported)
    for i, spec in enumerate(specs):
        if spec.control != "none":
            trunk[i] = len(members)
            members.append(Member(spec.replace(control="none"), Path(outs[i]) / layout.IMP, data, device,
                                  ledger=Path(outs[i]) / layout.UNITS))
    shown = {t: i for i, t in trunk.items()}  # whose progress a trunk's is
    template = models.build(specs[0].model, data.info, seed=0, device="cpu")

    def train(work: dict, level: int) -> dict:
        """Train jobs {member: Job} together and write their levels: member -> record or exception."""
        def tell(m, it, total, val):
            i = list(work)[m]
            progress(shown.get(i, i), level, it, total, val)

        return finish_all(members, template, data, level, work,
                          train_pack(template, list(work.values()), data, tell if progress else None))

    def imp_levels(todo: list, level: int) -> dict:
        """Level `level` of IMP members (tickets and controls' trunks): trained, or from units."""
        if sharing:
            return sharing.level(todo, level)
        return train({i: members[i].job(level) for i in todo}, level) if todo else {}

    def levels(todo: list, level: int) -> dict:
        """Level `level` of members `todo`: the IMP members' first (a control follows its
        trunk's masks), then the controls' (level 0 is their trunk's), trained together."""
        controls = [i for i in todo if i in trunk]
        needed = [trunk[i] for i in controls if not members[trunk[i]].trial.done(level)]
        done = imp_levels([i for i in todo if i not in trunk] + needed, level)
        work = {}
        for i in controls:
            imp = done.pop(trunk[i]) if trunk[i] in done else members[trunk[i]].trial.record(level)
            if isinstance(imp, BaseException):
                done[i] = imp
            elif level == 0:
                done[i] = members[i].control_dense(members[trunk[i]], imp)
            else:
                work[i] = members[i].control_job(level, members[trunk[i]])
        return {**done, **(train(work, level) if work else {})}

    records: list = [[] for _ in specs]
    failures: dict = {}
    alive = list(range(len(specs)))
    with tempfile.TemporaryDirectory(prefix="lth-pack-") as stage:  # used with units only (Shared)
        sharing = Shared(units, members, train, data, Path(stage), template) if units is not None else None
        for level in range(max(s.last_level for s in specs) + 1):
            alive = [i for i in alive if level <= specs[i].last_level]
            if not alive:
                break
            todo = []
            for i in alive:
                if members[i].trial.done(level):
                    records[i].append(members[i].trial.record(level))
                else:
                    todo.append(i)
            for i, result in levels(todo, level).items():
                if isinstance(result, BaseException):
                    failures[i] = result
                else:
                    records[i].append(result)
            stopped = set(failures)
            for i in alive:
                if (i not in failures and records[i] and records[i][-1].level == level
                        and report(records[i][-1], outs[i])):
                    stopped.add(i)
            alive = [i for i in alive if i not in stopped]
            if after_level:
                after_level(level)
    if failures and errors is None:
        raise PackFailed(failures, records)
    if errors is not None:
        errors.update(failures)
    return records
