"""Packs: K IMP trials trained together in one process, each in its own trial folder.

Small networks leave a CPU (or GPU) mostly waiting on per-op overhead; K trials stacked
into one network of K-times-wider ops use it better. A pack's members share the model
architecture (`model.name`, `width`), the dataset, `train.batch_size`, `iterations`,
`eval_interval`, `precision`, `optimizer` and the device; everything else may differ:
seed (init, data order, augmentation), `model.init`, lr, momentum, weight decay and the
rest of the schedule, `prune.*`, `rewind_iteration`.

    network   every nn.Linear / nn.Conv2d / nn.BatchNorm1d/2d becomes one stacked layer
              over the K members: Linear weights [K, in, out] through torch.baddbmm, Conv2d
              weights [K, out, in, kh, kw] through one grouped convolution (groups = K),
              BatchNorm as one F.batch_norm over K*C channels (weight, bias, running_mean,
              running_var [K, C], num_batches_tracked [K]), so each member's channels get
              their own batch statistics and running averages: its own arithmetic, bit
              for bit on CPU (tested). The batch stays the first dimension, K*B examples
              member after member, so the model's own forward (flatten(1), ReLU, pooling,
              residual sums: per-example ops) runs as it is. (torch.func.vmap over
              functional_call was 1.3-4x slower per step on the 2-core CPU.)
    member    its own masks, its own batches (training.BatchOrder and rng of its seed,
              the exact indices it would see alone), learning-rate schedule, optimizer
              state, rewind point, early stopping (best validation loss snapshot, running
              statistics included), divergence check and trial folder (trials/store.py:
              the same files, with the same keys as state_of of the model alone, and
              LevelRecords as trials.lottery.run_lottery writes). BatchNorm parameters
              train in its optimizer with its weight decay, as alone; they are pruned only
              as a structured mask's companions, as alone.
    optimizer torch's fused Adam / SGD kernels over the members' slices, one call per
              group of members at the same (lr, weight decay, momentum, start iteration); on
              CPU each member's slice is a tensor of its own (PackedOptimizer._cut).
    rewind    members whose level starts at different iterations (rewind_iteration k)
              share one loop from the smallest k: a member computes, untouched by the
              optimizer, until its k, then starts with a fresh optimizer state and its
              start state's running statistics (its forwards before k moved them). Its
              batches before k are wasted work: packing equal k is cheapest.
    failure   a member whose training loss becomes NaN/inf fails alone (its slice is
              zeroed and leaves the optimizer); the others finish the level and go on.

Numbers: a packed member follows its single-trial run closely but not bit for bit
(batched matmuls and the fused optimizer round differently from the single path): the
tests require weights within 1e-5 (relative norm) after level 0 and accuracies within 0.5
points at every level. `seconds` in a member's record is the pack's wall clock for the level.
On CPU a member's numbers do not depend on its co-members, for every model: each member's
GEMMs, convolutions, norms, losses and optimizer steps run on tensors of its own, with the
shapes and strides it has alone (`apart`; tested on the ops themselves, not only on this
CPU's bits), so a unit trained by any pack, or alone as a pack of one, is the same unit. A
batched GEMM, a grouped convolution or a merged optimizer call had made them depend on
the pack on some CPUs (MKL's batched GEMM on an AVX-512 EPYC, ~1e-7 at some batch sizes;
grouped convolutions, ~1e-6 after a level). On CUDA the pack runs batched kernels (its
speed), and a member's last bits may depend on its pack there (not checked).
BatchNorm models (ResNet-20, VGG): the packed norm layer adds no rounding of its own, but
with ReLU (and max-pooling) such a model parts from any run that rounds differently, a
lone run with the fused optimizer as well as a pack: BatchNorm centres pre-activations on
the kink, a ~1e-7 difference flips some ReLU, and within ~20 iterations the weights
differ by ~1e-1 relative. So the whole-trial tests swap in GELU and average pooling
(tests/test_packed.py, fixture `smooth`): then a packed member's saved states stay within
2e-5 of alone (measured <= 1.03e-5; each tensor against its layer's weight norm: BatchNorm
shifts and conv biases ahead of a BatchNorm are too small to measure against themselves),
masks exact, accuracies within 0.5 points. With ReLU a packed ResNet-20/VGG member is a
correct run of its trial, not the lone run's numbers (nor is a lone run on another
machine). On CUDA (an H200) the packed BatchNorm, cuDNN over K*C channels, matches each
member alone per step, and whole smooth ResNet-20 trials as above (tests/test_cuda.py).

Shared units (`run_pack(..., units=store)`, trials/shared.py): every member's level L is
a work unit, as for a single trial (`shared.Trunk`): dense/<D> at level 0, the trunk's
level_XX after. Per level and unit (`Shared`): a published unit is copied into the
members' folders; one the store leases to this process is trained in the pack by one
member and published from its folder (a dense run keeping every rewind point the store
and the members ask for), the members needing the same unit copying it after (so seed 0
at two prune rates trains one dense run); one that another process holds is waited for
after the rest of the level has trained (`Units.obtain`: it helps elsewhere meanwhile, and
trains the member alone, through the same code, if that process died). Each member's
units.json is the ledger Trunk keeps. The unit log records `pack`: how many members
trained together, and `seconds`: the unit's share of their wall clock. A sweep with packs
keeps its units apart from unpacked sweeps' (orchestrator/sweeps/units.py units_root) and
trains every unit the pack way: one that a single trial must produce (a control's trunk,
a helper's unit, a rewind point) goes through `PackOfOne`, so on CPU a unit's numbers do
not depend on who trained it (tested).

Not packed (refused by check_pack with the reason): controls (reinit / random_prune
need their IMP trunk's masks level by level: run them as single trials), edge-popup,
retrain other than weight_rewind, instability copies, and models with parameters or
buffers in a module without a packed layer (LayerNorm, GroupNorm, SyncBatchNorm,
InstanceNorm with running statistics...), BatchNorm with momentum=None (a cumulative
average by each member's own count), or convolutions with non-zero or string padding.
Every registered model packs.
"""
from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.sgd import sgd as sgd_step

