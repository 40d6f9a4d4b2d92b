"""Training one level: a plain masked loop over tensor batches, positioned at any iteration.

Everything random in training (data order, augmentation) is a pure function of
(seed, iteration), so a level that starts at the rewind iteration k sees exactly the
batches and learning rates the dense run saw from k on, and a rerun sees the same numbers.
The only host-device syncs are at evaluation points (every `eval_interval` iterations).
On CUDA the step is replayed as a CUDA graph while the learning rate holds (StepGraph).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from trials.core.seeds import rng
from trials.folder.environment import environment
from trials.loop.arithmetic import Alone, Arithmetic, autocast_for

CUDA_GRAPHS = True  # on CUDA, replay the step as a graph (StepGraph); False: every step eager


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


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


class Job:
    """One member's level for the loop: train `start_weights` (None: as the network holds
    them) under `mask` from iteration `start` with train spec `train`, the data order and
    augmentation of `seed`, and the learning rate `schedule(iteration)` (default: the
    spec's, learning_rate). `hooks` maps an iteration to a callback that receives the
    member's state dict after that many steps. `watch` (trials/methods/early_bird_watch.py Watch: `every`,
    and a call (iteration, state) -> bool) is asked every `every` iterations after the start,
    after the hooks; True stops the member there: its level ends with the weights of that
    iteration, the prefix of the run it would have trained in full."""

    def __init__(self, train, seed: int, mask: dict, start_weights: Optional[dict], start: int,
                 hooks: Optional[dict] = None, schedule: Optional[Callable[[int], float]] = None,
                 watch=None):
        self.train, self.seed, self.mask, self.start_weights, self.start = train, seed, mask, start_weights, start
        self.hooks, self.watch = hooks or {}, watch
        self.schedule = schedule or (lambda iteration: learning_rate(train, iteration))

    def watched(self, iteration: int) -> bool:
        """Whether the watch looks at this iteration (every `every` steps after the start)."""
        return (self.watch is not None and iteration > self.start
                and (iteration - self.start) % self.watch.every == 0)


def train_members(jobs: list, data, arithmetic: Arithmetic, progress: Optional[Callable] = None) -> list:
    """The training loop, once for every trial: K >= 1 members' levels (Jobs) from the
    smallest start on, each with its own batches (BatchOrder and augmentation of its seed),
    learning rates, start iteration (before it a member's network is carried along
    untouched), rewind-point hooks, divergence check and early stopping, under
    `arithmetic`: Alone (K = 1, the default bits) or trials/loop/stacked.py's Stacked (a pack).
    Returns per job the level's result (the fields of a LevelRecord after the masks', plus
    "final": the member's final state), or the exception that ended that member.
    `progress(member, iteration, total, val_loss)` at every evaluation."""
    started = time.perf_counter()
    t0 = jobs[0].train  # the fields members share (trials/spec/packing.py check_pack)
    k, device = len(jobs), data.train_x.device
    arithmetic.begin(jobs)
    orders = [BatchOrder(len(data.train_x), t0.batch_size, job.seed, device) for job in jobs]
    autocast = autocast_for(device, t0.precision)
    running = [False] * k  # started and not failed or stopped
    failed: dict = {}
    end = [t0.iterations] * k  # where each member's level ends (earlier: its watch stopped it)
    best = [{"val_loss": float("inf"), "iteration": job.start} for job in jobs]
    window_loss, window_steps = torch.zeros(k, device=device), [0] * k
    last: list = [{} for _ in jobs]
    now = {"members": [], "lrs": []}  # this iteration's, read by the step (and by a graph's capture)

    def step(x, y):
        window_loss.add_(arithmetic.step(x, y, now["members"], now["lrs"], autocast))

    def rates(j: int) -> tuple:  # what a graph of the step depends on: who has started, at which rate
        return tuple(j >= job.start for job in jobs), tuple(job.schedule(j) for job in jobs)

    def validate(evaluated: list, it: int, train_loss: list) -> None:
        """Members `evaluated` validated after `it` steps: their last numbers, their best
        state so far (early stopping) and the progress callback."""
        val_loss, val_acc = arithmetic.evaluate(data.val_x, data.val_y, autocast)
        for m in evaluated:
            last[m] = {"val_loss": val_loss[m], "val_acc": val_acc[m], "train_loss": train_loss[m]}
            if val_loss[m] < best[m]["val_loss"]:
                best[m].update(val_loss=val_loss[m], iteration=it)
                arithmetic.keep_best(m)
            if progress:
                progress(m, it, t0.iterations, val_loss[m])

    def ended(stops: list, it: int) -> None:
        """Members whose watch stopped them after `it` steps: their last validation (unless `it`
        was an evaluation point, just measured), then their state is kept as it is."""
        if it % t0.eval_interval:
            train_loss = (window_loss / torch.tensor([max(s, 1) for s in window_steps], device=device)).tolist()
            validate(stops, it, train_loss)
        for m in stops:
            running[m] = False
            arithmetic.stop(m)

    graph = StepGraph(step) if device.type == "cuda" and CUDA_GRAPHS else None
    graph_key = None
    arithmetic.net.train()
    for it in range(min(job.start for job in jobs), t0.iterations):
        for m, job in enumerate(jobs):
            if job.start == it and m not in failed:
                running[m] = True
                arithmetic.start(m, it, job)
                window_loss[m] = 0.0
            if running[m] and it in job.hooks:
                job.hooks[it](arithmetic.member(m))
            if running[m] and job.watched(it) and job.watch(it, arithmetic.member(m)):
                end[m] = it
        stops = [m for m in range(k) if running[m] and end[m] == it]
        if stops:
            ended(stops, it)
        if not any(running) and all(job.start <= it or m in failed for m, job in enumerate(jobs)):
            break  # every member stopped early or failed: nothing more to train
        members = [m for m in range(k) if running[m]]
        lrs = [job.schedule(it) for job in jobs]
        arithmetic.set_rates(members, lrs)
        now.update(members=members, lrs=lrs)
        x, y = batch(data, jobs, orders, it)
        if graph is None:
            step(x, y)
        else:  # a graph of the step holds while the members and their rates do (StepGraph)
            if (tuple(members), tuple(lrs)) != graph_key:
                graph.drop()
                graph_key = (tuple(members), tuple(lrs))
            graph(x, y, lambda: steady(rates, it, t0.iterations))
        for m in members:
            window_steps[m] += 1

        done = it + 1
        if (done % t0.eval_interval == 0 or done == t0.iterations) and members:
            train_loss = (window_loss / torch.tensor([max(s, 1) for s in window_steps], device=device)).tolist()
            for m in members:
                if not math.isfinite(train_loss[m]):
                    failed[m] = TrainingDiverged(f"training loss became {train_loss[m]} at iteration {done}")
                    running[m] = False
                    arithmetic.fail(m, jobs[m])
            if len(failed) == k:
                return [failed[m] for m in range(k)]
            members = [m for m in members if running[m]]
            window_loss.zero_()
            window_steps = [0] * k
            validate(members, done, train_loss)
    # every member evaluated at its last iteration: last[m] holds its final validation numbers
    arithmetic.settle()
    _, test_acc = arithmetic.evaluate(data.test_x, data.test_y, autocast)
    finals = arithmetic.use_best()
    _, test_acc_best = arithmetic.evaluate(data.test_x, data.test_y, autocast)
    arithmetic.end(finals)
    seconds = time.perf_counter() - started
    env = environment(device)
    return [failed[m] if m in failed else {
        "test_acc": test_acc[m],
        "early_stop_iteration": best[m]["iteration"],
        "test_acc_at_early_stop": test_acc_best[m],
        "val_loss": last[m]["val_loss"],
        "val_acc": last[m]["val_acc"],
        "val_loss_at_early_stop": best[m]["val_loss"],
        "train_loss": last[m]["train_loss"],
        "start_iteration": job.start,
        "iterations": end[m] - job.start,
        "seconds": seconds,
        "environment": env,
        "final": finals[m],
    } for m, job in enumerate(jobs)]


def batch(data, jobs: list, orders: list, it: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Iteration `it`'s examples: each member's own batch, member after member."""
    if len(jobs) == 1:
        idx = orders[0](it)
        x = data.train_x[idx]
        if data.augment is not None:
            x = data.augment(x, rng(jobs[0].seed, "augment", it))
        return x, data.train_y[idx]
    idx = torch.stack([order(it) for order in orders]).flatten()  # [K * B]
    x = data.train_x[idx]
    if data.augment is not None:
        x = torch.cat([data.augment(part, rng(job.seed, "augment", it)) for part, job in zip(x.chunk(len(jobs)), jobs)])
    return x, data.train_y[idx]


