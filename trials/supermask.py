"""Edge-popup (Ramanujan et al. 2020, "What's hidden in a randomly weighted neural
network?"): the weights of a random network stay fixed; each level learns which
fraction k of them to keep (a supermask).

    fixed weights  models.build under `seed` (a Kaiming-normal draw: fan_in, gain sqrt 2),
                   then signed_constant: sign(w) * sqrt(2/fan_in), or kaiming_normal: w as
                   drawn. scaled: x 1/sqrt(k), i.e. std sqrt(2/(k fan_in)) as the paper
                   states (the reference code's fan * (1 - prune_rate) disagrees with its
                   own top-k; allenai/hidden-networks#9). Biases stay 0 and norm layers
                   keep gamma 1, beta 0 untrained: BatchNorm is non-affine.
    level i        k = supermask.densities[i], searched afresh from the same fixed weights
                   and the same initial scores: the forward pass uses w * [|score| in the
                   top k], the gradient reaches the scores straight through the top-k (the
                   reference's GetSubnet), SGD with momentum on the scores, cosine
                   schedule. The loop, early stopping and record are IMP's
                   (trials/training.py). Levels do not depend on each other.
    files          the IMP trial folder: mask = the supermask at the last iteration,
                   final = the fixed weights under it (zeros elsewhere) with the norm
                   layers' running statistics, rewind = the fixed weights.
    random_prune   per level, a random mask with the supermask's per-layer counts on the
                   same fixed weights, evaluated without training (chance level).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.func import functional_call

from trials import layout, masks, models, pruning
from trials.environment import environment
from trials.record import LevelRecord
from trials.spec import PruneSpec
from trials.store import TrialDir, state_of
from trials.training import BatchOrder, autocast_for, evaluate, rng, train_level

GAIN = math.sqrt(2.0)  # Kaiming's gain for ReLU: std = GAIN / sqrt(fan_in)
CALIBRATION_BATCHES = 50  # training batches that set an untrained network's norm statistics


class EdgePopup:
    """Edge-popup levels in one trial folder (see module doc); level(i) as Lottery's."""

    def __init__(self, spec, out: Path, data, device, progress=None):
        self.spec, self.data, self.device, self.progress = spec, data, device, progress
        self.trial = TrialDir(out, spec)
        self.trial.begin()
        self.net = fixed_network(spec, data.info, device)
        self.layers = masks.Layers.of(self.net)
        self.fixed = state_of(self.net)  # every level starts here
        if not (self.trial.path / layout.REWIND).exists():
            self.trial.save_rewind(self.fixed)

    def level(self, level: int) -> LevelRecord:
        if self.trial.done(level):
            return self.trial.record(level)
        k = self.spec.supermask.densities[level]
        self.net.load_state_dict(self.fixed)
        if self.spec.supermask.scaled:
            scale_weights(self.net, self.layers, 1 / math.sqrt(k))
        if self.spec.control == "random_prune":
            mask, result = self.random_mask(level, k)
        else:
            mask, result = self.search(level, k)
        record = LevelRecord(level=level, **masks.describe(mask, self.layers), **result)
        final = {name: v * mask[name].to(v.device) if name in mask else v
                 for name, v in state_of(self.net).items()}  # zeros where not chosen, as IMP's
        self.trial.finish(level, mask, final, record)
        return record

    def search(self, level: int, k: float) -> tuple[dict, dict]:
        s = self.spec.supermask
        scores = initial_scores(self.net, self.layers, s.score_init, rng(self.spec.seed, "scores"))
        model = Supermask(self.net, self.layers, k, s.scope, scores)
        # train's loop settings (batch_size, iterations, eval_interval, precision); SGD on the scores
        t = dataclasses.replace(self.spec.train, optimizer="sgd", lr=s.lr, momentum=s.momentum,
                                weight_decay=s.weight_decay)
        progress = (lambda it, total, val: self.progress(level, it, total, val)) if self.progress else None
        result = train_level(model, {}, self.data, t, self.spec.seed, 0, progress=progress,
                             schedule=schedule(s, t.iterations))
        return model.mask(), result

    def random_mask(self, level: int, k: float) -> tuple[dict, dict]:
        started = time.perf_counter()
        mask = pruning.prune(PruneSpec(), self.fixed, masks.ones(self.layers), self.layers,
                             strategy="random", targets=layer_counts(self.layers, k),
                             generator=rng(self.spec.seed, "random_prune", level))
        masks.Masker(self.net, mask).apply()
        return mask, {**evaluated(self.net, self.data, self.spec), "seconds": time.perf_counter() - started,
                      "environment": environment(self.device)}


# ---------------------------------------------------------------- the network


