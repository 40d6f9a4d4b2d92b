"""Validation of a whole TrialSpec: every rule names the key, the value and what is allowed.

Rules that need the network (layer names and sizes, input shape) read them off the
built-in models' plans without torch (trials/nets/structure.py), or build any other model
on the meta device, which allocates nothing, from the dataset's static shape.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import replace

from trials import methods
from trials.core.errors import ConfigError, check


def validate(spec) -> None:
    _validate_train(spec.train)
    _validate_prune(spec.prune)
    _validate_supermask(spec.supermask)
    _validate_method(spec)
    _validate_at_init(spec)
    _validate_unread(spec)
    _validate_retrain(spec)
    _validate_stability(spec)
    _validate_early_bird(spec)
    t = spec.train
    check(0 <= spec.rewind_iteration < t.iterations, "rewind_iteration", spec.rewind_iteration,
          f"allowed: 0 <= k < train.iterations ({t.iterations})")
    check(spec.seed >= 0, "seed", spec.seed, "allowed: an integer >= 0")
    check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec.device) is not None, "device", spec.device,
          "allowed: auto, cpu, cuda, cuda:N")
    v = spec.dataset.validation
    check(v is None or v >= 1, "dataset.validation", v, "allowed: an integer >= 1 (examples)")
    _validate_against_model(spec)


def _validate_train(t) -> None:
    check(t.lr > 0, "train.lr", t.lr, "allowed: a number > 0")
    check(0 <= t.momentum < 1, "train.momentum", t.momentum, "allowed: 0 <= momentum < 1")
    check(t.optimizer == "sgd" or t.momentum == 0, "train.momentum", t.momentum,
          "allowed with train.optimizer=adam: 0 (Adam has its own betas)")
    check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "allowed: a number >= 0")
    check(t.batch_size >= 1, "train.batch_size", t.batch_size, "allowed: an integer >= 1")
    check(t.iterations >= 1, "train.iterations", t.iterations, "allowed: an integer >= 1")
    check(0 <= t.warmup_iterations <= t.iterations, "train.warmup_iterations", t.warmup_iterations,
          f"allowed: 0 .. train.iterations ({t.iterations})")
    ms = t.milestones
    check(all(0 < m < t.iterations for m in ms) and list(ms) == sorted(set(ms)), "train.milestones",
          list(ms), f"allowed: increasing iterations strictly between 0 and {t.iterations}")
    check(0 < t.gamma <= 1, "train.gamma", t.gamma, "allowed: 0 < gamma <= 1")
    check(1 <= t.eval_interval <= t.iterations, "train.eval_interval", t.eval_interval,
          f"allowed: 1 .. train.iterations ({t.iterations})")


def _validate_prune(p) -> None:
    check(0 < p.rate < 1, "prune.rate", p.rate, "allowed: 0 < rate < 1")
    for name, rate in p.layer_rates:
        check(0 <= rate < 1, f"prune.layer_rates.{name}", rate, "allowed: 0 <= rate < 1 (0 = never prune)")
    check(p.output_rate is None or 0 <= p.output_rate < 1, "prune.output_rate", p.output_rate,
          "allowed: 0 <= rate < 1 (0 = never prune), or null for prune.rate")
    check(p.levels >= 0, "prune.levels", p.levels, "allowed: an integer >= 0 (0 = dense only)")
    if p.kind == "structured":
        check(p.scope == "layerwise", "prune.scope", p.scope,
              "allowed with prune.kind=structured: layerwise (units of different layers are not comparable)")


def _validate_supermask(s) -> None:
    ks = list(s.densities)
    check(ks and all(0 < k < 1 for k in ks) and ks == sorted(set(ks), reverse=True), "supermask.densities",
          ks, "allowed: one or more fractions 0 < k < 1, strictly descending (level i keeps densities[i])")
    check(s.lr > 0, "supermask.lr", s.lr, "allowed: a number > 0")
    check(0 <= s.momentum < 1, "supermask.momentum", s.momentum, "allowed: 0 <= momentum < 1")
    check(s.weight_decay >= 0, "supermask.weight_decay", s.weight_decay, "allowed: a number >= 0")


def _validate_method(spec) -> None:
    """What the method admits (trials/methods): its controls, its retraining modes, and no
    set field of a group it refuses that it does not read."""
    m = methods.of(spec)
    check(spec.control in m.controls, "control", spec.control,
          f"allowed with method={m.name}: {', '.join(m.controls)}" + m.why(f"control={spec.control}"))
    if spec.control == "shuffle" and m.reads_path("prune.kind"):
        check(spec.prune.kind == "unstructured", "control", spec.control, "allowed with prune.kind=structured: "
              f"{', '.join(c for c in m.controls if c != 'shuffle')} (shuffle permutes weights)")
    if spec.control == "random_prune" and m.mask == "searched":
        check(spec.supermask.scope == "layerwise", "control", spec.control,
              f"allowed with method={m.name} and supermask.scope=global: none (a random mask needs per-layer "
              "densities fixed in advance: use supermask.scope=layerwise)")


def _validate_at_init(spec) -> None:
    a = spec.at_init
    check(a.batches >= 1, "at_init.batches", a.batches, "allowed: an integer >= 1")
    check(a.temperature > 0 and math.isfinite(a.temperature), "at_init.temperature", a.temperature,
          "allowed: a number > 0")
    check(a.rounds >= 1, "at_init.rounds", a.rounds, "allowed: an integer >= 1")


def _validate_unread(spec) -> None:
    """A set field the method does not read, in a group or path its entry refuses."""
    m = methods.of(spec)
    for refused in m.refuses:
        group, _, name = refused.partition(".")
        for field, value, default in _changed(getattr(spec, group)):
            path = f"{group}.{field}"
            if (name and field != name) or m.reads_path(path):
                continue
            own = [r for r in m.reads if r.startswith(group + ".")] if not name else []
            said = (f"method={m.name} reads {', '.join(own)}" if own
                    else f"{path} is read by method={', '.join(methods.readers(path))}")
            check(False, path, value, f"allowed with method={m.name}: {default} (the default; {said})"
                  + m.why(path))


def _changed(group) -> list:
    """(field, value, default) of a spec group's fields that differ from their defaults."""
    import dataclasses

    return [(f.name, getattr(group, f.name), f.default) for f in dataclasses.fields(group)
            if getattr(group, f.name) != f.default]


