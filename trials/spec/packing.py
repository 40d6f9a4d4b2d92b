"""Packing rules: which trials can train together in one pack (ARCHITECTURE.md, "Speed and
packs"), beside validation, so a planner decides without importing the engine. A pack's
members share the model architecture (`model.name`, `width`), the dataset,
`train.batch_size`, `iterations`, `eval_interval`, `precision`, `optimizer` and the
device; everything else may differ: seed, `model.init`, the learning-rate schedule,
weight decay, momentum, `prune.*`, `rewind_iteration`, `control`, `retrain`,
`stability`, and the method among those that train weights (IMP and the methods that
prune at initialization, trials/methods/at_init.py). Edge-popup trials pack with edge-popup trials (they train scores, not
weights; their `train.optimizer` is unused, and every `supermask.*` field may differ).
A model family may say its networks do not pack, and why (trials/nets/models.py Family); else
models with parameters or running state in a module without a stacked layer do not pack
(trials/nets/models.py why_not_packable).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

from trials import methods
from trials.core.errors import ConfigError
from trials.nets import structure

SHARED_TRAIN = ("optimizer", "batch_size", "iterations", "eval_interval", "precision")


def trains(spec) -> str:
    """What a trial's levels train: "scores" (edge-popup's supermasks) or "weights"; a
    pack holds one kind (trials/runner/levels.py run_pack)."""
    return methods.of(spec).trains


def shared_train(spec) -> tuple:
    """The train.* fields a pack's members share (edge-popup's scores use supermask's optimizer)."""
    return SHARED_TRAIN[1:] if trains(spec) == "scores" else SHARED_TRAIN


def check_pack(specs: list, outs: list, stacked: bool = True) -> None:
    """Refuse a pack that cannot train together, before anything is written. `stacked`
    off: its members train one after another (the alone arithmetic), so any model will do."""
    if not specs or len(specs) != len(outs):
        raise ConfigError("pack", len(specs), f"allowed: one or more specs, one folder each (got {len(outs)} folders)")
    if len({str(Path(o).resolve()) for o in outs}) != len(outs):
        raise ConfigError("pack", [str(o) for o in outs], "allowed: a distinct folder per member")
    first = specs[0]
    for i, s in enumerate(specs):
        if trains(s) != trains(first):
            raise ConfigError("method", s.method, f"allowed in this pack: a method that trains {trains(first)} "
                              f"as member 0's ({first.method}); edge-popup trials pack with edge-popup trials")
        for path, a, b in (("model.name", s.model.name, first.model.name), ("model.width", s.model.width, first.model.width),
                           ("dataset", s.dataset, first.dataset), ("device", s.device, first.device),
                           *((f"train.{f}", getattr(s.train, f), getattr(first.train, f)) for f in shared_train(s))):
            if a != b:
                raise ConfigError(path, a, f"allowed in this pack: {b!r} (member 0's); a pack's members share "
                                  "model architecture, dataset, device and train." + "/".join(shared_train(s)))
    if not stacked:
        return
    reason = no_packs(first)
    if reason:
        raise ConfigError("model.name", first.model.name, f"not packable: {reason}")


def no_packs(spec) -> Optional[str]:
    """Why the spec's networks cannot train in a pack, or None. Every built-in model packs on
    every built-in dataset (tests/test_models.py builds each to check), so a planner decides
    those without torch (trials/nets/structure.py); any other model is asked its family, then
    its network built on the meta device."""
    if structure.describes(spec.model.name, spec.dataset.name):
        return None
    from trials.nets import models

    family = models.FAMILIES.get(spec.model.name)
    return family.no_packs or model_reason(spec.model.name, models.MODELS.get(spec.model.name), spec.dataset,
                                           spec.model.width)


@functools.lru_cache(maxsize=256)
def model_reason(name: str, builder, dataset, width: float) -> Optional[str]:
    """why_not_packable of the model as built for `dataset`, once per (model, builder,
    dataset, width): a planner asks for every trial, and each answer builds a model shell."""
    from trials.nets import datasets, models

    info = datasets.info(dataset)
    return models.why_not_packable(models.shell(name, info.shape, info.num_classes, width))


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
    return (trains(spec), spec.model.name, spec.model.width, spec.dataset, spec.device,
            *(getattr(spec.train, f) for f in shared_train(spec)))
