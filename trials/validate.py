"""Validation of a whole TrialSpec: every rule names the key, the value and what is allowed.

Rules that need the network (layer names, input shape) build it on the meta device,
which allocates nothing, from the dataset's static shape.
"""
from __future__ import annotations

import functools
import re

from trials.errors import ConfigError


def _check(ok: bool, key: str, value, allowed: str):
    if not ok:
        raise ConfigError(key, value, allowed)


def validate(spec) -> None:
    _validate_train(spec.train)
    _validate_prune(spec.prune)
    t = spec.train
    _check(0 <= spec.rewind_iteration < t.iterations, "rewind_iteration", spec.rewind_iteration,
           f"allowed: 0 <= k < train.iterations ({t.iterations})")
    _check(spec.seed >= 0, "seed", spec.seed, "allowed: an integer >= 0")
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec.device) is not None, "device", spec.device,
           "allowed: auto, cpu, cuda, cuda:N")
    v = spec.dataset.validation
    _check(v is None or v >= 1, "dataset.validation", v, "allowed: an integer >= 1 (examples)")
    _validate_against_model(spec)


def _validate_train(t) -> None:
    _check(t.lr > 0, "train.lr", t.lr, "allowed: a number > 0")
    _check(0 <= t.momentum < 1, "train.momentum", t.momentum, "allowed: 0 <= momentum < 1")
    _check(t.optimizer == "sgd" or t.momentum == 0, "train.momentum", t.momentum,
           "allowed with train.optimizer=adam: 0 (Adam has its own betas)")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "allowed: a number >= 0")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "allowed: an integer >= 1")
    _check(t.iterations >= 1, "train.iterations", t.iterations, "allowed: an integer >= 1")
    _check(0 <= t.warmup_iterations <= t.iterations, "train.warmup_iterations", t.warmup_iterations,
           f"allowed: 0 .. train.iterations ({t.iterations})")
    ms = t.milestones
    _check(all(0 < m < t.iterations for m in ms) and list(ms) == sorted(set(ms)), "train.milestones",
           list(ms), f"allowed: increasing iterations strictly between 0 and {t.iterations}")
    _check(0 < t.gamma <= 1, "train.gamma", t.gamma, "allowed: 0 < gamma <= 1")
    _check(1 <= t.eval_interval <= t.iterations, "train.eval_interval", t.eval_interval,
           f"allowed: 1 .. train.iterations ({t.iterations})")


def _validate_prune(p) -> None:
    _check(0 < p.rate < 1, "prune.rate", p.rate, "allowed: 0 < rate < 1")
    for name, rate in p.layer_rates:
        _check(0 <= rate < 1, f"prune.layer_rates.{name}", rate, "allowed: 0 <= rate < 1 (0 = never prune)")
    _check(p.output_rate is None or 0 <= p.output_rate < 1, "prune.output_rate", p.output_rate,
           "allowed: 0 <= rate < 1 (0 = never prune), or null for prune.rate")
    _check(p.levels >= 0, "prune.levels", p.levels, "allowed: an integer >= 0 (0 = dense only)")
    if p.kind == "structured":
        _check(p.scope == "layerwise", "prune.scope", p.scope,
               "allowed with prune.kind=structured: layerwise (units of different layers are not comparable)")


def _validate_against_model(spec) -> None:
    from trials import datasets, models

    info = datasets.info(spec.dataset)
    models.MODELS.get(spec.model.name)
    error, layers, output = _structure(spec.model.name, tuple(info.shape), info.num_classes)
    if error:
        raise ConfigError("model.name", spec.model.name, f"{error}; dataset {spec.dataset.name} gives "
                          f"inputs of shape {tuple(info.shape)}")
    for name, _ in spec.prune.layer_rates:
        _check(name in layers, f"prune.layer_rates.{name}", name,
               f"not a prunable layer of {spec.model.name}; layers: {', '.join(layers)}")
        _check(not (spec.prune.kind == "structured" and name == output), f"prune.layer_rates.{name}",
               name, "the output layer's classes are never removed by structured pruning")


@functools.lru_cache(maxsize=256)
def _structure(model_name: str, shape: tuple, num_classes: int):
    """(incompatibility message or None, prunable layer names, output layer) of a model for
    an input shape: built once on the meta device, then remembered (sweeps validate
    thousands of specs of the same few models)."""
    from trials import masks, models

    try:
        net = models.shell(model_name, shape, num_classes)
    except models.IncompatibleInput as e:
        return str(e), (), None
    return None, tuple(masks.prunable_layers(net)), masks.output_layer(net)
