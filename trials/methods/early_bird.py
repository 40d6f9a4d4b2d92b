"""method=early_bird: early-bird tickets (You et al. 2020; ARCHITECTURE.md, "Early-bird
tickets"). The member the level runner runs it as; the draws, window and watch are
trials/methods/early_bird_watch.py's.

    level 0  the dense run, watched at every level's density at once (IMP's level-L counts);
             it stops once all have stabilised, not before the rewind point k. Each density's
             draw (the mask, the weights at its iteration t_L) is written beside level 0 as it
             stabilises; one that never does is drawn from the final weights at T.
    level L  that mask, trained from the dense weights at k (weight_rewind, k..T), or
             continuing the dense run from its weights at t_L to T (finetune, the paper's
             "continue"). Controls run the ticket's trajectory in OUT/imp/ as IMP's do
             (reinit: the paper's "scratch").
"""
from __future__ import annotations

from typing import Optional

from trials.loop.training import Job
from trials.methods import controls, early_bird_watch
from trials.methods.imp import Member


class EarlyBird(Member):
    def watch(self, level: int, mask: dict) -> Optional[early_bird_watch.Watch]:
        """Level 0 is watched at every level's density; the tickets train their schedule."""
        if level:
            return None
        spec, folder = self.spec, self.trial.level_dir(0)
        watch = early_bird_watch.Watch(spec, self.layers, mask, list(range(1, spec.prune.levels + 1)),
                                 spec.rewind_iteration,
                                 lambda lv, info, state, m: early_bird_watch.save_draw(folder, lv, info, state, m))
        self.watches[0] = watch
        return watch

    def job(self, level: int, keep: Optional[dict] = None, imp: Optional[Member] = None) -> Job:
        """Level L >= 1: the mask drawn where its density stabilised (a control: controls.mask
        of its trunk's), from the dense weights at k (weight_rewind; reinit: the fresh init)
        or from the weights at the draw, t_L..T (finetune)."""
        if level == 0:
            return super().job(0, keep)
        dense = self.trial.level_dir(0)
        mask = (early_bird_watch.draw_mask(dense, level) if imp is None
                else controls.mask(self.spec, level, imp.trial, self.trial, self.layers))
        if self.spec.retrain == "finetune":
            t = early_bird_watch.read_draw(dense, level)["iteration"]
            return Job(self.spec.train, self.spec.seed, mask, early_bird_watch.draw_weights(dense, level, self.device), t)
        return Job(self.spec.train, self.spec.seed, mask, self.trial.rewind(self.device), self.spec.rewind_iteration)

    def early_bird_fields(self, level: int, job: Job, result: dict, final: dict) -> dict:
        """Level 0: whether every density stabilised, its iterations against the schedule;
        level L: its draw, and what the ticket cost (the dense run to t_L, then its own)."""
        dense = self.trial.level_dir(0)
        watch = self.watches.pop(level, None)
        if watch is not None:
            for lv, info, mask in watch.unstable(job.start + result["iterations"], final):
                early_bird_watch.save_draw(dense, lv, info, final, mask)
        out = {"schedule_iterations": self.spec.train.iterations - job.start}
        if level == 0:
            infos = [early_bird_watch.read_draw(dense, lv) for lv in range(1, self.spec.prune.levels + 1)]
            return {**out, "early_bird_stable": all(i["stable"] for i in infos), "cost_iterations": result["iterations"]}
        info = early_bird_watch.read_draw(dense, level)
        return {**out, **early_bird_watch.fields(info), "cost_iterations": info["iteration"] + result["iterations"]}