from trials import datasets, layout, masks, models, pruning, shared, training
from trials.environment import environment
from trials.errors import ConfigError
from trials.lottery import resolve_device
from trials.record import LevelRecord
from trials.store import TrialDir, load_tensors, save_tensors, state_of
from trials.training import (EVAL_BATCH, BatchOrder, StepGraph, TrainingDiverged, autocast_for, learning_rate, rng,
                             steady)

SHARED_TRAIN = ("optimizer", "batch_size", "iterations", "eval_interval", "precision")


class PackFailed(RuntimeError):
    """Members of a pack failed; the others finished. `errors`: member index -> exception."""

    def __init__(self, errors: dict, records: list):
        self.errors, self.records = errors, records
        super().__init__("; ".join(f"member {i}: {e}" for i, e in sorted(errors.items())))


# ---------------------------------------------------------------- stacked layers


def apart(x: torch.Tensor) -> bool:
    """Whether a packed layer runs each member's kernel on its own tensors, with the shapes
    and strides it has alone (CPU), rather than one batched kernel over the pack (CUDA).
    On CPU a batched GEMM, a grouped convolution or a norm over K*C channels may take
    another code path for each K (MKL's batched GEMM did on an AVX-512 EPYC: ~1e-7 at
    some batch sizes), so a member's bits would depend on its co-members and a shared
    unit's numbers on which pack claimed it (ARCHITECTURE.md, "Numerics")."""
    return x.device.type != "cuda"


class PackedLinear(nn.Module):
    """K nn.Linear layers: weight [K, in, out] (each member's weight transposed), bias [K, out]."""

    def __init__(self, like: nn.Linear, k: int):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.zeros(k, like.in_features, like.out_features))
        self.bias = nn.Parameter(torch.zeros(k, like.out_features)) if like.bias is not None else None

    def forward(self, x):
        if apart(x):
            ws, bs = self.weight.unbind(), [None] * self.k if self.bias is None else self.bias.unbind()
            return torch.cat([torch.mm(h, w) if b is None else torch.addmm(b, h, w)
                              for h, w, b in zip(x.chunk(self.k), ws, bs)])
        h = x.reshape(self.k, x.shape[0] // self.k, x.shape[1])
        out = torch.bmm(h, self.weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), h, self.weight)
        return out.reshape(x.shape[0], -1)

    @staticmethod
    def layout(name: str, member: torch.Tensor) -> torch.Tensor:
        """A member's tensor in its slice's layout (and back: the transpose is its own inverse)."""
        return member.t() if name == "weight" else member

    unlayout = layout


class PackedConv2d(nn.Module):
    """K nn.Conv2d layers as one grouped convolution: weight [K, out, in/groups, kh, kw], bias [K, out]."""

    def __init__(self, like: nn.Conv2d, k: int):
        super().__init__()
        if like.padding_mode != "zeros" or isinstance(like.padding, str):
            raise ValueError("packed convolutions need numeric zero padding")
        self.k, self.groups = k, like.groups
        self.stride, self.padding, self.dilation = like.stride, like.padding, like.dilation
        self.weight = nn.Parameter(torch.zeros(k, *like.weight.shape))
        self.bias = nn.Parameter(torch.zeros(k, like.out_channels)) if like.bias is not None else None

    def forward(self, x):
        if apart(x):
            bs = [None] * self.k if self.bias is None else self.bias.unbind()
            return torch.cat([F.conv2d(h, w, b, self.stride, self.padding, self.dilation, self.groups)
                              for h, w, b in zip(x.chunk(self.k), self.weight.unbind(), bs)])
        kb, c, h, w = x.shape
        b = kb // self.k
        grouped = x.reshape(self.k, b, c, h, w).transpose(0, 1).reshape(b, self.k * c, h, w)
        weight = self.weight.reshape(-1, *self.weight.shape[2:])
        bias = None if self.bias is None else self.bias.reshape(-1)
        out = F.conv2d(grouped, weight, bias, self.stride, self.padding, self.dilation, self.groups * self.k)
        return out.reshape(b, self.k, -1, *out.shape[2:]).transpose(0, 1).reshape(kb, -1, *out.shape[2:])

    @staticmethod
    def layout(name: str, member: torch.Tensor) -> torch.Tensor:
        return member

    unlayout = layout