class Supermask(nn.Module):
    """`net` with its prunable weights used through the top-k of learned scores; only the
    scores are parameters that train (net's own are frozen by fixed_network)."""

    def __init__(self, net: nn.Module, layers: masks.Layers, k: float, scope: str, scores: dict):
        super().__init__()
        self.net, self.scope = net, scope
        self.names = [layers.weight(n) for n in layers.names]
        self.scores = nn.ParameterList(nn.Parameter(scores[w].clone()) for w in self.names)
        counts = layer_counts(layers, k)
        self.counts = [counts[n] for n in layers.names]
        self.total = max(1, round(k * sum(s.numel() for s in self.scores)))  # scope=global

    def chosen(self, sizes: list) -> list[torch.Tensor]:
        """Per weight tensor, True where its |score| (`sizes`) is in the top k (of the layer, or of all)."""
        flat = [z.detach().flatten() for z in sizes]
        if self.scope == "global":
            picks = _top(torch.cat(flat), self.total).split([f.numel() for f in flat])
        else:
            picks = [_top(f, c) for f, c in zip(flat, self.counts)]
        return [p.view_as(z) for p, z in zip(picks, sizes)]

    def forward(self, x):
        sizes = [score.abs() for score in self.scores]
        weights = {name: self.net.get_parameter(name) * _StraightThrough.apply(size, keep)
                   for name, size, keep in zip(self.names, sizes, self.chosen(sizes))}
        return functional_call(self.net, weights, (x,))

    def mask(self) -> dict:
        keeps = self.chosen([score.detach().abs() for score in self.scores])
        return {name: keep.cpu() for name, keep in zip(self.names, keeps)}


class _StraightThrough(torch.autograd.Function):
    """Forward: the 0/1 mask, exactly (so the ticket's masked weights give the same numbers);
    backward: the mask's gradient passed on to |score| unchanged (the reference's GetSubnet)."""

    @staticmethod
    def forward(ctx, magnitude, keep):
        return keep.to(magnitude.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros_like(values, dtype=torch.bool)
    return keep.scatter_(0, torch.topk(values, k, sorted=False).indices, True)


def layer_counts(layers: masks.Layers, k: float) -> dict:
    """Weights a layerwise supermask (and the random control) keeps per layer: k of each, at least 1."""
    return {n: max(1, round(k * math.prod(layers.shapes[layers.weight(n)]))) for n in layers.names}


def fixed_network(spec, info, device) -> nn.Module:
    """The random network a trial searches in; nothing of it ever trains (see module doc)."""
    net = models.build(dataclasses.replace(spec.model, init="kaiming_normal"), info, seed=spec.seed)
    if spec.supermask.weight_init == "signed_constant":
        with torch.no_grad():
            for n in masks.prunable_layers(net):
                w = net.get_submodule(n).weight
                w.copy_(w.sign() * GAIN / math.sqrt(w[0].numel()))  # w[0].numel() = fan_in
    return net.requires_grad_(False).to(device)


def scale_weights(net: nn.Module, layers: masks.Layers, factor: float) -> None:
    with torch.no_grad():
        for n in layers.names:
            net.get_parameter(layers.weight(n)).mul_(factor)


def initial_scores(net: nn.Module, layers: masks.Layers, init: str, g: torch.Generator) -> dict:
    """kaiming_uniform: U(+-1/sqrt(fan_in)) (torch's default layer init, a = sqrt 5, as the
    reference code); kaiming_normal: N(0, 2/fan_in). Drawn on the CPU: the same on every device."""
    out = {}
    for n in layers.names:
        w = torch.empty(layers.shapes[layers.weight(n)])
        if init == "kaiming_uniform":
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        else:
            nn.init.kaiming_normal_(w, generator=g)
        out[layers.weight(n)] = w.to(net.get_parameter(layers.weight(n)).device)
    return out


def schedule(s, iterations: int):
    """Learning rate of the scores at an iteration: cosine from s.lr to 0, or constant."""
    if s.schedule == "constant":
        return lambda it: s.lr
    return lambda it: 0.5 * s.lr * (1 + math.cos(math.pi * it / iterations))


# ---------------------------------------------------------------- the untrained control


def evaluated(net: nn.Module, data, spec) -> dict:
    """The record fields of a network evaluated as it is (no iteration trained)."""
    autocast = autocast_for(data.train_x.device, spec.train.precision)
    calibrate_norms(net, data, spec.train.batch_size, spec.seed)
    val_loss, val_acc = evaluate(net, data.val_x, data.val_y, autocast)
    _, test_acc = evaluate(net, data.test_x, data.test_y, autocast)
    train_loss, _ = evaluate(net, data.train_x, data.train_y, autocast)
    return {"test_acc": test_acc, "early_stop_iteration": 0, "test_acc_at_early_stop": test_acc,
            "val_loss": val_loss, "val_acc": val_acc, "val_loss_at_early_stop": val_loss,
            "train_loss": train_loss, "start_iteration": 0, "iterations": 0}


@torch.no_grad()
def calibrate_norms(net: nn.Module, data, batch_size: int, seed: int) -> None:
    """Norm layers' running statistics of this network, as training would have set them:
    an equal-weight average over the first CALIBRATION_BATCHES training batches."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    order = BatchOrder(len(data.train_x), batch_size, seed, data.train_x.device)
    net.train()
    for it in range(min(CALIBRATION_BATCHES, order.steps_per_epoch)):
        net(data.train_x[order(it)])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
