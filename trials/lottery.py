"""Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

    level 0: train the dense net from init; keep its weights after k iterations (the rewind point)
    level L: prune level L-1's final weights (nested masks), reset the survivors to the
             rewind point and train iterations k..end under the mask, with the
             learning-rate schedule and data order positioned at k and a fresh optimizer.

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

from trials import datasets, masks, models, pruning
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
                progress: Optional[Callable] = None, data=None) -> list[LevelRecord]:
    """Run (or resume) one trial in `out`; `report(record, out)` after every level.
    A report that returns True ends the trial after that level (e.g. a sweep's
    stop_when_not_matching); the finished levels stay on disk."""
    if data is None:
        data, device = prepare(spec, out)
    else:
        device = data.train_x.device
    runner = EdgePopup if spec.method == "edge_popup" else Lottery if spec.control == "none" else Control
    run = runner(spec, Path(out), data, device, progress)
    records = []
    for level in range(spec.last_level + 1):
        records.append(run.level(level))
        if report(records[-1], out):
            break
    return records


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
        if self.trial.done(level):
            return self.trial.record(level)
        if level == 0:
            return self.train_dense()
        mask = pruning.prune(self.spec.prune, self.trial.final(level - 1), self.trial.mask(level - 1),
                             self.layers)
        return self.train(level, mask, self.trial.rewind(self.device))

    def train_dense(self) -> LevelRecord:
        k = self.spec.rewind_iteration
        keep = {k: lambda net: self.trial.save_rewind(state_of(net))}
        return self.train(0, masks.ones(self.layers), self.init, start=0, on_iteration=keep)

    def train(self, level: int, mask, start_weights: dict, start: Optional[int] = None,
              on_iteration: Optional[dict] = None) -> LevelRecord:
        self.net.load_state_dict(start_weights)
        start = self.spec.rewind_iteration if start is None else start
        progress = (lambda it, total, val: self.progress(level, it, total, val)) if self.progress else None
        result = train_level(self.net, mask, self.data, self.spec.train, self.spec.seed, start,
                             on_iteration, progress)
        record = LevelRecord(level=level, **masks.describe(mask, self.layers), **result)
        self.trial.finish(level, mask, state_of(self.net), record)
        return record


class Control(Lottery):
    """A control network trained at every level of the ticket's IMP run (see module doc)."""

    def __init__(self, spec, out: Path, data, device, progress=None):
        super().__init__(spec, out, data, device, progress)
        self.imp = Lottery(spec.replace(control="none"), out / layout.IMP, data, device, progress)

    def level(self, level: int) -> LevelRecord:
        imp_record = self.imp.level(level)
        if self.trial.done(level):
            return self.trial.record(level)
        if level == 0:
            self.trial.save_rewind(self.start_weights())
            self.trial.copy_level(self.imp.trial, 0, imp_record)
            return imp_record
        return self.train(level, self.mask(level), self.trial.rewind(self.device))

    def start_weights(self) -> dict:
        if self.spec.control == "random_prune":
            return self.imp.trial.rewind()
        fresh_seed = rng(self.spec.seed, "reinit").initial_seed()
        return state_of(models.build(self.spec.model, self.data.info, seed=fresh_seed, device="cpu"))

    def mask(self, level: int):
        imp_mask = self.imp.trial.mask(level)
        if self.spec.control == "reinit":
            return imp_mask
        units = self.spec.prune.kind == "structured"
        return pruning.prune(self.spec.prune, self.trial.final(level - 1), self.trial.mask(level - 1),
                             self.layers, strategy="random",
                             targets=pruning.counts(imp_mask, self.layers, units),
                             generator=rng(self.spec.seed, "random_prune", level))