class PackedBatchNorm(nn.Module):
    """K nn.BatchNorm1d/2d layers as one F.batch_norm over K*C channels: the members'
    examples [K*B, C, ...] are regrouped to [B, K*C, ...] (as PackedConv2d does), so each
    member's channels get their own batch statistics (training) or running averages
    (eval), exactly the per-channel arithmetic of the member alone. weight/bias/
    running_mean/running_var [K, C], num_batches_tracked [K] (a member's counter: members
    start their levels at their own iterations)."""

    def __init__(self, like: nn.modules.batchnorm._BatchNorm, k: int):
        super().__init__()
        if like.momentum is None:
            raise ValueError("packed BatchNorm needs a momentum (momentum=None averages by each member's own count)")
        self.k, self.eps, self.momentum, self.track = k, like.eps, like.momentum, like.track_running_stats
        c = like.num_features
        self.weight = nn.Parameter(torch.ones(k, c)) if like.affine else None
        self.bias = nn.Parameter(torch.zeros(k, c)) if like.affine else None
        if self.track:
            self.register_buffer("running_mean", torch.zeros(k, c))
            self.register_buffer("running_var", torch.ones(k, c))
            self.register_buffer("num_batches_tracked", torch.zeros(k, dtype=torch.long))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x):
        if self.training and self.track:
            self.num_batches_tracked.add_(1)  # as nn.BatchNorm: per training forward (every member's)
        train = self.training or not self.track
        if apart(x):  # views: batch_norm updates each member's running averages in place
            each = lambda t: [None] * self.k if t is None else t.unbind()  # noqa: E731
            return torch.cat([F.batch_norm(h, mean, var, w, b, train, self.momentum, self.eps)
                              for h, mean, var, w, b in zip(x.chunk(self.k), each(self.running_mean),
                                                            each(self.running_var), each(self.weight),
                                                            each(self.bias))])
        kb, c, rest = x.shape[0], x.shape[1], x.shape[2:]
        b = kb // self.k
        grouped = x.reshape(self.k, b, c, *rest).transpose(0, 1).reshape(b, self.k * c, *rest)
        flat = lambda t: None if t is None else t.view(-1)  # noqa: E731 - views: batch_norm updates the buffers
        out = F.batch_norm(grouped, flat(self.running_mean), flat(self.running_var), flat(self.weight),
                           flat(self.bias), train, self.momentum, self.eps)
        return out.reshape(b, self.k, c, *rest).transpose(0, 1).reshape(x.shape)

    @staticmethod
    def layout(name: str, member: torch.Tensor) -> torch.Tensor:
        return member

    unlayout = layout


PACKED = {nn.Linear: PackedLinear, nn.Conv2d: PackedConv2d,
          nn.BatchNorm1d: PackedBatchNorm, nn.BatchNorm2d: PackedBatchNorm}


def why_not_packable(net: nn.Module) -> Optional[str]:
    """None if every parameter and buffer of `net` sits in a module that has a packed layer
    (nn.Linear, nn.Conv2d with numeric zero padding, nn.BatchNorm1d/2d with a momentum)."""
    for name, module in net.named_modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if type(module) not in PACKED and own:
            what = "parameters" if any(True for _ in module.parameters(recurse=False)) else "buffers (running state)"
            return f"its {what} in {name} ({type(module).__name__}) have no packed layer"
        if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
            return f"{name} pads with {module.padding_mode!r} {module.padding!r}: packed convolutions need numbers"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
            return (f"{name} averages its running statistics cumulatively (momentum=None): by a count each "
                    "member keeps for itself, which the packed BatchNorm does not do")
    return None


class PackedNet:
    """The model of K members: `net` (the model with stacked layers) and member <-> slice
    moves of its state (parameters and buffers: a member's state dict has exactly the keys
    of trials.store.state_of of the model alone)."""

    def __init__(self, template: nn.Module, k: int, device):
        reason = why_not_packable(template)
        if reason:
            raise ValueError(reason)
        net = copy.deepcopy(template).to("cpu")
        self.layers = {}  # parameter name -> (packed module, "weight"/"bias")
        self.buffers = {}  # buffer name -> (packed module, its attribute)
        for name, module in list(template.named_modules()):
            if type(module) in PACKED:
                packed = PACKED[type(module)](module, k)
                net.set_submodule(name, packed)
                for into, named in ((self.layers, packed.named_parameters), (self.buffers, packed.named_buffers)):
                    for p, _ in named(recurse=False):
                        into[f"{name}.{p}" if name else p] = (packed, p)
        self.net, self.k = net.to(device), k
        self.params = dict(self.net.named_parameters())
        self.tensors = {**self.params, **dict(self.net.named_buffers())}
        self.state = {n: self.layers.get(n) or self.buffers[n] for n in template.state_dict()}  # its order
        assert set(self.params) == set(self.layers) and set(self.tensors) == set(self.state)

    def member(self, m: int) -> dict:
        """Member m's state dict (its own names and shapes, contiguous copies)."""
        with torch.no_grad():
            return {n: mod.unlayout(p, self.tensors[n][m]).clone(memory_format=torch.contiguous_format)
                    for n, (mod, p) in self.state.items()}

    @torch.no_grad()
    def load(self, m: int, state: dict) -> None:
        for n, (mod, p) in self.state.items():
            self.tensors[n][m].copy_(mod.layout(p, state[n]))

    @torch.no_grad()
    def load_buffers(self, m: int, state: dict) -> None:
        """Member m's running state (BatchNorm's averages and count) from `state`."""
        for n in self.buffers:
            self.tensors[n][m].copy_(state[n])

    def stack_masks(self, member_masks: list) -> dict:
        """name -> float tensor [K, ...] of the members' masks, for parameters some member
        prunes (a structured mask's norm-layer companions included; buffers never)."""
        out = {}
        for n, (mod, p) in self.layers.items():
            if any(n in mk and not bool(mk[n].all()) for mk in member_masks):
                param = self.params[n]
                out[n] = torch.stack([mod.layout(p, mk[n]) if n in mk else torch.ones(param.shape[1:], dtype=torch.bool)
                                      for mk in member_masks]).to(device=param.device, dtype=param.dtype)
        return out


