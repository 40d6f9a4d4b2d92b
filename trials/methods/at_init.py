"""Pruning at initialization (ARCHITECTURE.md, "Pruning at initialization"): a method scores
the network at the trial's rewind point (k = 0: its init), keeps at level L exactly as many
weights as IMP keeps at level L, and trains them from there like a weight-rewind ticket.
Level 0 is the dense run, the same as IMP's (one shared unit in a sweep).

    snip            |g ⊙ θ|: g the training-loss gradient summed over at_init.batches
                    batches (Lee et al. 2019)
    grasp           θ ⊙ Hg, logits divided by at_init.temperature (Wang et al. 2020). The paper
                    removes the largest S(-θ) = -θ ⊙ Hg, so the largest θ ⊙ Hg are kept
    synflow         |θ ⊙ ∂R/∂θ|, R = 1ᵀf(1) of the net with every parameter and BatchNorm buffer
                    replaced by its absolute value, in eval mode and float64, on one all-ones
                    input; data-free, re-scored for at_init.rounds rounds at densities
                    d^(r/rounds), r = 1..rounds (Tanaka et al. 2020)
    magnitude_init  |θ|
    random_init     uniform random scores (seeded by the trial's seed)

Counts: at_init.scope=global ranks the layers without an explicit rate (prune.layer_rates,
prune.output_rate) together and keeps IMP's level-L count of that pool; the others, and
every layer under layerwise, keep IMP's level-L count each (counting.keep_count applied L
times). Each level scores the rewind point afresh: single-shot masks are nested across
levels; SynFlow's need not be.

Controls (Frankle et al. 2021) change the mask of the method's level, never its count per
layer: shuffle permutes each layer's mask at random; invert keeps each layer's lowest
scores (SynFlow: its first round's, on the unpruned net); reinit trains the mask from a
fresh init (trials/methods/controls.py)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from trials import methods
from trials.core.seeds import rng
from trials.methods import counting, pruning
from trials.nets import models
from trials.nets.masks import Layers, Mask

# ---------------------------------------------------------------- counts


def _iterate(items: int, rate: float, level: int) -> int:
    for _ in range(level):
        items = counting.keep_count(items, rate)
    return items


def counts(spec, layers: Layers, level: int) -> tuple[dict, list, int]:
    """(layer -> count of each layer ranked alone, the pooled layers, the pool's count) at
    level `level`: IMP's counts with prune.scope = at_init.scope."""
    prune = dataclasses.replace(spec.prune, scope=spec.at_init.scope)
    alone, pool, pooled = counting.counters(prune, layers)
    return {n: _iterate(items, rate, level) for n, (items, rate) in alone.items()}, pool, \
        _iterate(pooled, prune.rate, level)


def select(scores: dict, alone: dict, pool: list, pool_count: int) -> dict:
    """layer -> flat bool vector of the kept (highest-scoring) weights."""
    keep = {n: pruning._top(scores[n], k) for n, k in alone.items()}
    if pool:
        chosen = pruning._top(torch.cat([scores[n] for n in pool]), pool_count)
        keep.update(zip(pool, chosen.split([scores[n].numel() for n in pool])))
    return keep


def to_mask(keep: dict, layers: Layers) -> Mask:
    return {layers.weight(n): keep[n].view(layers.shapes[layers.weight(n)]).clone() for n in layers.names}


# ---------------------------------------------------------------- scorers


def _weights(net, layers: Layers) -> list:
    params = dict(net.named_parameters())
    return [params[layers.weight(n)] for n in layers.names]


def _flat(layers: Layers, tensors) -> dict:
    return {n: t.detach().flatten().to("cpu", torch.float64) for n, t in zip(layers.names, tensors)}


def batches(spec, data) -> list:
    """The scoring batches: the first at_init.batches of a permutation of the training set
    drawn from the trial's seed (no augmentation)."""
    n, b = len(data.train_x), spec.train.batch_size
    order = torch.randperm(n, generator=rng(spec.seed, "at_init"))[: b * spec.at_init.batches]
    order = order.to(data.train_x.device)
    return [(data.train_x[i], data.train_y[i]) for i in order.split(b)]


def snip(net, layers: Layers, data_batches: list) -> dict:
    ws = _weights(net, layers)
    grads = [torch.zeros_like(w) for w in ws]
    for x, y in data_batches:
        for g, gi in zip(grads, torch.autograd.grad(F.cross_entropy(net(x), y), ws)):
            g += gi
    return _flat(layers, [(g * w).abs() for g, w in zip(grads, ws)])


def grasp(net, layers: Layers, data_batches: list, temperature: float) -> dict:
    ws = _weights(net, layers)
    g = [torch.zeros_like(w) for w in ws]
    for x, y in data_batches:
        for a, gi in zip(g, torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), ws)):
            a += gi
    hg = [torch.zeros_like(w) for w in ws]
    for x, y in data_batches:
        grads = torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), ws, create_graph=True)
        z = sum((a * gi).sum() for a, gi in zip(g, grads))
        for a, hi in zip(hg, torch.autograd.grad(z, ws)):
            a += hi
    return _flat(layers, [w * h for w, h in zip(ws, hg)])


def magnitude_init(net, layers: Layers) -> dict:
    return _flat(layers, [w.abs() for w in _weights(net, layers)])


def random_init(spec, layers: Layers) -> dict:
    g = rng(spec.seed, "random_init")
    return {n: torch.rand(math.prod(layers.shapes[layers.weight(n)]), generator=g, dtype=torch.float64)
            for n in layers.names}


