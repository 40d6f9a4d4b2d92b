"""Early-bird tickets (You et al. 2020, "Drawing early-bird tickets"; ARCHITECTURE.md,
"Early-bird tickets"): the mask a pruning rule would draw stops changing early in
training, so a run can stop once it has. The draws, the window and the watch live here;
method=early_bird's member is trials/methods/early_bird.py, IMP's early-bird levels are
trials/runner/levels.py Member's.

Every `early_bird.interval` iterations of a watched run (a Job's `watch`, asked by the
training loop) the trial's pruning rule draws its mask from the weights as they are: the
mask IMP would prune to (prune.kind, scope, rates; trials/methods/pruning.py), ranked by magnitude,
or for structured pruning optionally by the |gamma| of the BatchNorm after each unit
(`early_bird.criterion: bn_gamma`, network slimming, the paper's; the default is the trial's
own rule, magnitude). The newest mask is compared with each of the `window - 1` masks drawn
before it (normalised Hamming distance: items that differ / items, over the pruned layers'
weights, or their units when structured; as the reference code does). Once the window is
full and every distance is below `early_bird.epsilon`, the mask has stabilised.

- method=early_bird: level 0 is the dense run, watched at every level's density at once
  (level L: IMP's level-L counts, drawn one-shot as L prunings of the same weights, so the
  counts are IMP's exactly); it stops once all have stabilised (and not before the rewind
  point k). Level L's mask is the one drawn where its density stabilised (t_L); the
  weights at t_L are kept. Level L then trains as `retrain` says: weight_rewind from the
  dense weights at k (k..T); finetune continues the dense run from its weights at t_L under
  the mask to the end of the schedule (t_L..T, the paper's "continue"); control=reinit (the
  paper's "scratch") trains the mask from a fresh init. A density whose mask never
  stabilised is drawn from the dense run's final weights at T, and its record says so.
- method=imp with early_bird.imp_levels: level L (but the last) is watched at level L+1's
  mask (L+1's pruning of the weights, nested in L's mask) and stops once it stabilised;
  level L+1 then prunes level L's final weights, which are its weights where it stopped,
  so its mask is the one drawn there. The last level trains in full.

A level's draw is written beside the level that drew it (layout.draw: level_XX/draw_YY.json
describes level YY's mask; method=early_bird also keeps the weights at t_L there), so it
travels with its level when a level is copied (a control's trunk, a shared unit).
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Callable, Optional

import torch

from trials.folder import layout
from trials.folder.store import load_tensors, save_mask, save_tensors, write_json
from trials.methods import counting, pruning
from trials.nets.masks import Layers, Mask


def ranked(spec, weights: dict, layers: Layers) -> dict:
    """What the draw ranks: the weights, or with criterion bn_gamma each pruned layer's weight
    replaced by its units' |gamma| as a [units, 1] tensor (the unit scorer sums |.| per unit)."""
    if spec.early_bird.criterion != "bn_gamma":
        return weights
    out = dict(weights)
    for n in counting.candidates(spec.prune, layers):
        gamma = next(c for c in layers.companions[n] if c.endswith(".weight"))
        out[layers.weight(n)] = weights[gamma].detach().reshape(-1, 1)
    return out


def draw(spec, weights: dict, mask: Mask, layers: Layers, levels: int) -> list:
    """The masks of the next `levels` prunings of `weights` from `mask` (each nested in the
    one before, as IMP's levels are, but ranked on the same weights)."""
    w = ranked(spec, weights, layers)
    out = []
    for _ in range(levels):
        mask = pruning.prune(spec.prune, w, mask, layers)
        out.append(mask)
    return out