# ---------------------------------------------------------------- the members' optimizer


class PackedOptimizer:
    """Each member's fresh Adam/SGD (torch's fused kernels) over its slices of the stacked
    parameters. A member's state is reset when it starts (`start`); only started members
    are stepped."""

    def __init__(self, params: list, trains: list):
        self.params, self.trains = params, trains
        self.adam = trains[0].optimizer == "adam"
        self.state = [torch.zeros_like(p) for p in params]  # SGD momentum / Adam first moment
        self.second = [torch.zeros_like(p) for p in params] if self.adam else None
        # members step together from their start on: those started at one iteration have one
        # step count, which lives on the device (Adam's kernel reads it; a graph of the step adds to it)
        self.started = [0] * len(trains)
        self.counts = [torch.zeros((), device=params[0].device) for _ in trains]
        self.cuts: dict = {}  # members stepped together -> (per parameter its slices, their state views)

    def _cut(self, group: tuple) -> tuple:
        """How `group`'s slices go to the kernel: on CPU each member's slice is a tensor of
        its own (torch's CPU kernels take a tensor's last elements, how many depends on the
        vector width, on a scalar path that rounds differently: a member inside a merged run
        would get numbers that depend on its co-members and on the CPU). On CUDA every
        element runs the same code, so a run of members goes in as one tensor."""
        if group not in self.cuts:
            run = list(group) == list(range(group[0], group[-1] + 1)) and not apart(self.params[0])
            at = [[slice(group[0], group[-1] + 1)] if run else list(group) for p in self.params]
            views = lambda tensors: [x[i] for x, ix in zip(tensors, at) for i in ix]  # noqa: E731
            self.cuts[group] = at, [views(t) for t in (self.params, self.state, self.second or [])]
        return self.cuts[group]

    def start(self, m: int, iteration: int) -> None:
        for s in self.state + (self.second or []):
            s[m].zero_()
        self.counts[m].zero_()
        self.started[m] = iteration

    @torch.no_grad()
    def step(self, members: list, lrs: list) -> None:
        groups: dict = {}
        for m in members:
            t = self.trains[m]
            groups.setdefault((lrs[m], t.weight_decay, t.momentum, self.started[m]), []).append(m)
        for (lr, wd, momentum, _), group in groups.items():
            at, (params, state, second) = self._cut(tuple(group))
            grads = [p.grad[i] for p, ix in zip(self.params, at) for i in ix]
            if self.adam:  # torch.optim.adam's fused call; the kernel only reads the step: one tensor serves all
                # (counted on the device: a host value would be a constant in a CUDA graph, and
                # torch.tensor(value, device=cuda) a copy that waits for the GPU every step)
                counts = [self.counts[m] for m in group]
                torch._foreach_add_(counts, 1.0)
                steps = [counts[0]] * len(params)
                torch._fused_adam_(params, grads, state, second, [], steps, lr=lr, beta1=0.9, beta2=0.999,
                                   weight_decay=wd, eps=1e-8, amsgrad=False, maximize=False)
            else:  # zero buffers: the first step's momentum*0 + grad is torch's clone of grad
                sgd_step(params, grads, state, fused=True, lr=lr, momentum=momentum,
                         weight_decay=wd, dampening=0.0, nesterov=False, maximize=False)


# ---------------------------------------------------------------- one level of K members


class Job:
    """One member's level: train `start_weights` under `mask` from iteration `start`;
    `hooks` maps an iteration to a callback that receives the member's state after that many steps."""

    def __init__(self, spec, mask: dict, start_weights: dict, start: int, hooks: Optional[dict] = None):
        self.spec, self.mask, self.start_weights, self.start = spec, mask, start_weights, start
        self.hooks = hooks or {}


def member_losses(out: torch.Tensor, y: torch.Tensor, k: int, reduce: Callable) -> torch.Tensor:
    """[K]: `reduce` (torch.mean or torch.sum) of each member's cross-entropies, its
    examples being its part of the rows; on CPU each part on its own, as alone (`apart`)."""
    if apart(out):
        return torch.stack([reduce(F.cross_entropy(o, t, reduction="none")) for o, t in zip(out.chunk(k), y.chunk(k))])
    return reduce(F.cross_entropy(out, y, reduction="none").view(k, -1), 1)


