"""Running a trial's levels: iterative magnitude pruning with rewinding (Frankle & Carbin
2019; Frankle et al. 2020), for one trial or a pack of K trials in one process, each in
its own trial folder (ARCHITECTURE.md, "The engine").

    level 0: train the dense net from init; keep its weights after k iterations (the rewind point)
    level L: prune level L-1's final weights (nested masks), reset the survivors to the
             rewind point and train iterations k..end under the mask, with the
             learning-rate schedule and data order positioned at k and a fresh optimizer.

spec.retrain (Renda et al. 2020) says where level L >= 1 starts; the mask is IMP's either way:
    weight_rewind  the above
    lr_rewind      level L-1's final weights under the new mask, schedule and data order from k
    finetune       the same weights, T-k iterations at the final learning rate
spec.stability (Frankle et al. 2020): at the levels it names, trials/methods/stability.py's
copies train from the level's start with other SGD noise and their error barrier goes
into the level's record, before the level is written (`instability`).

Controls (trials/methods/controls.py) record the control network's numbers at the method's masks
or densities; an IMP control runs the IMP trajectory itself in OUT/imp/ (a member of its own).
A method that prunes at initialization (trials/methods/at_init.py: snip, grasp, synflow, ...) runs
level 0 as IMP does, and at level L scores its rewind point to IMP's level-L counts.

One runner, `run_pack`: a trial is a pack of one (`run_lottery`). Each `Member` builds
its level's Job; `PackTrainer` runs the level's jobs with the arithmetic the caller gives
(trials/loop/training.py Arithmetic): Alone, one after another with a single trial's default
arithmetic (its bits: the golden records), or Stacked, all together (trials/loop/stacked.py;
close to Alone, not bit for bit). Members share one loop from the smallest rewind point (a member is carried along
untouched until its k); a member whose training loss becomes NaN/inf fails alone. On
shared work units (trials/runner/shared.py Shared) each level is claimed, trained and
published, copied in, or waited for; a store's helper produces a unit by running the
trial up to that level in a scratch folder (`produce`). An edge-popup trial
(method=edge_popup: a supermask per density on fixed random weights) is a member of the
same runner (trials/methods/supermask.py Searcher): its levels are Search jobs of the same loop,
alone or stacked (StackedSearch), in the same trial folder, records and files.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from trials import methods
from trials.core.errors import ConfigError
from trials.folder import layout
from trials.folder.record import LevelRecord
from trials.folder.store import TrialDir, save_tensors
from trials.loop.arithmetic import Alone
from trials.loop.stacked import Stacked
from trials.loop.training import Job, train_members
from trials.methods import controls, stability
from trials.methods.imp import Member
from trials.methods.supermask import Search, Searcher, StackedSearch, Supermask
from trials.nets import datasets, masks, models
from trials.runner import shared
from trials.spec.packing import check_pack, pack_key


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ConfigError("device", name, f"this machine has {torch.cuda.device_count()} CUDA devices; "
                          "allowed here: auto, cpu" + (", cuda, cuda:N" if torch.cuda.is_available() else ""))
    return device


def prepare(spec, out, device=None):
    """Everything that can fail on bad input, before anything is written."""
    device = device or resolve_device(spec.device)
    data = datasets.load(spec.dataset, device, spec.train.batch_size)
    TrialDir(out, spec).check()
    return data, device


class PackFailed(RuntimeError):
    """Members of a pack failed; the others finished. `errors`: member index -> exception."""

    def __init__(self, errors: dict, records: list):
        self.errors, self.records = errors, records
        super().__init__("; ".join(f"member {i}: {e}" for i, e in sorted(errors.items())))


class PackTrainer:
    """Trains a pack's jobs of one level with the pack's arithmetic (ARCHITECTURE.md, "The
    engine"): Stacked, all together in one loop (trials/loop/stacked.py; StackedSearch for
    edge-popup's Search jobs), or Alone, one loop after another with the default arithmetic
    of a single trial (trials/loop/arithmetic.py: the golden records' bits)."""

    def __init__(self, template: nn.Module, data, arithmetic: type = Stacked):
        if arithmetic not in ARITHMETICS.values():
            raise ValueError(f"arithmetic {arithmetic!r}: one of {', '.join(a.__name__ for a in ARITHMETICS.values())}")
        self.template, self.data, self.arithmetic = template, data, arithmetic
        self.layers = None  # the template's (a Supermask's), once

    def run(self, jobs: list, progress: Optional[Callable] = None) -> list:
        """Per job its result (train_members'), or the exception that ended it."""
        device = self.data.train_x.device
        if self.arithmetic is Stacked:
            kind = StackedSearch if isinstance(jobs[0], Search) else Stacked
            return train_members(jobs, self.data, kind(self.template, len(jobs), device), progress)
        out = []
        for m, job in enumerate(jobs):
            tell = (lambda _, it, total, val, m=m: progress(m, it, total, val)) if progress else None
            out += train_members([job], self.data, Alone(self.alone(job, device)), tell)
        return out

    def alone(self, job: Job, device) -> nn.Module:
        """What trains a job alone: the model, or for a Search a Supermask over the frozen model."""
        net = copy.deepcopy(self.template).to(device)
        if not isinstance(job, Search):
            return net
        if self.layers is None:
            self.layers = masks.Layers.of(self.template)
        scores = {w: job.start_weights[f"scores.{j}"] for j, w in enumerate(self.layers.shapes)}
        return Supermask(net.requires_grad_(False), self.layers, job.density, job.scope, scores)


def instability(members: list, training: PackTrainer, todo: list) -> dict:
    """The stability fields of the levels `todo` [(member, level, mask)] that ask for them:
    every member's copies (trials/methods/stability.py copy_jobs) train together, as one pack
    (or one after another: PackTrainer). member -> fields, or the exception of a copy that
    failed (the member fails with it, as a lone trial does)."""
    todo = [(i, level, mask) for i, level, mask in todo if stability.asked(members[i].spec, level)]
    jobs = {i: stability.copy_jobs(members[i].spec, level, members[i].start_weights_of(level), mask)
            for i, level, mask in todo}
    if not jobs:
        return {}
    results = iter(training.run([job for group in jobs.values() for job in group]))
    out = {}
    for i, level, mask in todo:
        copies = [next(results) for _ in jobs[i]]
        failed = [r for r in copies if isinstance(r, BaseException)]
        out[i] = failed[0] if failed else stability.measure(
            members[i].spec, level, None, mask, training.data, members[i].device, finals=[r["final"] for r in copies])
    return out


def finish_all(members: list, training: PackTrainer, level: int, work: dict, results: list,
               measure: bool = True) -> dict:
    """Measure (instability, unless `measure` is off) and write the trained levels: member ->
    record, or the exception that ended it."""
    ok = {i: (job, r) for (i, job), r in zip(work.items(), results) if not isinstance(r, BaseException)}
    fields = instability(members, training, [(i, level, job.mask) for i, (job, _) in ok.items()]) if measure else {}
    out = {i: r for i, r in zip(work, results) if isinstance(r, BaseException)}
    for i, (job, r) in ok.items():
        f = fields.get(i)
        out[i] = f if isinstance(f, BaseException) else members[i].finish(level, job, r, f)
    return out


class Producer:
    """The arithmetic of a sweep's units, so a unit has the same numbers whoever trains it
    (ARCHITECTURE.md, "Packs in sweeps"): Alone in sweeps without packs (a single trial's
    bits), Stacked in sweeps with packs; and what trains a rewind point one trial needs
    alone, as a pack of one with that arithmetic."""

    def __init__(self, arithmetic: type):
        self.arithmetic = arithmetic

    def of(self, spec) -> type:
        """The arithmetic for `spec`: a model that cannot stack trains Alone in any sweep."""
        return self.arithmetic if pack_key(spec) is not None else Alone

    def point(self, spec, k: int, dest: Path, data, device) -> None:
        """point/<D>-<k>: the dense run's first k iterations again, stopped at k."""
        spec = spec.replace(control="none")
        dest.mkdir(parents=True, exist_ok=True)

        def stop(state):
            save_tensors(dest / f"{k}{layout.TENSOR_SUFFIX}", state)
            raise shared.Stop

        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                member = Member(spec, Path(tmp) / "trial", data, device)
                job = member.job(0, {k: stop})
                PackTrainer(models.build(spec.model, data.info, seed=0, device="cpu"), data, self.of(spec)).run([job])
            except shared.Stop:
                return
        raise RuntimeError(f"the dense run never reached iteration {k}")  # validate() bounds k


ARITHMETICS = {a.name: a for a in (Alone, Stacked)}  # a sweep's config names them (orchestrator/plan.py)


def produce(name: str, spec, units, data, device, scratch: Path, producer: Producer) -> None:
    """Produce unit `name`, one of `spec`'s (shared.plan), for the store's helpers: the
    trial's IMP run up to that level in a scratch folder, its earlier levels from their
    units (their instability at level 0, a trial's own, is not measured). The run ends after
    that level (its report says stop); the spec keeps its prune.levels, as validated: cut to
    the unit's level it may no longer fit its own stability.levels (a dense unit of a trial
    measuring [0, 2] is no spec with prune.levels 0), and a trunk level does not depend on it."""
    level = 0 if name.startswith("dense/") else layout.level_of(name.rsplit("/", 1)[1])
    spec = spec.replace(control="none")
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        run_pack([spec], [Path(tmp) / "trunk"], report=lambda record, out: record.level >= level, data=data,
                 units=units, arithmetic=producer.of(spec), dense_instability=False)


def train_pack(template: nn.Module, jobs: list, data, progress: Optional[Callable] = None) -> list:
    """The jobs' members trained together: the training loop with the stacked arithmetic."""
    return PackTrainer(template, data).run(jobs, progress)


def run_pack(specs: list, outs: list, report: Callable = lambda record, out: None,
             progress: Optional[Callable] = None, data=None, errors: Optional[dict] = None,
             units: Optional[shared.Units] = None, after_level: Optional[Callable] = None,
             arithmetic: type = Stacked, dense_instability: bool = True) -> list:
    """Run (or resume) the IMP trials `specs` together, member i in folder outs[i]; returns
    each member's level records, as trials.runner.levels.run_lottery would for it alone.
    `report(record, out)` after every member's level (True ends that member, as in
    run_lottery); `progress(member, level, iteration, total, val_loss)`. A member that
    fails (divergence) stops alone: its exception goes into `errors` (index -> exception)
    when given, else PackFailed is raised once the others have finished.
    `units` (a trials.runner.shared.Units store): every member's levels are shared work units, as
    trials/runner/shared.py Shared says. `after_level(level)`: once per
    level that some member still ran (trained, took from a unit, or read back done),
    after that level's `report` calls. `arithmetic`: PackTrainer's; Alone trains each
    member by itself with a single trial's default arithmetic (its bits).
    `dense_instability` off: level 0's instability is not measured (a helper's scratch run)."""
    check_pack(specs, outs, stacked=arithmetic is Stacked)
    device = data.train_x.device if data is not None else resolve_device(specs[0].device)
    if data is None:
        data = datasets.load(specs[0].dataset, device, specs[0].train.batch_size)
    for spec, out in zip(specs, outs):
        TrialDir(out, spec).check()
    members = [methods.of(spec).load("member")(spec, out, data, device) for spec, out in zip(specs, outs)]
    trunk: dict = {}  # a control member -> its IMP run, a member of its own in OUT/imp/ (not reported)
    for i, spec in enumerate(specs):
        if controls.needs_imp(spec):
            trunk[i] = len(members)
            trunk_spec = spec.replace(control="none")
            members.append(methods.of(spec).load("member")(trunk_spec, Path(outs[i]) / layout.IMP, data, device,
                                                           ledger=Path(outs[i]) / layout.UNITS))
    shown = {t: i for i, t in trunk.items()}  # whose progress a trunk's is
    training = PackTrainer(models.build(specs[0].model, data.info, seed=0, device="cpu"), data, arithmetic)

    def train(work: dict, level: int) -> dict:
        """Train jobs {member: Job} together and write their levels: member -> record or exception."""
        who = [shown.get(i, i) for i in work]  # a trunk's progress is its control's

        def tell(m, it, total, val):
            progress(who[m], level, it, total, val)

        return finish_all(members, training, level, work, training.run(list(work.values()), tell if progress else None),
                          measure=dense_instability or level > 0)

    def imp_levels(todo: list, level: int) -> dict:
        """Level `level` of members with no trunk: trained, or from units (IMP's levels, every
        dense level; an at-init level is its trial's own)."""
        own = {i: members[i].job(level) for i in todo
               if not sharing or not shared.shareable(members[i].spec)
               or (level and not shared.shares_levels(members[i].spec))}
        if sharing:
            return sharing.level([i for i in todo if i not in own], level, own)
        return train(own, level) if own else {}

    def searches(todo: list, level: int) -> dict:
        """Level `level` of edge-popup members: searched together (the random_prune control: untrained)."""
        work = {i: members[i].job(level) for i in todo if specs[i].control == "none"}
        return {**{i: members[i].untrained(level) for i in todo if i not in work}, **(train(work, level) if work else {})}

    def levels(todo: list, level: int) -> dict:
        """Level `level` of members `todo`: the IMP members' first (a control follows its
        trunk's masks), then the controls' (level 0 is their trunk's), trained together;
        edge-popup members search theirs (a pack holds one kind or the other: check_pack)."""
        if any(isinstance(members[i], Searcher) for i in todo):
            return searches(todo, level)
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
                work[i] = members[i].job(level, imp=members[trunk[i]])
        return {**done, **(train(work, level) if work else {})}

    records: list = [[] for _ in specs]
    failures: dict = {}
    alive = list(range(len(specs)))
    with tempfile.TemporaryDirectory(prefix="lth-pack-") as stage:  # used with units only (Shared)
        measure = (lambda todo: instability(members, training, todo)) if dense_instability else None
        sharing = (shared.Shared(units, members, train, measure, Producer(arithmetic), data, Path(stage))
                   if units is not None else None)
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


def run_lottery(spec, out, report: Callable = lambda record, out: None,
                progress: Optional[Callable] = None, data=None, units=None,
                arithmetic: type = Alone) -> list[LevelRecord]:
    """Run (or resume) one trial in `out`; `report(record, out)` after every level.
    A report that returns True ends the trial after that level (e.g. a sweep's
    stop_when_not_matching); the finished levels stay on disk. `progress(level,
    iteration, total, val_loss)`. A trial is a pack of one (run_pack) with `arithmetic`
    Alone (the default: a single trial's bits) or Stacked (a sweep with packs); an
    IMP trial's levels are taken from the shared work units `units` (trials.runner.shared.Units)
    where given."""
    if data is None:
        data, _ = prepare(spec, out)
    tell = (lambda m, level, it, total, val: progress(level, it, total, val)) if progress else None
    errors: dict = {}
    records = run_pack([spec], [out], report, tell, data, errors, units=units, arithmetic=arithmetic)[0]
    if errors:
        raise errors[0]
    return records
