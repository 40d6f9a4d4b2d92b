"""Pruning: one level's new mask from the previous mask and the trained weights.

A level removes `rate` of the *remaining* items of each layer (weights when
prune.kind=unstructured, whole output units when structured): round(rate * alive),
keeping at least one item per layer. Only surviving items are ranked, so masks are
nested by construction. Ranking uses a stable sort, so ties resolve by position and
the same weights always give the same mask.

A strategy is a scorer (higher = keep). `magnitude` is |w| per weight and the L1 norm
of a unit's incoming weights per unit (Li et al. 2016); `random` draws uniform scores
(the random-pruning control).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from trials.core.registry import Registry
from trials.methods.counting import candidates, global_pool, keep_count, resolved_rate
from trials.nets.masks import Layers, Mask

Scorer = Callable[[torch.Tensor, bool, Optional[torch.Generator]], torch.Tensor]
# no spec key names a scorer: IMP uses magnitude, the random_prune control uses random
STRATEGIES: Registry = Registry("pruning scorer", None)


@STRATEGIES.register("magnitude")
def magnitude(weight: torch.Tensor, units: bool, g) -> torch.Tensor:
    w = weight.abs().float()
    return w.flatten(1).sum(1) if units else w.flatten()


@STRATEGIES.register("random")
def random(weight: torch.Tensor, units: bool, g) -> torch.Tensor:
    n = weight.shape[0] if units else weight.numel()
    return torch.rand(n, generator=g)


def alive(mask: Mask, layers: Layers, layer: str, units: bool) -> torch.Tensor:
    """Flat bool vector of the layer's surviving items (weights or output units)."""
    m = mask[layers.weight(layer)]
    return m.flatten(1).any(1) if units else m.flatten()


def prune(spec, weights: dict, mask: Mask, layers: Layers, strategy: str = "magnitude",
          targets: Optional[dict] = None, generator: Optional[torch.Generator] = None) -> Mask:
    """New mask for one level. `targets` (layer -> items to keep) replaces the rates:
    the random control uses it to match IMP's per-layer counts exactly."""
    score = STRATEGIES.get(strategy)
    units = spec.kind == "structured"
    names = candidates(spec, layers)
    survivors = {n: alive(mask, layers, n, units) for n in names}
    scores = {}
    for n in names:
        s = score(weights[layers.weight(n)].cpu(), units, generator).to(torch.float64)
        scores[n] = torch.where(survivors[n], s, torch.tensor(float("-inf"), dtype=torch.float64))

    if targets is not None:
        keep = {n: _top(scores[n], targets[n]) for n in names}
    else:
        pool = global_pool(spec, layers, names)
        keep = {n: _top(scores[n], keep_count(int(survivors[n].sum()), resolved_rate(spec, layers, n)))
                for n in names if n not in pool}
        keep.update(_global_top(scores, survivors, pool, spec.rate))
    return _to_mask(mask, layers, keep, units)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest scores, ties going to the lower index: the first k of a stable
    descending sort, found by selection (kthvalue: a large layer's sort was most of a big
    pack's pruning time)."""
    n = scores.numel()
    if k <= 0 or k >= n:
        return torch.full_like(scores, k > 0, dtype=torch.bool)
    threshold = torch.kthvalue(scores, n - k + 1).values  # the k-th largest
    chosen = scores > threshold
    ties = (scores == threshold).nonzero().flatten()
    chosen[ties[: k - int(chosen.sum())]] = True
    return chosen


def _global_top(scores: dict, survivors: dict, pool: list, rate: float) -> dict:
    if not pool:
        return {}
    flat = torch.cat([scores[n] for n in pool])
    chosen = _top(flat, keep_count(int(sum(survivors[n].sum() for n in pool)), rate))
    return dict(zip(pool, chosen.split([len(scores[n]) for n in pool])))


def _to_mask(old: Mask, layers: Layers, keep: dict, units: bool) -> Mask:
    new = {k: v.clone() for k, v in old.items()}
    for n, kept in keep.items():
        w = layers.weight(n)
        if not units:
            new[w] = kept.view(layers.shapes[w])
            continue
        new[w] = kept.view(-1, *[1] * (len(layers.shapes[w]) - 1)).expand(layers.shapes[w]).clone()
        for name in layers.companions[n]:  # the removed unit's bias and norm parameters
            new[name] = kept.clone()
    return new


def counts(mask: Mask, layers: Layers, units: bool) -> dict:
    """Items alive per layer: the targets a random control must match."""
    return {n: int(alive(mask, layers, n, units).sum()) for n in layers.names
            if not (units and n == layers.output)}