@torch.no_grad()
def evaluate_packed(pnet: PackedNet, x, y, autocast) -> tuple[list, list]:
    """Per member (mean cross-entropy, accuracy) on the same examples; one sync."""
    net, k = pnet.net, pnet.k
    net.eval()
    loss = torch.zeros(k, device=x.device)
    correct = torch.zeros(k, device=x.device)
    for i in range(0, len(x), EVAL_BATCH):
        xb, yb = x[i : i + EVAL_BATCH], y[i : i + EVAL_BATCH]
        with autocast():
            out = net(xb.unsqueeze(0).expand(k, *xb.shape).reshape(k * len(xb), *xb.shape[1:]))
        out = out.float().view(k, len(xb), -1)
        loss += member_losses(out.flatten(0, 1), yb.repeat(k), k, torch.sum)
        correct += (out.argmax(2) == yb).sum(1)
    net.train()
    return (loss / len(x)).tolist(), (correct / len(x)).tolist()


def train_packed_level(template: nn.Module, jobs: list, data, progress: Optional[Callable] = None) -> list:
    """Train the jobs' members together (see the module doc); returns, per job, the result
    dict of trials.training.train_level plus "final" (the member's final state), or the
    exception that ended that member."""
    started = time.perf_counter()
    t0 = jobs[0].spec.train  # the shared fields (check_pack)
    k, device = len(jobs), data.train_x.device
    pnet = PackedNet(template, k, device)
    for m, job in enumerate(jobs):
        pnet.load(m, job.start_weights)
    net, params = pnet.net, list(pnet.params.values())
    stacked = pnet.stack_masks([job.mask for job in jobs])
    mask_params = [pnet.params[n] for n in stacked]
    mask_values = list(stacked.values())
    apply_masks = lambda: torch._foreach_mul_(mask_params, mask_values) if mask_params else None  # noqa: E731
    with torch.no_grad():
        apply_masks()
    opt = PackedOptimizer(params, [job.spec.train for job in jobs])
    orders = [BatchOrder(len(data.train_x), t0.batch_size, job.spec.seed, device) for job in jobs]
    autocast = autocast_for(device, t0.precision)

    first = min(job.start for job in jobs)
    running = [False] * k  # started and not failed
    failed: dict = {}
    best = [{"val_loss": float("inf"), "iteration": job.start} for job in jobs]
    snapshot = list(pnet.tensors.values())  # a member's best state: parameters and running statistics
    best_state = [t.detach().clone() for t in snapshot]
    window_loss, window_steps = torch.zeros(k, device=device), [0] * k
    last = [{} for _ in jobs]

    def step(x, y):  # members and lrs: this iteration's (the loop's variables)
        with autocast():
            out = net(x)
            losses = member_losses(out, y, k, torch.mean)
        for p in params:
            p.grad = None
        losses.sum().backward()  # members are independent: each slice gets its own loss's gradient
        with torch.no_grad():
            if mask_params:
                torch._foreach_mul_([p.grad for p in mask_params], mask_values)
            opt.step(members, lrs)
            apply_masks()
        window_loss.add_(losses.detach())

    def rates(j: int) -> tuple:  # what the step's graph depends on: who has started, at which rate
        return tuple(j >= job.start for job in jobs), tuple(learning_rate(job.spec.train, j) for job in jobs)

    graph = StepGraph(step) if device.type == "cuda" and training.CUDA_GRAPHS else None
    graph_key = None
    net.train()
    for it in range(first, t0.iterations):
        for m, job in enumerate(jobs):
            if job.start == it and m not in failed:
                running[m] = True
                opt.start(m, it)
                pnet.load_buffers(m, job.start_weights)  # its forwards before its start moved them
                window_loss[m] = 0.0
            if running[m] and it in job.hooks:
                job.hooks[it](pnet.member(m))
        members = [m for m in range(k) if running[m]]
        lrs = [learning_rate(job.spec.train, it) for job in jobs]
        idx = torch.stack([order(it) for order in orders])  # [K, B]: each member's own batch
        x = data.train_x[idx.flatten()]
        if data.augment is not None:
            x = torch.cat([data.augment(part, rng(job.spec.seed, "augment", it))
                           for part, job in zip(x.chunk(k), jobs)])
        y = data.train_y[idx.flatten()]
        if graph is None:
            step(x, y)
        else:  # a graph of the step holds while the members and their rates do (training.StepGraph)
            if (tuple(members), tuple(lrs)) != graph_key:
                graph.drop()
                graph_key = (tuple(members), tuple(lrs))
            graph(x, y, lambda: steady(rates, it, t0.iterations))
        for m in members:
            window_steps[m] += 1

        done = it + 1
        if done % t0.eval_interval == 0 or done == t0.iterations:
            if not members:
                continue
            train_loss = (window_loss / torch.tensor([max(s, 1) for s in window_steps], device=device)).tolist()
            for m in members:
                if not math.isfinite(train_loss[m]):
                    failed[m] = TrainingDiverged(f"training loss became {train_loss[m]} at iteration {done}")
                    running[m] = False
                    with torch.no_grad():
                        for p in params:
                            p[m].zero_()
                    pnet.load_buffers(m, jobs[m].start_weights)  # finite running state (eval of the others)
            members = [m for m in members if running[m]]
            window_loss.zero_()
            window_steps = [0] * k
            val_loss, val_acc = evaluate_packed(pnet, data.val_x, data.val_y, autocast)
            for m in members:
                last[m] = {"val_loss": val_loss[m], "val_acc": val_acc[m], "train_loss": train_loss[m]}
                if val_loss[m] < best[m]["val_loss"]:
                    best[m].update(val_loss=val_loss[m], iteration=done)
                    with torch.no_grad():
                        for b, t in zip(best_state, snapshot):
                            b[m].copy_(t[m])
                if progress:
                    progress(m, done, t0.iterations, val_loss[m])

    _, test_acc = evaluate_packed(pnet, data.test_x, data.test_y, autocast)
    finals = [pnet.member(m) for m in range(k)]
    with torch.no_grad():
        for b, t in zip(best_state, snapshot):
            t.copy_(b)
    _, test_acc_best = evaluate_packed(pnet, data.test_x, data.test_y, autocast)
    seconds = time.perf_counter() - started
    env = environment(device)
    results = []
    for m, job in enumerate(jobs):
        if m in failed:
            results.append(failed[m])
            continue
        results.append({
            "test_acc": test_acc[m],
            "early_stop_iteration": best[m]["iteration"],
            "test_acc_at_early_stop": test_acc_best[m],
            "val_loss": last[m]["val_loss"],
            "val_acc": last[m]["val_acc"],
            "val_loss_at_early_stop": best[m]["val_loss"],
            "train_loss": last[m]["train_loss"],
            "start_iteration": job.start,
            "iterations": t0.iterations - job.start,
            "seconds": seconds,
            "environment": env,
            "final": finals[m],
        })
    return results


