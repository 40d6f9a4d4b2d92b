"""IMP's member of a pack (ARCHITECTURE.md, "The engine"): one trial's folder, init and
layers, and job(L) -> the Job of its level L for the training loop (trials/loop/training.py).
Level 0 trains the dense network from init and keeps the rewind point; level L prunes
level L-1's final weights (nested masks) and starts where spec.retrain says. The methods
that prune at initialization (trials/methods/at_init.py) run as this member, their level
mask scored at the rewind point; a control takes its mask from its IMP trunk
(trials/methods/controls.py). Other kinds of method subclass it (trials/methods/early_bird.py)
or have a member of their own (trials/methods/supermask.py Searcher). The level runner
(trials/runner/levels.py run_pack) runs the members a method names in its registry entry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from trials import methods
from trials.folder import layout
from trials.folder.record import LevelRecord
from trials.folder.store import TrialDir, load_tensors, save_tensors, state_of
from trials.loop.training import Job
from trials.methods import at_init, controls, early_bird_watch, pruning, stability
from trials.nets import masks, models


class Member:
    """One trial of a pack: its folder, init and layers; job(L) -> the Job of its level L."""

    def __init__(self, spec, out: Path, data, device, ledger: Optional[Path] = None):
        """`ledger`: its units.json (a control's IMP trunk member writes its control's)."""
        self.spec, self.device, self.out, self.info, self.data = spec, device, Path(out), data.info, data
        self.method = methods.of(spec)
        self.ledger = ledger or self.out / layout.UNITS
        self.trial = TrialDir(out, spec)
        self.trial.begin()
        self.trial.reopen_from(self.trial.first_missing(spec.prune.levels))
        net = models.build(spec.model, data.info, seed=spec.seed, device=device)
        self.init, self.layers = state_of(net), masks.Layers.of(net)
        self.watches: dict = {}  # level -> the early-bird Watch of its job (trials/methods/early_bird_watch.py)

    def job(self, level: int, keep: Optional[dict] = None, imp: Optional["Member"] = None) -> Job:
        """Level 0 from init keeping the rewind point at k (and handing the iterations in
        `keep` to their callbacks); level L prunes L-1's final weights (a control: takes
        controls.mask(L) of its IMP run `imp`) and starts where spec.retrain says
        (stability.retraining): the survivors at the rewind point, or L-1's final weights
        under the new mask (lr_rewind, finetune), in this member's own folder. A method that
        prunes at init scores its rewind point instead (at_init.level_mask)."""
        k = self.spec.rewind_iteration
        if level == 0:
            hooks = {**(keep or {}), k: self.save_rewind}
            if keep and k in keep:
                hooks[k] = lambda state: (keep[k](state), self.save_rewind(state))
            ones = masks.ones(self.layers)
            return Job(self.spec.train, self.spec.seed, ones, self.init, 0, hooks, watch=self.watch(0, ones))
        if self.method.mask == "scored":
            scored = self.out / layout.SCORED  # reinit's: its rewind point is the fresh init (save_rewind)
            weights = load_tensors(scored, self.device) if scored.exists() else self.trial.rewind(self.device)
            mask = at_init.level_mask(self.spec, level, weights, self.layers, self.data)
        elif imp is None:
            mask = pruning.prune(self.spec.prune, self.trial.final(level - 1), self.trial.mask(level - 1), self.layers)
        else:
            mask = controls.mask(self.spec, level, imp.trial, self.trial, self.layers)
        start, schedule = stability.retraining(self.spec, level)
        return Job(self.spec.train, self.spec.seed, mask, self.start_weights_of(level), start, schedule=schedule,
                   watch=self.watch(level, mask) if imp is None else None)

    def watch(self, level: int, mask: dict) -> Optional[early_bird_watch.Watch]:
        """The early-bird watch of level `level`'s training (trials/methods/early_bird_watch.py), or None: with
        early_bird_watch.imp_levels, a level but the last is watched at the next level's mask (level 0
        not before the rewind point) and its draw is written beside it."""
        spec, folder = self.spec, self.trial.level_dir(level)
        if not spec.early_bird.imp_levels or level >= spec.prune.levels:
            return None
        watch = early_bird_watch.Watch(spec, self.layers, mask, [level + 1], spec.rewind_iteration if level == 0 else 0,
                                 lambda lv, info, state, m: early_bird_watch.save_draw(folder, lv, info))
        self.watches[level] = watch
        return watch

    def save_rewind(self, state: dict) -> None:
        """The rewind point; a reinit control at init keeps it as the point its method scores
        and starts from a fresh init (ARCHITECTURE.md, "Pruning at initialization")."""
        if self.method.mask == "scored" and self.spec.control == "reinit":
            save_tensors(self.out / layout.SCORED, state)
            state = controls.fresh(self.spec, self.info)
        self.trial.save_rewind(state)

    def control_dense(self, imp: "Member", record: LevelRecord) -> LevelRecord:
        """A control's level 0: its IMP run's (record included), from its own rewind point."""
        self.trial.save_rewind(controls.start(self.spec, imp.trial, self.info))
        self.trial.copy_level(imp.trial, 0, record)
        return record

    def start_weights_of(self, level: int) -> dict:
        """Where level `level` starts: the rewind point (level 0's copies, weight_rewind), or
        level L-1's final weights (lr_rewind, finetune)."""
        if level == 0 or self.spec.retrain == "weight_rewind":
            return self.trial.rewind(self.device)
        return self.trial.final(level - 1)

    def finish(self, level: int, job: Job, result: dict, fields: Optional[dict] = None) -> LevelRecord:
        """Write the level; `fields`: its instability, measured before (the record is
        complete before the level's files and DONE exist)."""
        final = result.pop("final")
        record = LevelRecord(level=level, **masks.describe(job.mask, self.layers), **result, **(fields or {}),
                             **self.early_bird_fields(level, job, result, final))
        self.trial.finish(level, job.mask, final, record)
        return record

    def early_bird_fields(self, level: int, job: Job, result: dict, final: dict) -> dict:
        """An early-bird IMP level's record fields (trials/folder/record.py): the draw of its mask (made
        while level L-1 trained), iterations against the schedule, and the iterations its
        network cost (levels 0..L). A draw that never stabilised is made from the final weights.
        None of them without early_bird_watch.imp_levels."""
        if not self.spec.early_bird.imp_levels:
            return {}
        here = self.trial.level_dir(level)
        watch = self.watches.pop(level, None)
        if watch is not None:
            for lv, info, _ in watch.unstable(job.start + result["iterations"], final):
                early_bird_watch.save_draw(here, lv, info)
        before = (self.trial.record(level - 1).cost_iterations or 0) if level else 0
        out = {"schedule_iterations": self.spec.train.iterations - job.start,
               "cost_iterations": before + result["iterations"]}
        drawn = self.trial.level_dir(level - 1) / layout.draw(level, ".json")
        if level and drawn.exists():
            out.update(early_bird_watch.fields(early_bird_watch.read_draw(drawn.parent, level)))
        return out
