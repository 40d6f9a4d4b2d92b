"""Instability analysis (Frankle et al. 2020, "Linear mode connectivity and the lottery
ticket hypothesis") and the start of each retraining mode (Renda et al. 2020).

    measure(spec, level, start_weights, mask, data, device) -> the level record's stability fields

trains `spec.stability.copies` networks from one start (a level's start weights under its
mask, positioned where that level starts, with that level's schedule), each with its own
SGD noise: data order and augmentation are pure functions of the seed passed to
train_level, so copy c trains under seed `noise_seed(spec, c)`. Then, for every pair of
copies, it evaluates the test set at `points` evenly spaced points on the straight line
between their final weights. The error barrier (instability) is the largest test error
on the line minus the mean error of its two ends; the loss barrier is the same for the
test cross-entropy. Both are the mean over pairs; `stability_acc_a/b` are the ends of
the first pair (copies 0 and 1).

- A sparse network's copies share its mask; every point of the line is masked, so pruned
  weights stay exactly zero along the path.
- BatchNorm: running statistics are not interpolated. At every point, endpoints
  included, they are recomputed from `spec.stability.bn_batches` fixed training batches
  in train mode with cumulative averaging (momentum None). A choice: the statistics of
  an interpolated network are not the interpolated statistics, and evaluating with the
  latter would add their mismatch to the barrier (recomputing them is the usual fix in
  later work on interpolating networks).
  Models without BatchNorm are evaluated as they are (the ends then equal the copies'
  own test accuracies exactly). ARCHITECTURE.md, "Instability and retraining modes".
- Nothing here writes files: the caller (trials/runner/levels.py, instability)
  puts the fields into the level's record before the level is written.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional

import torch
import torch.nn as nn

from trials.core.seeds import rng
from trials.folder.record import STABILITY
from trials.loop.arithmetic import autocast_for, evaluate
from trials.loop.training import Job, learning_rate, train_level
from trials.nets import models
from trials.nets.masks import Mask


def asked(spec, level: int) -> bool:
    """Whether the spec measures instability at this level."""
    s = spec.stability
    return s.copies > 0 and (not s.levels or level in s.levels)


def retraining(spec, level: int) -> tuple[int, Optional[Callable[[int], float]]]:
    """(start iteration, schedule) of a level under spec.retrain; schedule None = the
    spec's own learning-rate schedule (train_level's default). Level 0 is dense training
    from init (0), or, for stability copies, from the rewind point k. finetune trains
    T-k iterations at the final learning rate."""
    k = spec.rewind_iteration
    if level >= 1 and spec.retrain == "finetune":
        final_lr = learning_rate(spec.train, spec.train.iterations - 1)
        return k, lambda iteration: final_lr
    return k, None


def noise_seed(spec, copy: int) -> int:
    """The data-order/augmentation seed of stability copy `copy` (independent of the trial's own)."""
    return rng(spec.seed, "stability", copy).initial_seed()


def copy_jobs(spec, level: int, start_weights: dict, mask: Mask) -> list[Job]:
    """The level's copies as jobs of the training loop (a pack trains its members' copies
    together: trials/runner/levels.py instability), each under its own noise seed."""
    start, schedule = retraining(spec, level)
    return [Job(spec.train, noise_seed(spec, c), mask, start_weights, start, schedule=schedule)
            for c in range(spec.stability.copies)]


def measure(spec, level: int, start_weights: dict, mask: Mask, data, device,
            seeds: Optional[list] = None, finals: Optional[list] = None) -> dict:
    """The stability fields of trials/folder/record.py for one level (see module doc). `seeds`
    overrides the copies' noise seeds (tests: equal seeds must give instability 0);
    `finals`: the copies' final states when they trained elsewhere (copy_jobs)."""
    seeds = list(seeds) if seeds is not None else [noise_seed(spec, c) for c in range(spec.stability.copies)]
    net = models.build(spec.model, data.info, seed=spec.seed, device=device)
    if finals is None:
        finals = [train_copy(net, spec, level, start_weights, mask, data, seed)[0] for seed in seeds]
    curves = [interpolate(net, finals[a], finals[b], mask, data, spec)
              for a, b in itertools.combinations(range(len(finals)), 2)]
    fields = [barriers(curve) for curve in curves]
    out = {f"stability_{name}": sum(f[name] for f in fields) / len(fields)
           for name in ("error_barrier", "loss_barrier")}
    out.update(stability_acc_a=curves[0][0]["acc"], stability_acc_b=curves[0][-1]["acc"])
    assert set(out) == set(STABILITY)
    return out


def train_copy(net: nn.Module, spec, level: int, start_weights: dict, mask: Mask, data, seed: int):
    """One copy: `net` loads the start weights and trains as the level does, under `seed`'s
    noise. Returns (final state, train_level's result)."""
    start, schedule = retraining(spec, level)
    net.load_state_dict(start_weights)
    result = train_level(net, mask, data, spec.train, seed, start, schedule=schedule)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, result


@torch.no_grad()
def interpolate(net: nn.Module, a: dict, b: dict, mask: Mask, data, spec) -> list[dict]:
    """Test loss and accuracy at `spec.stability.points` evenly spaced points from a (alpha 0)
    to b (alpha 1): [{"alpha", "loss", "acc"}, ...]. Floating tensors are interpolated and
    masked; integer buffers (BatchNorm's batch count) are a's; BatchNorm statistics are then
    recomputed (module doc)."""
    points = spec.stability.points
    autocast = autocast_for(data.test_x.device, spec.train.precision)
    curve = []
    for i in range(points):
        alpha = i / (points - 1)
        state = {k: torch.lerp(a[k], b[k], alpha) if a[k].is_floating_point() else a[k] for k in a}
        for name, m in mask.items():
            state[name] = state[name] * m.to(state[name].device, state[name].dtype)
        net.load_state_dict(state)
        recompute_batchnorm(net, data, spec, autocast)
        loss, acc = evaluate(net, data.test_x, data.test_y, autocast)
        curve.append({"alpha": alpha, "loss": loss, "acc": acc})
    return curve


def barriers(curve: list[dict]) -> dict:
    """Error and loss barriers of one line: the largest value minus the ends' mean."""
    errors = [1.0 - p["acc"] for p in curve]
    losses = [p["loss"] for p in curve]
    return {"error_barrier": max(errors) - (errors[0] + errors[-1]) / 2,
            "loss_barrier": max(losses) - (losses[0] + losses[-1]) / 2}


def _norms(net: nn.Module) -> list:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(net: nn.Module, data, spec, autocast) -> None:
    """Running statistics as the cumulative average over `spec.stability.bn_batches` fixed
    training batches (the same at every point and for every pair); no-op without BatchNorm."""
    norms = _norms(net)
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    n, size = len(data.train_x), spec.train.batch_size
    order = torch.randperm(n, generator=rng(spec.seed, "stability", "batchnorm")).to(data.train_x.device)
    net.train()
    for i in range(min(spec.stability.bn_batches, max(1, n // size))):
        x = data.train_x[order[i * size:(i + 1) * size]]
        if data.augment is not None:
            x = data.augment(x, rng(spec.seed, "stability", "batchnorm", i))
        with autocast():
            net(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
