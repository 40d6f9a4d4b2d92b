"""Optimizers of the training loop, chosen for speed where the numbers stay what they were.

On CPU, torch.optim.Adam takes its single-tensor path, and ~40% of a LeNet-300-100 step
went to one op in it: `exp_avg_sq.sqrt()`. ATen hands sqrt to MKL (vsSqrt), which is
about 20x slower on elements that are exactly 0, and a pruned network's second moments
are mostly exactly 0 (its gradients are masked). `ExactAdam` runs torch's single-tensor
arithmetic op for op, the same ops on the same values, except that the square root is
taken over the nonzero elements only (sqrt(0) is 0 either way): the same bits, which
tests/test_golden.py checks. torch's foreach path gives the same bits too but is no
faster on CPU (a loop of the same kernels). ExactAdam is ~20% faster on pruned levels
and the same on dense ones; the fused kernel is 1.65x the default on a whole LeNet IMP
job but rounds differently (every golden case changes), so it is used on CUDA always (no
golden records there; `train.fused` changes CPU arithmetic only), in packs
(trials/packed.py) and on CPU only when asked for (`fused=True`).
"""
from __future__ import annotations

from typing import Optional

import torch


class ExactAdam(torch.optim.Adam):
    """torch.optim.Adam (coupled weight decay, no amsgrad), bit for bit its single-tensor CPU path."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay, foreach=False)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                # torch/optim/adam.py, _single_tensor_adam, capturable=False, amsgrad=False:
                step_t += 1
                grad = param.grad if wd == 0 else param.grad.add(param, alpha=wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = step_t.item()
                step_size = lr / (1 - beta1**step)
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                denom = (sqrt_skipping_zeros(exp_avg_sq) / bias_correction2_sqrt).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)


def sqrt_skipping_zeros(x: torch.Tensor) -> torch.Tensor:
    """x.sqrt(), bit for bit, without handing exact zeros to the (slow for them) sqrt kernel."""
    if bool(x.min() > 0):  # second moments are >= 0: no zeros, nothing to skip (a dense layer)
        return x.sqrt()
    zero = (x == 0).to(x.dtype)  # 1 where x is 0: x + 1 there, x + 0 = x (exactly) elsewhere
    return (x + zero).sqrt_().sub_(zero)


def make(t, params, device: torch.device, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """The optimizer of train spec `t`. fused=None: the spec's `train.fused` (default false:
    torch's default arithmetic, ExactAdam on CPU; SGD is torch's own); true: torch's fused
    kernels, faster, rounding differently (a different trial, hence part of the content key)."""
    fused = t.fused if fused is None else fused
    if t.optimizer == "adam":
        if device.type == "cuda":
            # always the fused kernel on CUDA, capturable, so the step can be a CUDA graph
            # (trials/training.py StepGraph): the packs' arithmetic (trials/packed.py), with the
            # bias corrections in the kernel. torch's capturable foreach path takes them in
            # float32 tensor ops (1 - 0.999 rounds to 1e-5 relative), and drifted 4e-4 from a
            # pack in 100 LeNet steps; the default, non-capturable one cannot be captured.
            return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True, capturable=True)
        if fused:
            return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
        return ExactAdam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                           **({"fused": True} if fused else {}))
