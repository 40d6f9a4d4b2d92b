"""What pays on CUDA for the small models of lottery-ticket work: the time of one training
step as the engine takes it (forward, cross-entropy, backward, masked gradients, Adam,
masks re-applied; trials/loop/training.py train_level), per variant:

    eager          torch.optim.Adam's default on CUDA (foreach): the engine before this bench
    fused          torch's fused Adam (the engine's Adam on CUDA since)
    channels_last  fused, model and batches in channels_last (conv models only)
    graph          fused, capturable, the whole step captured once as a CUDA graph and replayed
    compile        fused, torch.compile(model) (default mode); its compile time is printed apart

and for a pack of K LeNet-300-100 members (trials/loop/stacked.py Stacked's step):
pack eager against pack graph (the engine replays both as graphs since: training.StepGraph). Median over windows of steps, timed with CUDA events, after
warm-up; 50%-pruned masks so the masking does real work. No numbers of any trial depend on
this script: it decides what the engine should adopt (ARCHITECTURE.md, "Speed and packs").

    python bench/cuda_options.py [--steps 50] [--windows 5] [--pack 64] [--skip compile]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trials.nets import models  # noqa: E402
from trials.nets.datasets import DatasetInfo  # noqa: E402
from trials.loop.optim import PackedOptimizer  # noqa: E402
from trials.loop.stacked import PackedNet  # noqa: E402
from trials.spec import ModelSpec, TrainSpec  # noqa: E402
from trials.loop.arithmetic import cuda_numerics  # noqa: E402

CASES = [  # model, input shape, batch size
    ("lenet_300_100", (1, 28, 28), 60),
    ("conv2", (3, 32, 32), 60),
    ("resnet20", (3, 32, 32), 128),
]
DATA = 8192  # examples on the device to draw batches from


def masks_of(net, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(p.shape, generator=g) < density).to(p.device, p.dtype)
            for n, p in net.named_parameters() if p.dim() > 1}


class Step:
    """One engine step on `net`; `batch(i)` gives the i-th batch's (x, y) on the device."""

    def __init__(self, net, x_all, y_all, batch, fused, capturable=False, channels_last=False):
        self.net, self.x_all, self.y_all, self.batch = net, x_all, y_all, batch
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
            self.x_all = self.x_all.contiguous(memory_format=torch.channels_last)
        params = dict(self.net.named_parameters())
        m = masks_of(self.net)
        self.params, self.masks = [params[n] for n in m], list(m.values())
        kw = {"fused": True, "capturable": capturable} if fused else {}
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3, **kw)
        self.idx = torch.zeros(batch, dtype=torch.long, device=x_all.device)
        self.gen = torch.Generator(device=x_all.device).manual_seed(0)

    def next_batch(self):
        self.idx.copy_(torch.randint(len(self.x_all), (self.batch,), device=self.x_all.device, generator=self.gen))

    def __call__(self):
        x, y = self.x_all[self.idx], self.y_all[self.idx]
        loss = F.cross_entropy(self.net(x), y)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():
            torch._foreach_mul_([p.grad for p in self.params], self.masks)
            self.opt.step()
            torch._foreach_mul_(self.params, self.masks)
        return loss