# ---------------------------------------------------------------- whole trials


def check_pack(specs: list, outs: list) -> None:
    """Refuse a pack that cannot train together, before anything is written."""
    if not specs or len(specs) != len(outs):
        raise ConfigError("pack", len(specs), f"allowed: one or more specs, one folder each (got {len(outs)} folders)")
    if len({str(Path(o).resolve()) for o in outs}) != len(outs):
        raise ConfigError("pack", [str(o) for o in outs], "allowed: a distinct folder per member")
    first = specs[0]
    for i, s in enumerate(specs):
        if s.method != "imp":
            raise ConfigError("method", s.method, "allowed in a pack: imp (edge-popup trials run one per process)")
        if s.control != "none":
            raise ConfigError("control", s.control, "allowed in a pack: none (a control trains at its IMP "
                              "trunk's masks level by level: run controls as single trials)")
        # fields other sessions are adding (read with getattr: absent in older specs)
        if getattr(s, "retrain", "weight_rewind") != "weight_rewind":
            raise ConfigError("retrain", s.retrain, "allowed in a pack: weight_rewind (lr_rewind and "
                              "finetune start levels from level L-1's weights: not packed yet)")
        if getattr(getattr(s, "stability", None), "copies", 0):
            raise ConfigError("stability.copies", s.stability.copies, "allowed in a pack: 0 (instability "
                              "copies train beside a level: run such trials one per process)")
        for path, a, b in (("model.name", s.model.name, first.model.name), ("model.width", s.model.width, first.model.width),
                           ("dataset", s.dataset, first.dataset), ("device", s.device, first.device),
                           *((f"train.{f}", getattr(s.train, f), getattr(first.train, f)) for f in SHARED_TRAIN)):
            if a != b:
                raise ConfigError(path, a, f"allowed in this pack: {b!r} (member 0's); a pack's members share "
                                  "model architecture, dataset, device and train." + "/".join(SHARED_TRAIN))
    template = models.shell(first.model.name, datasets.info(first.dataset).shape,
                            datasets.info(first.dataset).num_classes, first.model.width)
    reason = why_not_packable(template)
    if reason:
        raise ConfigError("model.name", first.model.name, f"not packable: {reason}")


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
    return (spec.model.name, spec.model.width, spec.dataset, spec.device,
            *(getattr(spec.train, f) for f in SHARED_TRAIN))


class Member:
    """One trial of a pack: its folder, init and layers; job(L) -> the Job of its level L."""

    def __init__(self, spec, out: Path, data, device):
        self.spec, self.device, self.out = spec, device, Path(out)
        self.trial = TrialDir(out, spec)
        self.trial.begin()
        self.trial.reopen_from(self.trial.first_missing(spec.prune.levels))
        net = models.build(spec.model, data.info, seed=spec.seed, device=device)
        self.init, self.layers = state_of(net), masks.Layers.of(net)

    def job(self, level: int, keep: Optional[dict] = None) -> Job:
        """As trials.lottery.Lottery.level: level 0 from init keeping the rewind point at k
        (and handing the iterations in `keep` to their callbacks, as Lottery.train_dense);
        level L prunes L-1's final weights and restarts the survivors from the rewind point."""
        k = self.spec.rewind_iteration
        if level == 0:
            hooks = {**(keep or {}), k: self.trial.save_rewind}
            if keep and k in keep:
                hooks[k] = lambda state: (keep[k](state), self.trial.save_rewind(state))
            return Job(self.spec, masks.ones(self.layers), self.init, 0, hooks)
        mask = pruning.prune(self.spec.prune, self.trial.final(level - 1), self.trial.mask(level - 1), self.layers)
        return Job(self.spec, mask, self.trial.rewind(self.device), k)

    def finish(self, level: int, job: Job, result: dict) -> LevelRecord:
        final = result.pop("final")
        record = LevelRecord(level=level, **masks.describe(job.mask, self.layers), **result)
        self.trial.finish(level, job.mask, final, record)
        return record


