"""Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

    level 0: train the dense net from init; keep its weights after k iterations (the rewind point)
    level L: prune level L-1's final weights (nested masks), reset the survivors to the
             rewind point and train iterations k..end under the mask, with the
             learning-rate schedule and data order positioned at k and a fresh optimizer.

spec.retrain (Renda et al. 2020) says where level L >= 1 starts; the mask is IMP's either way:
    weight_rewind  the above
    lr_rewind      level L-1's final weights under the new mask, schedule and data order from k
    finetune       the same weights, T-k iterations at the final learning rate
spec.stability (Frankle et al. 2020): at the levels it names, trials/stability.py trains
copies from the level's start with other SGD noise and records their error barrier in
the level's record, before the level is written (Lottery.measure_stability).

Controls record the control network's numbers at IMP's masks/densities. They run the
IMP trajectory themselves in OUT/imp/ (a full trial folder) because their masks or
densities come from it:
    reinit        IMP's level-L mask on a fresh random init (one init per trial, from a
                  seed derived from `seed`), trained k..end like the ticket
    random_prune  random masks, nested across levels, with exactly IMP's per-layer counts
                  of weights (units when structured), on the ticket's rewind weights
A control's level 0 is IMP's dense network: density 1 has no mask to control for.

method=edge_popup runs trials/supermask.py's levels instead (a supermask per density on
fixed random weights), in the same trial folder, records and files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from trials import datasets, masks, models, pruning, stability
from trials import layout
from trials.errors import ConfigError
from trials.record import LevelRecord
from trials.store import TrialDir, state_of
from trials.supermask import EdgePopup
from trials.training import rng, train_level


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


def run_lottery(spec, out, report: Callable = lambda record, out: None,
                progress: Optional[Callable] = None, data=None,
                runner: Optional[Callable] = None) -> list[LevelRecord]:
    """Run (or resume) one trial in `out`; `report(record, out)` after every level.
    A report that returns True ends the trial after that level (e.g. a sweep's
    stop_when_not_matching); the finished levels stay on disk. `runner(spec, out, data,
    device, progress)` builds what runs the levels (a sweep sharing work passes
    trials.shared.runner(units)); default: the trial's own engine."""
    if data is None:
        data, device = prepare(spec, out)
    else:
        device = data.train_x.device
    runner = runner or engine
    run = runner(spec, Path(out), data, device, progress)
    records = []
    for level in range(spec.last_level + 1):
        records.append(run.level(level))
        if report(records[-1], out):
            break
    return records


def engine(spec, out: Path, data, device, progress=None):
    """What runs a trial's levels when nothing is shared."""
    runner = EdgePopup if spec.method == "edge_popup" else Lottery if spec.control == "none" else Control
    return runner(spec, out, data, device, progress)