def synflow_net(net):
    """The linearised net: float64, eval mode, every parameter and float buffer |θ|."""
    net = net.double().eval()
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.abs_()
    return net


def synflow_scores(net, layers: Layers, shape: tuple, keep: dict) -> dict:
    """One round's |θ ⊙ ∂R/∂θ| on `net` (synflow_net) with the weights outside `keep` zeroed."""
    ws = _weights(net, layers)
    originals = [w.detach().clone() for w in ws]
    with torch.no_grad():
        for n, w in zip(layers.names, ws):
            w.mul_(keep[n].view_as(w).to(w.device, w.dtype))
    x = torch.ones(1, *shape, dtype=torch.float64, device=ws[0].device)
    grads = torch.autograd.grad(net(x).sum(), ws)
    scores = _flat(layers, [(g * w).abs() for g, w in zip(grads, ws)])
    with torch.no_grad():
        for w, o in zip(ws, originals):
            w.copy_(o)
    return scores


def synflow(net, layers: Layers, shape: tuple, rounds: int, alone: dict, pool: list, pool_count: int):
    """(kept weights after `rounds` rounds, the first round's scores)."""
    net = synflow_net(net)
    size = {n: math.prod(layers.shapes[layers.weight(n)]) for n in layers.names}
    keep = {n: torch.ones(size[n], dtype=torch.bool) for n in layers.names}
    total = sum(size[n] for n in pool)
    first = None
    for r in range(1, rounds + 1):
        scores = synflow_scores(net, layers, shape, keep)
        first = scores if first is None else first
        dead = torch.tensor(float("-inf"), dtype=torch.float64)
        scores = {n: torch.where(keep[n], s, dead) for n, s in scores.items()}
        f = r / rounds
        keep = select(scores, {n: round(size[n] * (k / size[n]) ** f) for n, k in alone.items()},
                      pool, round(total * (pool_count / total) ** f) if pool else 0)
    return keep, first


# ---------------------------------------------------------------- a level's mask


def scoring_net(spec, weights: dict, info, device):
    net = models.build(spec.model, info, seed=spec.seed, device=device)
    net.load_state_dict(weights)
    return net.train()


@dataclasses.dataclass
class Scoring:
    """What a method's scorer gets for level `level`: the spec, the rewind point's weights,
    the layers, the data and the level's counts (`counts`). A scorer (named by its entry in
    trials/methods) returns (one-shot scores, kept weights): its scores (layer -> flat
    float64, higher = keep; invert ranks them turned over) and usually `top(scores)`."""

    spec: object
    weights: dict
    layers: Layers
    data: object
    alone: dict
    pool: list
    pool_count: int

    def net(self):
        """The network at the scored weights, in train mode."""
        return scoring_net(self.spec, self.weights, self.data.info, self.data.train_x.device)

    def top(self, scores: dict) -> dict:
        """The level's count of the highest scores (module doc, "Counts")."""
        return select(scores, self.alone, self.pool, self.pool_count)


def snip_level(at: Scoring) -> tuple[dict, dict]:
    scores = snip(at.net(), at.layers, batches(at.spec, at.data))
    return scores, at.top(scores)


def grasp_level(at: Scoring) -> tuple[dict, dict]:
    scores = grasp(at.net(), at.layers, batches(at.spec, at.data), at.spec.at_init.temperature)
    return scores, at.top(scores)


def synflow_level(at: Scoring) -> tuple[dict, dict]:
    keep, first = synflow(at.net(), at.layers, tuple(at.data.info.shape), at.spec.at_init.rounds, at.alone,
                          at.pool, at.pool_count)
    return first, keep


def magnitude_level(at: Scoring) -> tuple[dict, dict]:
    scores = magnitude_init(at.net(), at.layers)
    return scores, at.top(scores)


def random_level(at: Scoring) -> tuple[dict, dict]:
    scores = random_init(at.spec, at.layers)
    return scores, at.top(scores)


def scores_and_keep(spec, weights: dict, layers: Layers, data, level: int) -> tuple[dict, dict]:
    """(one-shot scores, kept weights) of the method at level `level` (module doc): its
    registered scorer (trials/methods)."""
    alone, pool, pool_count = counts(spec, layers, level)
    return methods.of(spec).load("scorer")(Scoring(spec, weights, layers, data, alone, pool, pool_count))


def shuffle(mask: Mask, layers: Layers, generator: torch.Generator) -> Mask:
    """Each layer's mask permuted at random within the layer: the same count per layer."""
    out = dict(mask)
    for n in layers.names:
        m = mask[layers.weight(n)]
        out[layers.weight(n)] = m.flatten()[torch.randperm(m.numel(), generator=generator)].view(m.shape)
    return out


def invert(scores: dict, mask: Mask, layers: Layers) -> Mask:
    """Per layer the mask's count of the lowest scores."""
    keep = {n: pruning._top(-scores[n], int(mask[layers.weight(n)].sum())) for n in layers.names}
    return to_mask(keep, layers)


def level_mask(spec, level: int, weights: dict, layers: Layers, data) -> Mask:
    """Level `level`'s mask of an at-init trial, its control applied (module doc)."""
    scores, keep = scores_and_keep(spec, weights, layers, data, level)
    mask = to_mask(keep, layers)
    if spec.control == "shuffle":
        return shuffle(mask, layers, rng(spec.seed, "shuffle", level))
    if spec.control == "invert":
        return invert(scores, mask, layers)
    return mask