class Shared:
    """A pack's levels as shared work units (module doc): per unit its members need, taken
    when published; trained in the pack by one of them when the lease is ours; waited for
    (the store helps elsewhere meanwhile) after the rest when another process holds it."""

    def __init__(self, units, members: list, train: Callable, data, stage: Path):
        """`train(work, level)`: the pack's training of jobs {member: Job}; `stage`: a scratch
        folder for dense runs' rewind points until their unit is published."""
        self.units, self.members, self.train, self.data, self.stage = units, members, train, data, stage

    def level(self, todo: list, level: int) -> dict:
        """Level `level` of members `todo`: member -> its record, or the exception that ended it."""
        needs: dict = {}
        for i in todo:
            spec = self.members[i].spec
            needs.setdefault(shared.level_name(spec, level) if level else shared.dense_name(spec), []).append(i)
        out, work, held = {}, {}, []
        for name, group in needs.items():  # one member trains a unit; the others take it after
            verdict, folder = self.units.claim(name)
            if verdict == "published":
                out.update(self.take(group, level, folder))
            elif verdict == "held":
                held.append((name, group))
            else:
                work[group[0]] = (name, group, self.job(name, group, level))
        trained = self.train({i: job for i, (_, _, job) in work.items()}, level) if work else {}
        for i, result in trained.items():
            name, group, _ = work[i]
            out.update(self.publish(name, group, level, result, len(work)))
        for name, group in held:
            out.update(self.wait(name, group, level))
        return out

    def job(self, name: str, group: list, level: int) -> Job:
        """group[0]'s job; a dense run keeps every rewind point the store and the group ask for."""
        if level:
            return self.members[group[0]].job(level)
        points = self.units.points(name) | {self.members[i].spec.rewind_iteration for i in group}
        return self.members[group[0]].job(0, keepers(self.stage / str(group[0]), points))

    def publish(self, name: str, group: list, level: int, result, pack: int) -> dict:
        """Publish the unit group[0] trained in a pack of `pack` (its failure: release the
        lease, and the group fails with it: the same work would fail the same way)."""
        def files(dest: Path) -> None:
            if isinstance(result, BaseException):
                raise result
            self.hand_over(group[0], level, dest)

        try:
            folder = self.units.publish(name, files, pack, None if isinstance(result, BaseException)
                                        else result.seconds / pack)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is the member's own failure
            if e is not result:
                raise
            return {i: result for i in group}
        shared.note(self.members[group[0]].out / layout.UNITS, self.members[group[0]].spec, level, True)
        return {group[0]: result, **self.take(group[1:], level, folder)}

    def wait(self, name: str, group: list, level: int) -> dict:
        """A unit another process holds: blocks (helping elsewhere); if that process died, the
        lease passes to us and group[0] trains it here alone."""
        first = group[0]

        def alone(dest: Path) -> None:
            result = self.train({first: self.job(name, group, level)}, level)[first]
            if isinstance(result, BaseException):
                raise result
            self.hand_over(first, level, dest)

        try:
            folder, mine = self.units.obtain(name, alone)
        except TrainingDiverged as e:
            return {i: e for i in group}
        if not mine:
            return self.take(group, level, folder)
        shared.note(self.members[first].out / layout.UNITS, self.members[first].spec, level, True)
        return {first: self.members[first].trial.record(level), **self.take(group[1:], level, folder)}

    def hand_over(self, i: int, level: int, dest: Path) -> None:
        shared.hand_over(self.members[i].trial, level, dest)
        if level == 0:
            shutil.move(self.stage / str(i), dest / shared.POINTS)

    def take(self, group: list, level: int, folder: Path) -> dict:
        """Copy a published unit into members' folders, as trials.shared.Trunk does."""
        out = {}
        for i in group:
            m, record = self.members[i], shared.unit_record(folder)
            if level == 0:
                m.trial.save_rewind(shared.point(m.spec, folder, self.units, self.data, m.device, PACK_OF_ONE))
                m.trial.finish(0, masks.ones(m.layers), load_tensors(folder / layout.FINAL), record)
            else:
                m.trial.copy_level_from(folder, level, record)
            shared.note(m.out / layout.UNITS, m.spec, level, False)
            out[i] = record
        return out