def train_level(net, mask, data, t, seed: int, start_iteration: int,
                on_iteration: Optional[dict] = None,
                progress: Optional[Callable[[int, int, float], None]] = None,
                schedule: Optional[Callable[[int], float]] = None, fused: Optional[bool] = None) -> dict:
    """Train `net` (already holding its starting weights) under `mask` from
    `start_iteration` to t.iterations: train_members with one member, Alone.
    `on_iteration` maps an iteration count to a callback that receives the net's state
    dict after that many steps (level 0 keeps its rewind weights this way); `schedule`
    maps an iteration to its learning rate (default: learning_rate(t, .); edge-popup's
    scores use a cosine); `fused` as make_optimizer's. Returns the level's result (without
    "final": `net` ends with the final weights); raises TrainingDiverged."""
    job = Job(t, seed, mask, None, start_iteration, on_iteration, schedule)
    tell = (lambda m, it, total, val: progress(it, total, val)) if progress else None
    result, = train_members([job], data, Alone(net, fused), tell)
    if isinstance(result, BaseException):
        raise result
    result.pop("final")
    return result


def steady(rates: Callable[[int], object], it: int, end: int) -> int:
    """How many steps from `it` on (at most StepGraph.RUN, none from `end`) run with the
    rates `rates(it)` gives (anything comparable: a pack's holds its members' starts too)."""
    now, most = rates(it), min(StepGraph.RUN, end - it)
    return next((j - it for j in range(it + 1, it + most) if rates(j) != now), most)


class StepGraph:
    """A training step `step(x, y)` on CUDA, captured once as a CUDA graph and replayed while
    the learning rate holds (ARCHITECTURE.md, "Numerics"): the same kernels on the same
    tensors, so the same bits as running it eagerly, without a launch per op (README, "Speed",
    measures it: bench/cuda_options.py). The rate is a
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