def graphed(step: Step):
    """The step captured once (after warm-up on a side stream, as torch's docs say); a call
    picks a batch and replays it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step.next_batch()
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay():
        step.next_batch()
        graph.replay()
    return replay


def eager(step: Step):
    def run():
        step.next_batch()
        step()
    return run


def timed(run, steps: int, windows: int, device) -> float:
    """Median milliseconds per step."""
    for _ in range(10):
        run()
    if device.type != "cuda":
        times = []
        for _ in range(windows):
            t = time.perf_counter()
            for _ in range(steps):
                run()
            times.append((time.perf_counter() - t) * 1e3 / steps)
        return statistics.median(times)
    times = []
    for _ in range(windows):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / steps)
    return statistics.median(times)


def build(name, shape, device):
    return models.build(ModelSpec(name=name), DatasetInfo(shape, 10), seed=0, device=device)


def data(shape, device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(DATA, *shape, generator=g).to(device), torch.randint(10, (DATA,), generator=g).to(device)


def single(args, device) -> list:
    rows = []
    for name, shape, batch in CASES:
        x, y = data(shape, device)
        variants = ["eager", "fused"] + (["channels_last"] if len(shape) == 3 and name != "lenet_300_100" else [])
        variants += ["graph"] if device.type == "cuda" else []
        variants += ["compile"] if name in args.compile else []
        base = None
        for v in variants:
            if v in args.skip:
                continue
            try:
                step = Step(build(name, shape, device), x, y, batch, fused=v != "eager", capturable=v == "graph",
                            channels_last=v == "channels_last")
                extra = ""
                if v == "graph":
                    run = graphed(step)
                elif v == "compile":
                    step.net = torch.compile(step.net)
                    t = time.perf_counter()
                    eager(step)()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    extra = f"  (first step, compiling: {time.perf_counter() - t:.1f} s)"
                    run = eager(step)
                else:
                    run = eager(step)
                ms = timed(run, args.steps, args.windows, device)
            except Exception as e:  # one variant failing says so and the rest go on
                print(f"{name:14s} {v:14s} failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
                continue
            base = base or ms
            rows.append((name, v, ms))
            print(f"{name:14s} {v:14s} {ms:8.3f} ms/step  {base / ms:5.2f}x eager{extra}", flush=True)
    return rows


def pack(args, device) -> None:
    k = args.pack
    shape, batch = (1, 28, 28), 60
    template = build("lenet_300_100", shape, "cpu")
    x_all, y_all = data(shape, device)
    t = TrainSpec(optimizer="adam", lr=1e-3, batch_size=batch, iterations=1000, eval_interval=100)
    base = None
    for v in ["pack eager"] + (["pack graph"] if device.type == "cuda" else []):
        pnet = PackedNet(template, k, device)
        params = list(pnet.params.values())
        masks = [(torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.5).to(device, p.dtype)
                 for p in params]
        opt = PackedOptimizer(params, [t] * k, apart=device.type != "cuda")
        idx = torch.zeros(k, batch, dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(0)

        def step():
            xb = x_all[idx.flatten()]
            losses = F.cross_entropy(pnet.net(xb), y_all[idx.flatten()], reduction="none").view(k, -1).mean(1)
            for p in params:
                p.grad = None
            losses.sum().backward()
            with torch.no_grad():
                torch._foreach_mul_([p.grad for p in params], masks)
                opt.step(list(range(k)), [1e-3] * k)
                torch._foreach_mul_(params, masks)

        def next_batch():
            idx.copy_(torch.randint(len(x_all), (k, batch), device=device, generator=gen))

        try:
            if v == "pack graph":
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        next_batch()
                        step()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    step()
                run = lambda: (next_batch(), g.replay())  # noqa: E731
            else:
                run = lambda: (next_batch(), step())  # noqa: E731
            ms = timed(run, args.steps, args.windows, device)
        except Exception as e:
            print(f"pack of {k:3d}     {v:14s} failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
            continue
        base = base or ms
        print(f"pack of {k:3d}     {v:14s} {ms:8.3f} ms/step  {base / ms:5.2f}x pack eager  "
              f"{ms / k * 1e3:7.1f} us per member-step", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="steps per timed window")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--pack", type=int, default=64, help="members of the pack case")
    ap.add_argument("--skip", nargs="*", default=[], help="variants to leave out (e.g. compile)")
    ap.add_argument("--compile", nargs="*", default=[c[0] for c in CASES], help="models to try torch.compile on")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        cuda_numerics()
        print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    single(args, device)
    if "pack" not in args.skip:
        pack(args, device)


if __name__ == "__main__":
    main()