class PackOfOne(shared.Trainer):
    """shared.Trainer of a sweep with packs: a unit that one trial must produce alone (a
    control's trunk, a helper's unit, a point, a dense run) is trained as a pack of one,
    so it has the numbers a pack gives it (module doc: for Linear models on CPU, whatever
    the pack). Units of trials that cannot be packed are trained as alone: no pack makes them."""

    def level(self, spec, out: Path, level: int, data, device, progress=None) -> None:
        if pack_key(spec) is None:
            return super().level(spec, out, level, data, device, progress)
        _alone(Member(spec, out, data, device), level, data)

    def dense(self, spec, dest: Path, data, device, points: set, progress=None) -> None:
        spec = spec.replace(control="none")
        if pack_key(spec) is None:
            return super().dense(spec, dest, data, device, points, progress)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            member = Member(spec, Path(tmp) / "trial", data, device)
            _alone(member, 0, data, keepers(dest / shared.POINTS, points))
            shared.hand_over(member.trial, 0, dest)

    def point(self, spec, k: int, dest: Path, data, device) -> None:
        spec = spec.replace(control="none")
        if pack_key(spec) is None:
            return super().point(spec, k, dest, data, device)
        dest.mkdir(parents=True, exist_ok=True)

        def stop(state):
            save_tensors(dest / f"{k}{layout.TENSOR_SUFFIX}", state)
            raise shared.Stop

        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                _alone(Member(spec, Path(tmp) / "trial", data, device), 0, data, {k: stop})
            except shared.Stop:
                return
        raise RuntimeError(f"the dense run never reached iteration {k}")  # validate() bounds k


def keepers(folder: Path, points: set) -> dict:
    """Job hooks that save a dense run's weights at each rewind point in `points` to
    folder/<k>.safetensors (a dense unit's points/)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {k: (lambda state, k=k: save_tensors(folder / f"{k}{layout.TENSOR_SUFFIX}", state)) for k in sorted(points)}


def _alone(member: Member, level: int, data, keep: Optional[dict] = None) -> LevelRecord:
    """Train and write one member's level as a pack of one."""
    template = models.build(member.spec.model, data.info, seed=0, device="cpu")
    job = member.job(level, keep)
    result = train_packed_level(template, [job], data)[0]
    if isinstance(result, BaseException):
        raise result
    return member.finish(level, job, result)


PACK_OF_ONE = PackOfOne()


def run_pack(specs: list, outs: list, report: Callable = lambda record, out: None,
             progress: Optional[Callable] = None, data=None, errors: Optional[dict] = None,
             units: Optional[shared.Units] = None, after_level: Optional[Callable] = None) -> list:
    """Run (or resume) the IMP trials `specs` together, member i in folder outs[i]; returns
    each member's level records, as trials.lottery.run_lottery would for it alone.
    `report(record, out)` after every member's level (True ends that member, as in
    run_lottery); `progress(member, level, iteration, total, val_loss)`. A member that
    fails (divergence) stops alone: its exception goes into `errors` (index -> exception)
    when given, else PackFailed is raised once the others have finished.
    `units` (a trials.shared.Units store): every member's levels are shared work units, as
    trials.shared.Trunk shares a single trial's (Shared). `after_level(level)`: once per
    level that some member still ran (trained, took from a unit, or read back done),
    after that level's `report` calls."""
    check_pack(specs, outs)
    device = data.train_x.device if data is not None else resolve_device(specs[0].device)
    if data is None:
        data = datasets.load(specs[0].dataset, device, specs[0].train.batch_size)
    for spec, out in zip(specs, outs):
        TrialDir(out, spec).check()
    members = [Member(spec, out, data, device) for spec, out in zip(specs, outs)]
    template = models.build(specs[0].model, data.info, seed=0, device="cpu")

    def train(work: dict, level: int) -> dict:
        """Train jobs {member: Job} together and write their levels: member -> record or exception."""
        tell = (lambda m, it, total, val: progress(list(work)[m], level, it, total, val)) if progress else None
        results = train_packed_level(template, list(work.values()), data, tell)
        return {i: r if isinstance(r, BaseException) else members[i].finish(level, job, r)
                for (i, job), r in zip(work.items(), results)}

    records: list = [[] for _ in specs]
    failures: dict = {}
    alive = list(range(len(specs)))
    with tempfile.TemporaryDirectory(prefix="lth-pack-") as stage:  # used with units only (Shared)
        sharing = Shared(units, members, train, data, Path(stage)) if units is not None else None
        for level in range(max(s.last_level for s in specs) + 1):
            alive = [i for i in alive if level <= specs[i].last_level]
            if not alive:
                break
            todo = []
            for i in alive:
                if members[i].trial.done(level):
                    records[i].append(members[i].trial.record(level))
                else:
                    todo.append(i)
            if sharing:
                done = sharing.level(todo, level)
            else:
                done = train({i: members[i].job(level) for i in todo}, level) if todo else {}
            for i, result in done.items():
                if isinstance(result, BaseException):
                    failures[i] = result
                else:
                    records[i].append(result)
            stopped = set(failures)
            for i in alive:
                if (i not in failures and records[i] and records[i][-1].level == level
                        and report(records[i][-1], outs[i])):
                    stopped.add(i)
            alive = [i for i in alive if i not in stopped]
            if after_level:
                after_level(level)
    if failures and errors is None:
        raise PackFailed(failures, records)
    if errors is not None:
        errors.update(failures)
    return records
