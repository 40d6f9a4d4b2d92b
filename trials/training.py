"""Training one level: a plain masked loop over tensor batches, positioned at any iteration.

Everything random in training (data order, augmentation) is a pure function of
(seed, iteration), so a level that starts at the rewind iteration k sees exactly the
batches and learning rates the dense run saw from k on, and a rerun sees the same numbers.
The only host-device syncs are at evaluation points (every `eval_interval` iterations).
On CUDA the step is replayed as a CUDA graph while the learning rate holds (StepGraph).
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from trials import optim
from trials.environment import environment
from trials.masks import Masker

EVAL_BATCH = 1000  # examples per evaluation forward pass
CUDA_GRAPHS = True  # on CUDA, replay the step as a graph (StepGraph); False: every step eager


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def rng(seed: int, *parts) -> torch.Generator:
    """An independent CPU generator for one purpose, e.g. rng(seed, "order", epoch)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def learning_rate(t, iteration: int) -> float:
    """Linear warmup to t.lr over warmup_iterations, times gamma at each milestone passed."""
    warm = min(1.0, (iteration + 1) / t.warmup_iterations) if t.warmup_iterations else 1.0
    return t.lr * warm * t.gamma ** sum(iteration >= m for m in t.milestones)


class BatchOrder:
    """Batch indices for iteration t: epoch e is a fresh permutation drawn from (seed, e);
    the last partial batch of an epoch is dropped so every step has batch_size examples."""

    def __init__(self, n: int, batch_size: int, seed: int, device):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, iteration: int) -> torch.Tensor:
        epoch, step = divmod(iteration, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=rng(self.seed, "order", epoch)).to(self.device)
        return self._perm[step * self.batch_size : (step + 1) * self.batch_size]


