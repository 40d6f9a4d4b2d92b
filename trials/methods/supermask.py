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
                   schedule. Levels do not depend on each other.
    engine         a trial is a member (Searcher) of trials/runner/levels.py's level runner, and
                   a level a Job (Search) of the one training loop, so loop, early
                   stopping, record and packs are IMP's: alone, a Supermask module trains
                   under arithmetic.Alone; in a pack, StackedSearch trains the members'
                   scores together over their stacked fixed weights.
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
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.func import functional_call

from trials.core.seeds import rng
from trials.folder import layout
from trials.folder.environment import environment
from trials.folder.record import LevelRecord
from trials.folder.store import TrialDir, state_of
from trials.loop.arithmetic import autocast_for, evaluate
from trials.loop.optim import PackedOptimizer
from trials.loop.stacked import Stacked, apart
from trials.loop.training import BatchOrder, Job
from trials.methods import pruning
from trials.nets import masks, models

GAIN = math.sqrt(2.0)  # Kaiming's gain for ReLU: std = GAIN / sqrt(fan_in)
CALIBRATION_BATCHES = 50  # training batches that set an untrained network's norm statistics


class Searcher:
    """An edge-popup trial as a level runner's member (trials/runner/levels.py run_pack): its
    folder, fixed weights and layers; job(i) -> level i's Search, finish() writes it, and
    untrained(i) is the random_prune control's level (see module doc)."""

    def __init__(self, spec, out: Path, data, device):
        self.spec, self.data, self.device, self.out = spec, data, device, Path(out)
        self.trial = TrialDir(out, spec)
        self.trial.begin()  # levels are independent searches: a missing one is redone alone
        net = fixed_network(spec, data.info, device)
        self.layers = masks.Layers.of(net)
        self.names = [self.layers.weight(n) for n in self.layers.names]
        self.fixed = state_of(net)  # every level starts here
        if not (self.trial.path / layout.REWIND).exists():
            self.trial.save_rewind(self.fixed)

    def weights(self, level: int) -> dict:
        """Level `level`'s fixed weights: scaled by 1/sqrt(k) where supermask.scaled says."""
        k = self.spec.supermask.densities[level]
        if not self.spec.supermask.scaled:
            return dict(self.fixed)
        return {n: v * (1 / math.sqrt(k)) if n in self.names else v for n, v in self.fixed.items()}

    def job(self, level: int) -> "Search":
        """Level `level`'s search: the initial scores (one draw per trial) over its fixed weights,
        SGD on the scores with train's loop settings (batch_size, iterations, eval_interval,
        precision) and supermask's rates."""
        s = self.spec.supermask
        scores = initial_scores(self.layers, s.score_init, rng(self.spec.seed, "scores"), self.device)
        state = {**{f"net.{n}": v for n, v in self.weights(level).items()},
                 **{f"scores.{j}": scores[w] for j, w in enumerate(self.names)}}
        t = dataclasses.replace(self.spec.train, optimizer="sgd", lr=s.lr, momentum=s.momentum,
                                weight_decay=s.weight_decay)
        return Search(t, self.spec.seed, state, s.densities[level], s.scope, schedule(s, t.iterations))

    def finish(self, level: int, job: "Search", result: dict, fields: Optional[dict] = None) -> LevelRecord:
        """Write the level: the supermask of the last iteration's scores, the fixed weights
        under it (zeros elsewhere, as IMP's) with the norm layers' running statistics."""
        final = result.pop("final")
        sizes = [final[f"scores.{j}"].abs() for j in range(len(self.names))]
        mask = {w: keep.cpu() for w, keep in zip(self.names, choose(sizes, self.layers, job.density, job.scope))}
        weights = {n[len("net."):]: v for n, v in final.items() if n.startswith("net.")}
        weights = {n: v * mask[n].to(v.device) if n in mask else v for n, v in weights.items()}
        record = LevelRecord(level=level, **masks.describe(mask, self.layers), **result, **(fields or {}))
        self.trial.finish(level, mask, weights, record)
        return record

    def untrained(self, level: int) -> LevelRecord:
        """The random_prune control's level: a random mask with the supermask's per-layer
        counts on the same fixed weights, evaluated without training."""
        started = time.perf_counter()
        k = self.spec.supermask.densities[level]
        net = fixed_network(self.spec, self.data.info, self.device)
        net.load_state_dict(self.weights(level))
        default = type(self.spec.prune)()  # edge-popup reads no prune.* field
        mask = pruning.prune(default, self.fixed, masks.ones(self.layers), self.layers,
                             strategy="random", targets=layer_counts(self.layers, k),
                             generator=rng(self.spec.seed, "random_prune", level))
        masks.Masker(net, mask).apply()
        result = {**evaluated(net, self.data, self.spec), "seconds": time.perf_counter() - started,
                  "environment": environment(self.device)}
        record = LevelRecord(level=level, **masks.describe(mask, self.layers), **result)
        self.trial.finish(level, mask, state_of(net), record)
        return record


