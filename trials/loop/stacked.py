"""Stacked layers: K networks of one architecture as one network of K-times-wider layers,
for packs (trials/runner/levels.py run_pack). Every nn.Linear / nn.Conv2d / nn.BatchNorm1d/2d becomes one
stacked layer over the K members: Linear weights [K, in, out], Conv2d weights [K, out, in,
kh, kw], BatchNorm over K*C channels (weight, bias, running_mean, running_var [K, C],
num_batches_tracked [K]). The batch stays the first dimension, K*B examples member after
member, so the model's own forward (flatten(1), ReLU, pooling, residual sums: per-example
ops) runs as it is.

On CUDA a stacked layer is one batched kernel (torch.baddbmm, a grouped convolution, one
batch norm over K*C channels): a pack's speed. On CPU each member's GEMM, convolution,
norm and loss runs on tensors of its own with the shapes and strides it has alone
(`apart`), so a member's bits never depend on its co-members (ARCHITECTURE.md,
"Numerics"). `Stacked` is the pack's arithmetic for the one training loop
(trials/loop/training.py train_members).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.loop.optim import PackedOptimizer
from trials.nets.datasets import EVAL_BATCH
from trials.nets.models import PACKABLE, why_not_packable


def apart(x: torch.Tensor) -> bool:
    """Whether a packed layer runs each member's kernel on its own tensors, with the shapes
    and strides it has alone (CPU), rather than one batched kernel over the pack (CUDA).
    On CPU a batched GEMM, a grouped convolution or a norm over K*C channels may take
    another code path for each K (MKL's batched GEMM did on an AVX-512 EPYC at some batch
    sizes), so a member's bits would depend on its co-members and a shared
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


PACKED = dict(zip(PACKABLE, (PackedLinear, PackedConv2d, PackedBatchNorm, PackedBatchNorm)))  # trials/nets/models.py


class PackedNet:
    """The model of K members: `net` (the model with stacked layers) and member <-> slice
    moves of its state (parameters and buffers: a member's state dict has exactly the keys
    of trials.folder.store.state_of of the model alone)."""

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


def member_losses(out: torch.Tensor, y: torch.Tensor, k: int, reduce: Callable) -> torch.Tensor:
    """[K]: `reduce` (torch.mean or torch.sum) of each member's cross-entropies, its
    examples being its part of the rows; on CPU each part on its own, as alone (`apart`)."""
    if apart(out):
        return torch.stack([reduce(F.cross_entropy(o, t, reduction="none")) for o, t in zip(out.chunk(k), y.chunk(k))])
    return reduce(F.cross_entropy(out, y, reduction="none").view(k, -1), 1)


@torch.no_grad()
def evaluate_packed(pnet, x, y, autocast) -> tuple[list, list]:
    """Per member (mean cross-entropy, accuracy) on the same examples; one sync. `pnet`: a
    PackedNet, or anything with its `net` (the K members' forward) and `k`."""
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


class Stacked:
    """The arithmetic of a pack of K members for train_members: the stacked network
    (PackedNet), each member's masks, its slices in PackedOptimizer (torch's fused kernels),
    its own cross-entropy. A member's numbers are close to its run Alone, not bit for bit
    (other kernels and the fused optimizer round differently)."""

    name = "stacked"

    def __init__(self, template: nn.Module, k: int, device):
        self.pnet, self.k = PackedNet(template, k, device), k
        self.net = self.pnet.net
        self.stopped: dict = {}  # member -> its state where its watch stopped it

    def begin(self, jobs: list) -> None:
        pnet = self.pnet
        for m, job in enumerate(jobs):
            pnet.load(m, job.start_weights)
        self.params = list(pnet.params.values())
        stacked = pnet.stack_masks([job.mask for job in jobs])
        self.mask_params, self.mask_values = [pnet.params[n] for n in stacked], list(stacked.values())
        self.apply_masks()
        self.opt = PackedOptimizer(self.params, [job.train for job in jobs], apart(self.params[0]))
        self.snapshot = list(pnet.tensors.values())  # a member's best state: parameters and running statistics
        self.best = [t.detach().clone() for t in self.snapshot]

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self.mask_params:
            torch._foreach_mul_(self.mask_params, self.mask_values)

    def start(self, m: int, iteration: int, job) -> None:
        """Member m starts: a fresh optimizer state, and its start state's running
        statistics (its forwards before its start moved them)."""
        self.opt.start(m, iteration)
        self.pnet.load_buffers(m, job.start_weights)

    def set_rates(self, members: list, lrs: list) -> None:
        """Nothing to do: the step hands each member's rate to the optimizer."""

    def step(self, x, y, members: list, lrs: list, autocast) -> torch.Tensor:
        with autocast():
            losses = member_losses(self.net(x), y, self.k, torch.mean)
        for p in self.params:
            p.grad = None
        losses.sum().backward()  # members are independent: each slice gets its own loss's gradient
        with torch.no_grad():
            if self.mask_params:
                torch._foreach_mul_([p.grad for p in self.mask_params], self.mask_values)
            self.opt.step(members, lrs)
        self.apply_masks()
        return losses.detach()

    def stop(self, m: int) -> None:
        """Member m stopped early: its state is kept, since the co-members' forwards still move
        its running statistics (the optimizer no longer steps it); `settle` puts it back."""
        self.stopped[m] = self.member(m)

    @torch.no_grad()
    def settle(self) -> None:
        for m, state in self.stopped.items():
            self.load(m, state)

    @torch.no_grad()
    def load(self, m: int, state: dict) -> None:
        self.pnet.load(m, state)

    def evaluate(self, x, y, autocast) -> tuple[list, list]:
        return evaluate_packed(self, x, y, autocast)

    def member(self, m: int) -> dict:
        return self.pnet.member(m)

    @torch.no_grad()
    def keep_best(self, m: int) -> None:
        for b, t in zip(self.best, self.snapshot):
            b[m].copy_(t[m])

    @torch.no_grad()
    def fail(self, m: int, job) -> None:
        """A failed member's slice is zeroed (it leaves the optimizer) and its running state
        reset to finite values (the others' evaluation runs it along)."""
        for p in self.params:
            p[m].zero_()
        self.pnet.load_buffers(m, job.start_weights)

    @torch.no_grad()
    def use_best(self) -> list:
        finals = [self.member(m) for m in range(self.k)]
        for b, t in zip(self.best, self.snapshot):
            t.copy_(b)
        return finals

    def end(self, finals: list) -> None:
        """Nothing to do: the stacked network is the loop's own."""