def make_optimizer(t, params, fused: Optional[bool] = None):
    """Adam or SGD of train spec `t` (trials/optim.py: on CPU the same numbers as torch's
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


def train_level(net, mask, data, t, seed: int, start_iteration: int,
                on_iteration: Optional[dict] = None,
                progress: Optional[Callable[[int, int, float], None]] = None,
                schedule: Optional[Callable[[int], float]] = None, fused: Optional[bool] = None) -> dict:
    """Train `net` (already holding its starting weights) under `mask` from
    `start_iteration` to t.iterations. `on_iteration` maps an iteration count to a
    callback that receives the net after that many steps (level 0 keeps its rewind
    weights this way); `schedule` maps an iteration to its learning rate (default:
    learning_rate(t, .); edge-popup's scores use a cosine); `fused` as make_optimizer's.
    Returns the level's record;
    `net` ends with the final weights."""
    started = time.perf_counter()
    device = data.train_x.device
    masker = Masker(net, mask)
    masker.apply()
    opt = make_optimizer(t, net.parameters(), fused)
    order = BatchOrder(len(data.train_x), t.batch_size, seed, device)
    autocast = autocast_for(device, t.precision)
    hooks = on_iteration or {}
    best = {"val_loss": float("inf"), "iteration": start_iteration, "state": None}
    window_loss, window_steps, lr_now = torch.zeros((), device=device), 0, None
    lr_of = schedule or (lambda i: learning_rate(t, i))

    def step(x, y):
        with autocast():
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        masker.mask_grads()
        opt.step()
        masker.apply()
        window_loss.add_(loss.detach())

    graph = StepGraph(step) if device.type == "cuda" and CUDA_GRAPHS else None
    net.train()
    for it in range(start_iteration, t.iterations):
        if it in hooks:
            hooks[it](net)
        lr = lr_of(it)
        if lr != lr_now:
            for group in opt.param_groups:
                group["lr"] = lr
            lr_now = lr
            if graph is not None:
                graph.drop()  # it holds the old rate
        idx = order(it)
        x = data.train_x[idx]
        if data.augment is not None:
            x = data.augment(x, rng(seed, "augment", it))
        if graph is not None:
            graph(x, data.train_y[idx], lambda: steady(lr_of, it, t.iterations))
        else:
            step(x, data.train_y[idx])
        window_steps += 1

        done = it + 1
        if done % t.eval_interval == 0 or done == t.iterations:
            train_loss = (window_loss / window_steps).item()
            if train_loss != train_loss or abs(train_loss) == float("inf"):
                raise TrainingDiverged(f"training loss became {train_loss} at iteration {done}")
            window_loss.zero_()
            window_steps = 0
            val_loss, val_acc = evaluate(net, data.val_x, data.val_y, autocast)
            if val_loss < best["val_loss"]:
                best.update(val_loss=val_loss, iteration=done, state=_snapshot(net, best["state"]))
            if progress:
                progress(done, t.iterations, val_loss)

    # the loop always evaluated at the last iteration: val_loss/val_acc are the final ones
    _, test_acc = evaluate(net, data.test_x, data.test_y, autocast)
    final = _snapshot(net, None)
    net.load_state_dict(best["state"])
    _, test_acc_best = evaluate(net, data.test_x, data.test_y, autocast)
    net.load_state_dict(final)
    return {
        "test_acc": test_acc,
        "early_stop_iteration": best["iteration"],
        "test_acc_at_early_stop": test_acc_best,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "val_loss_at_early_stop": best["val_loss"],
        "train_loss": train_loss,
        "start_iteration": start_iteration,
        "iterations": t.iterations - start_iteration,
        "seconds": time.perf_counter() - started,
        "environment": environment(device),
    }


def steady(rates: Callable[[int], object], it: int, end: int) -> int:
    """How many steps from `it` on (at most StepGraph.RUN, none from `end`) run with the
    rates `rates(it)` gives (anything comparable: a pack's holds its members' starts too)."""
    now, most = rates(it), min(StepGraph.RUN, end - it)
    return next((j - it for j in range(it + 1, it + most) if rates(j) != now), most)


class StepGraph:
    """A training step `step(x, y)` on CUDA, captured once as a CUDA graph and replayed while
    the learning rate holds (ARCHITECTURE.md, "Numerics"): the same kernels on the same
    tensors, so the same bits as running it eagerly, without a launch per op (a LeNet-300-100
    step: 6.7-7.8x; Conv-2 1.6-1.7x; ResNet-20 1.2-1.4x on an H200, bench/cuda_options.py). The rate is a
    number inside the captured kernels: a new rate drops the graph, and a stretch shorter than
    RUN steps (a warmup ramp, a per-step schedule) runs eagerly. The first WARM steps run
    eagerly on a side stream (torch's advice before a capture: lazy state, such as the
    optimizer's moments, exists before it). The optimizer must be capturable (optim.make)."""

    RUN, WARM = 20, 3

    def __init__(self, step: Callable):
        self.step, self.graph, self.warm = step, None, 0
        self.x = self.y = None
        self.side = torch.cuda.Stream()

    def drop(self) -> None:
        self.graph = self.x = self.y = None

    def __call__(self, x, y, run: Callable[[], int]) -> None:
        """One step on batch (x, y); run() says for how many steps from this one the rate holds."""
        if self.graph is not None:
            self.x.copy_(x)
            self.y.copy_(y)
            self.graph.replay()
        elif self.warm < self.WARM or run() < self.RUN:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.step(x, y)
            torch.cuda.current_stream().wait_stream(self.side)
            self.warm += 1
        else:
            self.x, self.y = x.clone(), y.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records this step's kernels; runs none of them
                self.step(self.x, self.y)
            self.graph = graph
            graph.replay()


def _snapshot(net, into: Optional[dict]) -> dict:
    """A copy of the state dict, reusing `into`'s buffers when given."""
    state = net.state_dict()
    if into is None:
        return {k: v.detach().clone() for k, v in state.items()}
    for k, v in state.items():
        into[k].copy_(v)
    return into
