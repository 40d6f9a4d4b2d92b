"""What the training loop computes with (ARCHITECTURE.md, "The engine"): the `Arithmetic`
protocol, and `Alone`, one network trained by itself (a single trial's default: the bits the
golden records hold); a pack's is trials/loop/stacked.py's Stacked. Also what every
arithmetic shares: the optimizer of a train spec, autocast and the CUDA numerics, evaluation.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.loop import optim
from trials.nets.datasets import EVAL_BATCH
from trials.nets.masks import Masker


def make_optimizer(t, params, fused: Optional[bool] = None):
    """Adam or SGD of train spec `t` (trials/loop/optim.py: on CPU the same numbers as torch's
    default path, faster; torch's fused kernels where `t.fused` or fused=True asks)."""
    params = list(params)
    return optim.make(t, params, params[0].device, fused)


def autocast_for(device: torch.device, precision: str) -> Callable:
    """A context factory: bf16 autocast of matmuls/convs when precision is "bf16", else none.
    On CUDA it first fixes the process's numerics (cuda_numerics)."""
    if device.type == "cuda":
        cuda_numerics()
    # no cast cache: a CUDA graph cannot capture one (the same casts, so the same numbers)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16",
                                  cache_enabled=False)


def cuda_numerics() -> None:
    """What `precision: fp32` and "the same seed gives the same numbers" mean on a GPU
    (ARCHITECTURE.md, "Numerics"): float32 convolutions and matmuls in IEEE float32, not
    TF32 (cuDNN's default on Ampere and later: 10 mantissa bits, ~1e-3 relative), and
    cuDNN's deterministic algorithms, chosen without benchmarking. Process-wide, as torch's
    flags are; every training and evaluation path sets them (through autocast_for)."""
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # torch < 2.9
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@torch.no_grad()
def evaluate(net, x, y, autocast) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode; one sync."""
    net.eval()
    loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    for i in range(0, len(x), EVAL_BATCH):
        with autocast():
            out = net(x[i : i + EVAL_BATCH])
        loss += F.cross_entropy(out.float(), y[i : i + EVAL_BATCH], reduction="sum")
        correct += (out.argmax(1) == y[i : i + EVAL_BATCH]).sum()
    net.train()
    return (loss / len(x)).item(), (correct / len(x)).item()


class Arithmetic(Protocol):
    """What train_members computes with, for K members (ARCHITECTURE.md, "The engine"):
    Alone (K = 1, a single trial's bits) or trials/loop/stacked.py Stacked (a pack). The class is
    the choice everywhere in the engine (run_pack, PackTrainer, Producer); `name` is how a
    sweep's Tune config names it (orchestrator/plan.py tune_config, ARITHMETICS)."""

    name: ClassVar[str]
    k: int
    net: nn.Module

    def begin(self, jobs: list) -> None: ...
    def start(self, m: int, iteration: int, job: "Job") -> None: ...
    def set_rates(self, members: list, lrs: list) -> None: ...
    def step(self, x, y, members: list, lrs: list, autocast) -> torch.Tensor: ...
    def evaluate(self, x, y, autocast) -> tuple[list, list]: ...
    def member(self, m: int) -> dict: ...
    def keep_best(self, m: int) -> None: ...
    def fail(self, m: int, job: "Job") -> None: ...
    def use_best(self) -> list: ...
    def end(self, finals: list) -> None: ...


class Alone:
    """The arithmetic of one network trained by itself (K = 1): the model as built, the
    optimizer of trials/loop/optim.py (`fused` as make_optimizer's), one cross-entropy. This is
    the default arithmetic of a trial, the one the golden records hold. A pack's is
    trials/loop/stacked.py's Stacked; train_members runs either (ARCHITECTURE.md, "The engine")."""

    name = "alone"
    k = 1

    def __init__(self, net, fused: Optional[bool] = None):
        self.net, self.fused, self.lr = net, fused, None

    def begin(self, jobs: list) -> None:
        job, = jobs
        if job.start_weights is not None:
            self.net.load_state_dict(job.start_weights)
        self.masker = Masker(self.net, job.mask)
        self.masker.apply()
        self.opt = make_optimizer(job.train, self.net.parameters(), self.fused)
        self.best = None

    def start(self, m: int, iteration: int, job: "Job") -> None:
        """Nothing to do: the optimizer is fresh and the network holds the start weights."""

    def set_rates(self, members: list, lrs: list) -> None:
        if lrs[0] != self.lr:
            for group in self.opt.param_groups:
                group["lr"] = lrs[0]
            self.lr = lrs[0]

    def step(self, x, y, members: list, lrs: list, autocast) -> torch.Tensor:
        with autocast():
            loss = F.cross_entropy(self.net(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.masker.mask_grads()
        self.opt.step()
        self.masker.apply()
        return loss.detach()

    def evaluate(self, x, y, autocast) -> tuple[list, list]:
        loss, acc = evaluate(self.net, x, y, autocast)
        return [loss], [acc]

    def member(self, m: int) -> dict:
        return snapshot(self.net, None)

    def keep_best(self, m: int) -> None:
        self.best = snapshot(self.net, self.best)

    def fail(self, m: int, job: "Job") -> None:
        """Nothing to undo: the loop stops with its only member."""

    def stop(self, m: int) -> None:
        """Nothing to keep: the loop stops with its only member."""

    def settle(self) -> None:
        """Nothing to put back (Stacked: stopped members' states)."""

    def use_best(self) -> list:
        """Each member's final state; the network then holds the best ones (early stopping)."""
        final = snapshot(self.net, None)
        self.net.load_state_dict(self.best)
        return [final]

    def end(self, finals: list) -> None:
        self.net.load_state_dict(finals[0])  # the caller's network ends with the final weights


def snapshot(net, into: Optional[dict]) -> dict:
    """A copy of the state dict, reusing `into`'s buffers when given."""
    state = net.state_dict()
    if into is None:
        return {k: v.detach().clone() for k, v in state.items()}
    for k, v in state.items():
        into[k].copy_(v)
    return into