class Search(Job):
    """A supermask level for the training loop (trials/loop/training.py train_members): what
    trains is a Supermask's scores (start_weights: its state dict, "net.*" the fixed
    weights and "scores.<j>" the initial scores), kept at `density` per layer or of all
    weights (`scope`); no weight mask."""

    def __init__(self, train, seed: int, state: dict, density: float, scope: str, schedule: Callable):
        super().__init__(train, seed, {}, state, 0, schedule=schedule)
        self.density, self.scope = density, scope


# ---------------------------------------------------------------- the network


class Supermask(nn.Module):
    """`net` with its prunable weights used through the top-k of learned scores; only the
    scores are parameters that train (net's own are frozen by fixed_network)."""

    def __init__(self, net: nn.Module, layers: masks.Layers, k: float, scope: str, scores: dict):
        super().__init__()
        self.net, self.layers, self.k, self.scope = net, layers, k, scope
        self.names = [layers.weight(n) for n in layers.names]
        self.scores = nn.ParameterList(nn.Parameter(scores[w].clone()) for w in self.names)

    def forward(self, x):
        sizes = [score.abs() for score in self.scores]
        keeps = choose([z.detach() for z in sizes], self.layers, self.k, self.scope)
        weights = {name: self.net.get_parameter(name) * _StraightThrough.apply(size, keep)
                   for name, size, keep in zip(self.names, sizes, keeps)}
        return functional_call(self.net, weights, (x,))

    def mask(self) -> dict:
        keeps = choose([score.detach().abs() for score in self.scores], self.layers, self.k, self.scope)
        return {name: keep.cpu() for name, keep in zip(self.names, keeps)}


def choose(sizes: list, layers: masks.Layers, k: float, scope: str) -> list[torch.Tensor]:
    """Per weight tensor, True where its |score| (`sizes`, in the layers' order) is in the
    top k of its layer (layerwise: layer_counts) or of all weights (global)."""
    flat = [z.flatten() for z in sizes]
    if scope == "global":
        total = max(1, round(k * sum(f.numel() for f in flat)))
        picks = _top(torch.cat(flat), total).split([f.numel() for f in flat])
    else:
        counts = layer_counts(layers, k)
        picks = [_top(f, counts[n]) for f, n in zip(flat, layers.names)]
    return [p.view_as(z) for p, z in zip(picks, sizes)]


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


# ---------------------------------------------------------------- packs of searches


