"""Training one level: a plain masked loop over tensor batches, positioned at any iteration.

Everything random in training (data order, augmentation) is a pure function of
(seed, iteration), so a level that starts at the rewind iteration k sees exactly the
batches and learning rates the dense run saw from k on, and a rerun sees the same numbers.
The only host-device syncs are at evaluation points (every `eval_interval` iterations).
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from trials import optim
from trials.masks import Masker

EVAL_BATCH = 1000  # examples per evaluation forward pass


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
    """A context factory: bf16 autocast of matmuls/convs when precision is "bf16", else none."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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

    net.train()
    for it in range(start_iteration, t.iterations):
        if it in hooks:
            hooks[it](net)
        lr = schedule(it) if schedule else learning_rate(t, it)
        if lr != lr_now:
            for group in opt.param_groups:
                group["lr"] = lr
            lr_now = lr
        idx = order(it)
        x = data.train_x[idx]
        if data.augment is not None:
            x = data.augment(x, rng(seed, "augment", it))
        with autocast():
            loss = F.cross_entropy(net(x), data.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        masker.mask_grads()
        opt.step()
        masker.apply()
        window_loss += loss.detach()
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
    }


def _snapshot(net, into: Optional[dict]) -> dict:
    """A copy of the state dict, reusing `into`'s buffers when given."""
    state = net.state_dict()
    if into is None:
        return {k: v.detach().clone() for k, v in state.items()}
    for k, v in state.items():
        into[k].copy_(v)
    return into