def items(spec, mask: Mask, layers: Layers) -> torch.Tensor:
    """The mask's pruned items as one bool vector: weights, or units when structured."""
    units = spec.prune.kind == "structured"
    return torch.cat([pruning.alive(mask, layers, n, units) for n in counting.candidates(spec.prune, layers)])


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised Hamming distance: the fraction of items in which two masks differ."""
    return (a != b).sum().item() / a.numel()


class Draws:
    """One density's draws: a window of its last masks and the trace of distances."""

    def __init__(self, window: int, epsilon: float):
        self.recent: deque = deque(maxlen=window)
        self.window, self.epsilon = window, epsilon
        self.trace: list = []  # [iteration, largest distance of the newest mask to those before it]
        self.found: Optional[dict] = None  # where it stabilised

    def add(self, iteration: int, vector: torch.Tensor) -> bool:
        """The newest draw; True once it has stabilised (window full, every distance < epsilon)."""
        before = list(self.recent)[-(self.window - 1):]
        self.recent.append(vector)
        if not before:
            return False
        d = max(distance(vector, b) for b in before)
        self.trace.append([iteration, d])
        return len(before) == self.window - 1 and d < self.epsilon

    def info(self, iteration: int, stable: bool) -> dict:
        return {"iteration": iteration, "stable": stable,
                "distance": self.trace[-1][1] if self.trace else None, "trace": list(self.trace)}


class Watch:
    """A Job's watch (trials/loop/training.py train_members): draws every `every` iterations at
    the densities `levels` (counted from `mask`) and stops once every one has stabilised
    and the run has passed `least` (the rewind point of a dense run). `found(level, info,
    state, mask)` is told of each density as it stabilises."""

    def __init__(self, spec, layers: Layers, mask: Mask, levels: list, least: int,
                 found: Callable[[int, dict, dict, Mask], None]):
        e = spec.early_bird
        self.spec, self.layers, self.mask, self.levels, self.least, self.found = spec, layers, mask, levels, least, found
        self.every = e.interval
        self.draws = {lv: Draws(e.window, e.epsilon) for lv in levels}

    def __call__(self, iteration: int, state: dict) -> bool:
        pending = [lv for lv in self.levels if self.draws[lv].found is None]
        if pending:
            masks = draw(self.spec, state, self.mask, self.layers, max(pending) - min(self.levels) + 1)
            for lv in pending:
                mask = masks[lv - min(self.levels)]
                if self.draws[lv].add(iteration, items(self.spec, mask, self.layers)):
                    self.draws[lv].found = self.draws[lv].info(iteration, True)
                    self.found(lv, self.draws[lv].found, state, mask)
        return iteration >= self.least and all(d.found is not None for d in self.draws.values())

    def unstable(self, iteration: int, final: dict) -> list:
        """(level, info, mask) of each density that never stabilised: drawn from the final weights."""
        pending = [lv for lv in self.levels if self.draws[lv].found is None]
        if not pending:
            return []
        masks = draw(self.spec, final, self.mask, self.layers, max(pending) - min(self.levels) + 1)
        return [(lv, self.draws[lv].info(iteration, False), masks[lv - min(self.levels)]) for lv in pending]


# ---------------------------------------------------------------- the trial folder's draws


def save_draw(folder: Path, level: int, info: dict, state: Optional[dict] = None, mask: Optional[Mask] = None) -> None:
    """Level `level`'s draw, in the folder of the level whose training drew it."""
    folder.mkdir(parents=True, exist_ok=True)
    if state is not None:
        save_tensors(folder / layout.draw(level, layout.TENSOR_SUFFIX), state)
    if mask is not None:
        save_mask(folder / layout.draw(level, ".mask" + layout.TENSOR_SUFFIX), mask)
    write_json(folder / layout.draw(level, ".json"), info)


def read_draw(folder: Path, level: int) -> dict:
    return json.loads((folder / layout.draw(level, ".json")).read_text())


def draw_weights(folder: Path, level: int, device="cpu") -> dict:
    return load_tensors(folder / layout.draw(level, layout.TENSOR_SUFFIX), device)


def draw_mask(folder: Path, level: int) -> Mask:
    return load_tensors(folder / layout.draw(level, ".mask" + layout.TENSOR_SUFFIX))


def fields(info: dict) -> dict:
    """The level record's fields of a draw (trials/folder/record.py)."""
    return {"early_bird_iteration": info["iteration"], "early_bird_stable": info["stable"],
            "early_bird_distance": info["distance"], "early_bird_trace": info["trace"]}