class StackedSearch(Stacked):
    """Edge-popup's arithmetic for a pack of K searches (train_members): Stacked's loop
    arithmetic (its step, best-state keeping, evaluation) over other parameters: the
    members' fixed weights stacked and frozen (PackedNet), their scores [K, ...] in the
    stacked layers' layout, each member's top-k of its own |scores| at its own density and
    scope, SGD with momentum on each member's slices (PackedOptimizer). A member's numbers
    are close to its search alone, not bit for bit."""

    def __init__(self, template: nn.Module, k: int, device):
        super().__init__(template, k, device)
        self.pnet.net.requires_grad_(False)
        self.layers = masks.Layers.of(template)
        self.names = [self.layers.weight(n) for n in self.layers.names]
        self.net = _Searching(self)

    def begin(self, jobs: list) -> None:
        pnet = self.pnet
        self.scores = [nn.Parameter(torch.zeros_like(pnet.params[w])) for w in self.names]
        for m, job in enumerate(jobs):
            self.load(m, job.start_weights)
        self.rules = [(job.density, job.scope) for job in jobs]
        self.params, self.mask_params, self.mask_values = self.scores, [], []  # what Stacked.step steps
        self.opt = PackedOptimizer(self.scores, [job.train for job in jobs], apart(self.scores[0]))
        self.snapshot = self.scores + [pnet.tensors[n] for n in pnet.buffers]  # a member's best state
        self.best = [t.detach().clone() for t in self.snapshot]

    @torch.no_grad()
    def load(self, m: int, state: dict) -> None:
        """Member m's Supermask state dict ("net.*": fixed weights and buffers, "scores.<j>")."""
        self.pnet.load(m, {n[len("net."):]: v for n, v in state.items() if n.startswith("net.")})
        for j, (w, score) in enumerate(zip(self.names, self.scores)):
            mod, p = self.pnet.layers[w]
            score[m].copy_(mod.layout(p, state[f"scores.{j}"]))

    def keeps(self, sizes: list) -> list:
        """Per layer [K, ...]: each member's choose() of its own |scores| (`sizes`)."""
        picks = [torch.zeros_like(z, dtype=torch.bool) for z in sizes]
        for m, (density, scope) in enumerate(self.rules):
            for pick, keep in zip(picks, choose([z[m] for z in sizes], self.layers, density, scope)):
                pick[m] = keep
        return picks

    def forward(self, x):
        sizes = [score.abs() for score in self.scores]
        weights = {w: self.pnet.params[w] * _StraightThrough.apply(size, keep)
                   for w, size, keep in zip(self.names, sizes, self.keeps([z.detach() for z in sizes]))}
        return functional_call(self.pnet.net, weights, (x,))

    def start(self, m: int, iteration: int, job) -> None:
        """A fresh optimizer state (searches start at 0: begin() loaded the rest)."""
        self.opt.start(m, iteration)

    def member(self, m: int) -> dict:
        """Member m's Supermask state dict (as Alone(Supermask(...)) gives it)."""
        with torch.no_grad():
            state = {f"net.{n}": v for n, v in self.pnet.member(m).items()}
            for j, (w, score) in enumerate(zip(self.names, self.scores)):
                mod, p = self.pnet.layers[w]
                state[f"scores.{j}"] = mod.unlayout(p, score[m]).clone(memory_format=torch.contiguous_format)
        return state

    def fail(self, m: int, job) -> None:
        """A failed member goes back to its start (finite numbers; the others' evaluation runs it along)."""
        self.load(m, job.start_weights)


class _Searching(nn.Module):
    """StackedSearch's network for the loop and evaluate_packed: train()/eval() reach the
    stacked layers, a call is the masked forward."""

    def __init__(self, search: StackedSearch):
        super().__init__()
        self.stacked, self.search = search.pnet.net, [search]  # a list: no second registration

    def forward(self, x):
        return self.search[0].forward(x)


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


def initial_scores(layers: masks.Layers, init: str, g: torch.Generator, device) -> dict:
    """kaiming_uniform: U(+-1/sqrt(fan_in)) (torch's default layer init, a = sqrt 5, as the
    reference code); kaiming_normal: N(0, 2/fan_in). Drawn on the CPU: the same on every device."""
    out = {}
    for n in layers.names:
        w = torch.empty(layers.shapes[layers.weight(n)])
        if init == "kaiming_uniform":
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        else:
            nn.init.kaiming_normal_(w, generator=g)
        out[layers.weight(n)] = w.to(device)
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
