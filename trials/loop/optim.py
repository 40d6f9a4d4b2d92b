"""Optimizers of the training loop, chosen for speed where the numbers stay what they were.

On CPU, torch.optim.Adam takes its single-tensor path, and much of a LeNet-300-100 step
went to one op in it: `exp_avg_sq.sqrt()`. ATen hands sqrt to MKL (vsSqrt), which is
much slower on elements that are exactly 0 (ARCHITECTURE.md, "Speed and packs", has the
profile), and a pruned network's second moments
are mostly exactly 0 (its gradients are masked). `ExactAdam` runs torch's single-tensor
arithmetic op for op, the same ops on the same values, except that the square root is
taken over the nonzero elements only (sqrt(0) is 0 either way), and each op runs once
for all parameters (torch's _foreach_ ops): the same bits, which tests/test_golden.py
checks, and faster (README, "Speed": `bench/trial_speed.py --mode optimizers`). torch's
foreach Adam gives the same bits too but no speed (its own square roots of zeros). The
fused kernel is faster still but rounds differently (every golden case changes), so it is used on CUDA always (no
golden records there; `train.fused` changes CPU arithmetic only), in packs
(trials/loop/stacked.py) and on CPU only when asked for (`fused=True`). On CPU none of these
is a torch.optim.Optimizer (`Light`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.optim.adam import adam as adam_step
from torch.optim.sgd import sgd as sgd_step


class Light:
    """What the training loop asks of an optimizer (`param_groups[0]["lr"]`, `zero_grad`,
    `step`), without torch.optim.Optimizer: its methods import torch._dynamo the first time
    one runs (torch._disable_dynamo), a cost every CPU process that trains would pay
    (ARCHITECTURE.md, "Speed and packs"). One group; the
    state per parameter in `state`."""

    def __init__(self, params, **group):
        self.params = list(params)
        self.param_groups = [{"params": self.params, **group}]
        self.state: dict = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    def _stepped(self) -> list:
        return [p for p in self.params if p.grad is not None]


class SGD(Light):
    """torch.optim.SGD's step (no nesterov, no dampening): the functional
    torch.optim.sgd.sgd it calls, with the same arguments, so the same bits (tested
    against the class)."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, fused: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.fused = True if fused else None  # None: torch's default choice, as the class's

    @torch.no_grad()
    def step(self) -> None:
        g, params = self.param_groups[0], self._stepped()
        buffers = [self.state.get(p) for p in params]
        sgd_step(params, [p.grad for p in params], buffers, has_sparse_grad=False, foreach=None, fused=self.fused,
                 grad_scale=None, found_inf=None, weight_decay=g["weight_decay"], momentum=g["momentum"],
                 lr=g["lr"], dampening=0.0, nesterov=False, maximize=False)
        if g["momentum"] != 0:
            self.state.update(zip(params, buffers))


class FusedAdam(Light):
    """torch.optim.Adam(fused=True)'s step on CPU: the functional torch.optim.adam.adam it
    calls, with the same arguments and state (a float32 step count per parameter), so the
    same bits (tested against the class)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self) -> None:
        g, params = self.param_groups[0], self._stepped()
        for p in params:
            if p not in self.state:
                self.state[p] = (torch.zeros((), dtype=torch.float32, device=p.device),
                                 torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros_like(p, memory_format=torch.preserve_format))
        steps, firsts, seconds = (list(x) for x in zip(*(self.state[p] for p in params))) if params else ([], [], [])
        adam_step(params, [p.grad for p in params], firsts, seconds, [], steps, foreach=None, capturable=False,
                  differentiable=False, fused=True, grad_scale=None, found_inf=None, has_complex=False, amsgrad=False,
                  beta1=0.9, beta2=0.999, lr=g["lr"], weight_decay=g["weight_decay"], eps=1e-8, maximize=False)


class ExactAdam(Light):
    """torch.optim.Adam (coupled weight decay, no amsgrad), bit for bit its single-tensor CPU
    path: the same ops on the same values, each over all parameters at once (torch's
    _foreach_ ops, on CPU a loop of the same kernels in C++), grouped by step count (torch
    keeps one per parameter)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay, eps=1e-8, betas=(0.9, 0.999))

    @torch.no_grad()
    def step(self):
        g = self.param_groups[0]
        lr, wd, eps, (beta1, beta2) = g["lr"], g["weight_decay"], g["eps"], g["betas"]
        by_step: dict = {}
        for param in self._stepped():
            state = self.state.setdefault(param, {})
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                             exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format))
            state["step"] += 1
            by_step.setdefault(state["step"], []).append((param, state["exp_avg"], state["exp_avg_sq"]))
        for step, group in by_step.items():
            params, exp_avgs, exp_avg_sqs = (list(x) for x in zip(*group))
            # torch/optim/adam.py, _single_tensor_adam, capturable=False, amsgrad=False, op for op:
            grads = [p.grad for p in params]
            if wd != 0:
                grads = torch._foreach_add(grads, params, alpha=wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            step_size = lr / (1 - beta1**step)  # torch: step_t.item() of a float32 count, exact
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            denoms = sqrts_skipping_zeros(exp_avg_sqs)
            torch._foreach_div_(denoms, bias_correction2_sqrt)
            torch._foreach_add_(denoms, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-step_size)


def sqrts_skipping_zeros(xs: list) -> list:
    """[x.sqrt() for x in xs] (second moments: >= 0), bit for bit, without handing exact zeros
    to the sqrt kernel: 1 - sign(x) is 1 where x is 0 and 0 elsewhere, so x + it is 1 there
    and x (exactly) elsewhere; its root minus it is 0 there and sqrt(x) elsewhere."""
    zeros = torch._foreach_neg(torch._foreach_sign(xs))
    torch._foreach_add_(zeros, 1.0)
    roots = torch._foreach_add(xs, zeros)
    torch._foreach_sqrt_(roots)
    torch._foreach_sub_(roots, zeros)
    return roots


def make(t, params, device: torch.device, fused: Optional[bool] = None):
    """The optimizer of train spec `t` (a Light one on CPU, torch's class on CUDA).
    fused=None: the spec's `train.fused` (default false: torch's default arithmetic,
    ExactAdam on CPU; SGD is torch's own); true: torch's fused kernels, faster, rounding
    differently (a different trial, hence part of the content key)."""
    fused = t.fused if fused is None else fused
    if t.optimizer == "adam":
        if device.type == "cuda":
            # always the fused kernel on CUDA, capturable, so the step can be a CUDA graph
            # (trials/loop/training.py StepGraph): the packs' arithmetic (trials/loop/stacked.py), with the
            # bias corrections in the kernel. torch's capturable foreach path takes them in
            # float32 tensor ops (1 - 0.999 rounds to 1e-5 relative), and drifted 4e-4 from a
            # pack in 100 LeNet steps; the default, non-capturable one cannot be captured.
            return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True, capturable=True)
        if fused:
            return FusedAdam(params, lr=t.lr, weight_decay=t.weight_decay)
        return ExactAdam(params, lr=t.lr, weight_decay=t.weight_decay)
    if device.type == "cuda":  # torch's class there: what the H200 checks ran (the Light ones are CPU-tested)
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                               **({"fused": True} if fused else {}))
    return SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=fused)


class PackedOptimizer:
    """Each member's fresh Adam/SGD (torch's fused kernels) over its slices of the stacked
    parameters. A member's state is reset when it starts (`start`); only started members
    are stepped."""

    def __init__(self, params: list, trains: list, apart: bool):
        self.params, self.trains, self.apart = params, trains, apart
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
            run = list(group) == list(range(group[0], group[-1] + 1)) and not self.apart
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