def _validate_retrain(spec) -> None:
    """lr_rewind and finetune start level L from level L-1's final weights (trials/runner/levels.py)."""
    if spec.retrain == "weight_rewind":
        return
    m = methods.of(spec)
    check(spec.retrain in m.retrain, "retrain", spec.retrain,
          f"allowed with method={m.name}: {', '.join(m.retrain)}" + m.why("retrain"))
    check(spec.control != "reinit", "control", spec.control,
          f"allowed with retrain={spec.retrain}: none, random_prune (reinit draws fresh weights, but "
          f"{spec.retrain} keeps the previous level's trained weights; use retrain=weight_rewind)")


def _validate_early_bird(spec) -> None:
    """Early-bird tickets (trials/methods/early_bird_watch.py): early_bird.* is read by a method whose entry
    says so (trials/methods: `early_bird`), IMP's only with early_bird.imp_levels; refused
    elsewhere, one key at a time."""
    e, m, t = spec.early_bird, methods.of(spec), spec.train
    if m.early_bird == "none" or (m.early_bird == "levels" and not e.imp_levels):
        for name, value, default in _changed(e):
            said = ("early_bird.* is read with early_bird.imp_levels: true" if m.early_bird == "levels" else
                    f"early_bird.* is read by method={', '.join(methods.readers('early_bird.interval'))}")
            check(False, f"early_bird.{name}", value, f"allowed with method={m.name}: {default} (the default; {said})")
        return
    check(m.early_bird == "levels" or not e.imp_levels, "early_bird.imp_levels", e.imp_levels,
          f"allowed with method={m.name}: false (the default; early-bird levels are IMP's)")
    check(e.window >= 2, "early_bird.window", e.window, "allowed: an integer >= 2 (masks compared)")
    check(0 < e.epsilon < 1, "early_bird.epsilon", e.epsilon, "allowed: 0 < epsilon < 1")
    run = t.iterations - (spec.rewind_iteration if m.early_bird == "levels" else 0)
    check(1 <= e.interval <= run, "early_bird.interval", e.interval,
          f"allowed: 1 .. {run} (" + ("train.iterations - rewind_iteration: the shortest level's run)"
                                      if m.early_bird == "levels" else "train.iterations: the dense run)"))
    check(e.criterion == "magnitude" or spec.prune.kind == "structured", "early_bird.criterion", e.criterion,
          "allowed with prune.kind=unstructured: magnitude (bn_gamma ranks units: prune.kind=structured)")
    if m.early_bird == "dense":
        check(spec.prune.levels >= 1, "prune.levels", spec.prune.levels,
              f"allowed with method={m.name}: an integer >= 1 (level L draws IMP's level-L density)")


def _validate_stability(spec) -> None:
    s = spec.stability
    check(s.copies == 0 or s.copies >= 2, "stability.copies", s.copies,
          "allowed: 0 (off) or an integer >= 2 (networks per measured level)")
    check(s.points >= 2, "stability.points", s.points, "allowed: an integer >= 2 (endpoints included)")
    check(s.bn_batches >= 1, "stability.bn_batches", s.bn_batches, "allowed: an integer >= 1")
    if s.copies == 0:
        check(not s.levels, "stability.levels", list(s.levels),
              "allowed with stability.copies=0 (off): [] (set stability.copies >= 2 to measure)")
        return
    check(methods.of(spec).stability, "stability.copies", s.copies, f"allowed with method={spec.method}: 0 "
          f"(instability analysis runs for method={', '.join(methods.names(stability=True))})")
    levels = list(s.levels)
    check(all(0 <= lv <= spec.prune.levels for lv in levels) and len(set(levels)) == len(levels),
          "stability.levels", levels, f"allowed: distinct levels 0..prune.levels ({spec.prune.levels}), "
          "or [] for every level")


