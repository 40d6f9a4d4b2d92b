"""How many items each pruning level keeps, without torch: the rates each layer is pruned
at and the counts they give (trials/methods/pruning.py prunes by them; validation counts
the useful levels with them before any network is built, trials/spec/validate.py).

`layers` is a trials.nets.structure.Structure (masks.Layers, or the torch-free description).
"""
from __future__ import annotations

import math
from typing import Optional


def layer_rate(spec, layers, layer: str) -> Optional[float]:
    """An explicit rate (layer_rates, or output_rate for the output layer), else None."""
    rates = dict(spec.layer_rates)
    if layer in rates:
        return rates[layer]
    if layer == layers.output and spec.output_rate is not None:
        return spec.output_rate
    return None


def resolved_rate(spec, layers, layer: str) -> float:
    """The rate a level applies to the layer: its explicit rate, else prune.rate."""
    explicit = layer_rate(spec, layers, layer)
    return spec.rate if explicit is None else explicit


def candidates(spec, layers) -> list[str]:
    """Layers a level prunes: all but the output layer under structured pruning (classes stay)."""
    units = spec.kind == "structured"
    return [n for n in layers.names if not (units and n == layers.output)]


def global_pool(spec, layers, names: list) -> list[str]:
    """Layers ranked together at prune.rate (scope=global): those without an explicit rate."""
    return [n for n in names if spec.scope == "global" and layer_rate(spec, layers, n) is None]


def counters(prune, layers) -> tuple[dict, list, int]:
    """What a level's counts start from (weights, or output units when structured): layer ->
    (items at level 0, its rate) of each layer counted alone, the layers pooled under
    scope=global, and the pool's items at level 0 (the pool loses prune.rate per level)."""
    units = prune.kind == "structured"
    shape = {n: layers.shapes[layers.weight(n)] for n in layers.names}
    size = {n: shape[n][0] if units else math.prod(shape[n]) for n in layers.names}
    names = candidates(prune, layers)
    pool = global_pool(prune, layers, names)
    alone = {n: (size[n], resolved_rate(prune, layers, n)) for n in names if n not in pool}
    return alone, pool, sum(size[n] for n in pool)


def keep_count(n_alive: int, rate: float) -> int:
    return max(1, n_alive - round(rate * n_alive)) if n_alive else 0