class Lottery:
    """The ticket: IMP levels in one trial folder."""

    def __init__(self, spec, out: Path, data, device, progress=None):
        self.spec, self.data, self.device, self.progress = spec, data, device, progress
        self.trial = TrialDir(out, spec)
        self.trial.begin()
        self.trial.reopen_from(self.trial.first_missing(spec.prune.levels))
        self.net = models.build(spec.model, data.info, seed=spec.seed, device=device)
        self.init = state_of(self.net)  # level 0 starts here (the net itself moves on)
        self.layers = masks.Layers.of(self.net)

    def level(self, level: int) -> LevelRecord:
        """Train one level (spec.retrain picks its start; module doc), measure its
        instability where the spec asks, then write it: the record is complete before the
        level's files and DONE exist, so a killed trial never keeps a level without it."""
        if self.trial.done(level):
            return self.trial.record(level)
        if level == 0:
            return self.train_dense()
        mask = pruning.prune(self.spec.prune, self.trial.final(level - 1), self.trial.mask(level - 1),
                             self.layers)
        record, final = self.fit(level, mask, self.start_weights_of(level), schedule=self.schedule_of(level))
        return self.close(level, mask, final, record)

    def close(self, level: int, mask, final: dict, record: LevelRecord, measure: bool = True) -> LevelRecord:
        """Measure the level's instability where the spec asks (unless `measure` is off),
        then write the level: the record is complete before its files and DONE exist."""
        if measure:
            record = self.measure_stability(level, record, mask)
        self.trial.finish(level, mask, final, record)
        return record

    def start_weights_of(self, level: int) -> dict:
        """Where level L >= 1 starts (spec.retrain): the rewind point (weight_rewind), or this
        trial's level L-1 final weights (lr_rewind, finetune; the new mask prunes them).
        Level 0's copies (stability) start at the rewind point."""
        if level == 0 or self.spec.retrain == "weight_rewind":
            return self.trial.rewind(self.device)
        return self.trial.final(level - 1)

    def schedule_of(self, level: int):
        """The learning rate of level `level` by iteration (None: the spec's schedule)."""
        return stability.retraining(self.spec, level)[1]

    def fit(self, level: int, mask, start_weights: dict, start: Optional[int] = None,
            on_iteration: Optional[dict] = None, schedule=None) -> tuple[LevelRecord, dict]:
        """Train a level without writing it: (record, final weights)."""
        self.net.load_state_dict(start_weights)
        start = self.spec.rewind_iteration if start is None else start
        progress = (lambda it, total, val: self.progress(level, it, total, val)) if self.progress else None
        result = train_level(self.net, mask, self.data, self.spec.train, self.spec.seed, start,
                             on_iteration, progress, schedule)
        return LevelRecord(level=level, **masks.describe(mask, self.layers), **result), state_of(self.net)

    def measure_stability(self, level: int, record: LevelRecord, mask: Optional[dict] = None) -> LevelRecord:
        """`record` with its stability fields measured (trials/stability.py), or unchanged
        when the spec does not ask for this level. Reads the level's start from this trial
        folder (the rewind point, or level L-1's final weights) and its mask from `mask` or
        the folder's level_XX/mask, so a runner that copied the level rather than trained
        it can measure it too (before writing the record, or rewriting it after)."""
        if not stability.asked(self.spec, level):
            return record
        mask = self.trial.mask(level) if mask is None else mask
        fields = stability.measure(self.spec, level, self.start_weights_of(level), mask, self.data, self.device)
        return record.replace(**fields)

    def train_dense(self, points: Optional[dict] = None, measure: bool = True) -> LevelRecord:
        """Level 0 from init; `points` maps more iterations to callbacks that receive the
        net after that many steps (a shared dense run keeps several rewind points, and
        leaves instability to the trials: `measure` off)."""
        k = self.spec.rewind_iteration
        keep = {**(points or {}), k: self.trial.save_rewind}
        if points and k in points:
            keep[k] = lambda state: (points[k](state), self.trial.save_rewind(state))
        mask = masks.ones(self.layers)
        record, final = self.fit(0, mask, self.init, start=0, on_iteration=keep)
        return self.close(0, mask, final, record, measure)


class Control(Lottery):
    """A control network trained at every level of the ticket's IMP run (see module doc)."""

    def __init__(self, spec, out: Path, data, device, progress=None, imp=None):
        """`imp`: the IMP run whose masks this control follows (default: a Lottery run
        here in OUT/imp/; a sweep that shares work passes its trunk, trials/shared.py)."""
        super().__init__(spec, out, data, device, progress)
        self.imp = imp or Lottery(spec.replace(control="none"), out / layout.IMP, data, device, progress)

    def level(self, level: int) -> LevelRecord:
        """Level 0 is IMP's (its record, stability fields included). Level L >= 1 trains the
        control network at mask(L) from where spec.retrain starts (Lottery.start_weights_of,
        in this control's own folder: weight_rewind = this folder's rewind point, i.e. the
        fresh init (reinit) or IMP's rewind weights (random_prune); lr_rewind/finetune =
        this control's level L-1 final weights), measured and written as Lottery.level."""
        imp_record = self.imp.level(level)
        if self.trial.done(level):
            return self.trial.record(level)
        if level == 0:
            self.trial.save_rewind(self.start_weights())
            self.trial.copy_level(self.imp.trial, 0, imp_record)
            return imp_record
        mask = self.mask(level)
        record, final = self.fit(level, mask, self.start_weights_of(level), schedule=self.schedule_of(level))
        return self.close(level, mask, final, record)

    def start_weights(self) -> dict:
        return control_start(self.spec, self.imp.trial, self.data.info)

    def mask(self, level: int):
        return control_mask(self.spec, level, self.imp.trial, self.trial, self.layers)


def control_start(spec, imp: TrialDir, info) -> dict:
    """A control's rewind point: its IMP run's (random_prune) or a fresh init (reinit, which
    spec validation allows with retrain=weight_rewind only)."""
    if spec.control == "random_prune":
        return imp.rewind()
    fresh_seed = rng(spec.seed, "reinit").initial_seed()
    return state_of(models.build(spec.model, info, seed=fresh_seed, device="cpu"))


def control_mask(spec, level: int, imp: TrialDir, trial: TrialDir, layers) -> dict:
    """A control's level-L mask: IMP's (reinit), or random masks nested in the control's
    level L-1 mask with exactly IMP's per-layer counts (random_prune)."""
    imp_mask = imp.mask(level)
    if spec.control == "reinit":
        return imp_mask
    units = spec.prune.kind == "structured"
    return pruning.prune(spec.prune, trial.final(level - 1), trial.mask(level - 1), layers, strategy="random",
                         targets=pruning.counts(imp_mask, layers, units),
                         generator=rng(spec.seed, "random_prune", level))