def _validate_against_model(spec) -> None:
    from trials.nets import structure

    model, width = spec.model.name, spec.model.width
    if structure.describes(model, spec.dataset.name):  # built in: described without torch
        info, has_width = structure.INFOS[spec.dataset.name], model not in structure.WIDTHLESS
    else:
        from trials.nets import datasets, models

        info = datasets.info(spec.dataset)
        models.MODELS.get(model)
        has_width = models.has_width(model)
    check(width > 0, "model.width", width, "allowed: a number > 0 (1.0 = the paper's)")
    check(width == 1.0 or has_width, "model.width", width,
          f"allowed for {model}: 1.0 (its builder takes no width multiplier)")
    described = structure.describe(model, tuple(info.shape), info.num_classes, width)
    try:
        error, layers = described or _structure(model, tuple(info.shape), info.num_classes, width)
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:  # torch: sizes past what it can count
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ConfigError("model.width", width, f"a width whose network torch can build ({reason})") from None
    if error:
        raise ConfigError("model.name", model, f"{error}; dataset {spec.dataset.name} gives "
                          f"inputs of shape {tuple(info.shape)}")
    for name, _ in spec.prune.layer_rates:
        check(name in layers.names, f"prune.layer_rates.{name}", name,
              f"not a prunable layer of {spec.model.name}; layers: {', '.join(layers.names)}")
        check(not (spec.prune.kind == "structured" and name == layers.output), f"prune.layer_rates.{name}",
              name, "the output layer's classes are never removed by structured pruning")
    m = methods.of(spec)
    if m.levels == "prune.levels":  # edge-popup's levels are its densities, not prunings
        at_init = m.reads_path("at_init.scope")  # IMP's counts with prune.scope = at_init.scope (trials/methods/at_init.py)
        _validate_levels(replace(spec.prune, scope=spec.at_init.scope) if at_init else spec.prune, layers)
    if spec.early_bird.criterion == "bn_gamma" and spec.prune.kind == "structured":
        from trials.methods.counting import candidates

        bare = [n for n in candidates(spec.prune, layers) if not _has_norm(layers, n)]
        check(not bare, "early_bird.criterion", "bn_gamma",
              f"allowed for {spec.model.name}: magnitude ({', '.join(bare)} have no BatchNorm after them)")


def _has_norm(layers, name: str) -> bool:
    return any(c.endswith(".weight") for c in layers.companions[name])


def _validate_levels(prune, layers) -> None:
    """A level past the last one that removes anything would retrain the same network."""
    n = useful_levels(prune, layers, up_to=prune.levels + 1)  # enough to judge prune.levels
    check(prune.levels <= n, "prune.levels", prune.levels,
          f"allowed: at most {n}; level {n + 1} would remove nothing "
          "(every layer is at its floor for its rate)")


@functools.lru_cache(maxsize=256)
def _structure(model_name: str, shape: tuple, num_classes: int, width: float = 1.0):
    """(incompatibility message or None, masks.Layers or None) of a model for an input
    shape: built once on the meta device, then remembered (sweeps validate thousands of
    specs of the same few models). Callers must not modify the Layers' dicts."""
    from trials.nets import masks, models

    try:
        net = models.shell(model_name, shape, num_classes, width)
    except models.IncompatibleInput as e:
        return str(e), None
    return None, masks.Layers.of(net)


def useful_levels(prune, layers, up_to: int) -> int:
    """The last level that still removes something, for a PruneSpec on a Structure,
    counted no further than `up_to` (a tiny rate on a big layer would take millions).

    Each layer is a counter of items (weights, or output units when structured) that a
    level maps to counting.keep_count(items, rate); under scope=global the layers without
    an explicit rate share one counter at prune.rate. The next count depends on the
    current count alone, so once a counter stops changing it never changes again."""
    counters = _counters(prune, layers)
    return max((_levels_until_fixed(items, rate, up_to) for items, rate in counters), default=0)


def _counters(prune, layers) -> list[tuple[int, float]]:
    """(items at level 0, rate per level) of every independent counter, as pruning.prune counts."""
    from trials.methods import counting

    alone, pool, pooled = counting.counters(prune, layers)
    return list(alone.values()) + ([(pooled, prune.rate)] if pool else [])


@functools.lru_cache(maxsize=4096)
def _levels_until_fixed(items: int, rate: float, up_to: int) -> int:
    """Levels that change `items` before keep_count leaves it unchanged, at most `up_to`."""
    from trials.methods.counting import keep_count

    levels = 0
    while levels < up_to and (kept := keep_count(items, rate)) != items:
        items, levels = kept, levels + 1
    return levels
