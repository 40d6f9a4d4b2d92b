"""Does a compact ticket (trials/export/compact/) run faster than its masked network? Structured
tickets of LeNet-300-100 (MNIST's 1x28x28), Conv-2 and ResNet-20 (CIFAR-10's 3x32x32) at
about 50% and 20% of each layer's units (one structured pruning of random weights: latency
does not depend on training), timed at batch sizes 1, 128 and 1024 through torch and
through ONNX Runtime, the masked dense network against the compact one, taking turns
(`timed`). One table: the best milliseconds per batch, the speedup and the MAC ratio; then
the goal lines.

    .venv/bin/python bench/compact.py                      # CPU: every case (~3 min on 2 cores)
    .venv/bin/python bench/compact.py --device cuda        # torch on the GPU; ONNX Runtime where its CUDA provider is
    .venv/bin/python bench/compact.py --models conv2 --batches 128 --repeats 20
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from trials.export import compact
from trials.nets import masks, models
from trials.methods import pruning
from trials.spec import ModelSpec, PruneSpec

SHAPES = {"lenet_300_100": (1, 28, 28), "conv2": (3, 32, 32), "resnet20": (3, 32, 32)}


class Info:
    def __init__(self, shape):
        self.shape, self.num_classes = shape, 10


def ticket(name: str, keep: float):
    """A masked network keeping `keep` of each prunable layer's units (structured, one level)."""
    net = models.build(ModelSpec(name=name), Info(SHAPES[name]), seed=0).eval()
    if keep < 1:
        layers = masks.Layers.of(net)
        weights = {k: v.detach() for k, v in net.state_dict().items()}
        mask = pruning.prune(PruneSpec(kind="structured", rate=1 - keep), weights, masks.ones(layers), layers)
        masks.Masker(net, mask).apply()
    return net


def timed(runs, repeats: int, least_s: float = 0.5) -> list:
    """Seconds of one call of each runner, the best of at least `repeats` calls and `least_s`
    each. The runners take turns, so load from other work on the machine falls on all of
    them alike, and the best call is the one it disturbed least."""
    for run in runs:
        run()
        run()
    times, start = [[] for _ in runs], time.perf_counter()
    while len(times[0]) < repeats or time.perf_counter() - start < least_s * len(runs):
        for run, t in zip(runs, times):
            begin = time.perf_counter()
            run()
            t.append(time.perf_counter() - begin)
    return [min(t) for t in times]


def torch_runner(net, x, device):
    net, x = net.to(device), x.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        with torch.inference_mode():
            net(x)
        sync()
    return run


def onnx_runner(path, x, device, threads):
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    session = compact.onnx_session(path, device, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.2], help="fraction of units per layer")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 128, 1024])
    parser.add_argument("--repeats", type=int, default=10, help="calls per runner at least")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch's and ONNX Runtime's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, {args.threads} threads, load average before {os.getloadavg()[0]:.2f}", flush=True)
    rows, goals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            shape = SHAPES[name]
            example = torch.randn(2, *shape)
            for keep in args.keep:
                masked = ticket(name, keep)
                c = compact.compact_model(masked, shape)
                compact.to_onnx(masked, example, Path(tmp) / f"{name}-{keep}-masked.onnx")
                compact.to_onnx(c.model, example, Path(tmp) / f"{name}-{keep}.onnx")
                r = c.report
                units = r["units"]["after"] / r["units"]["before"]
                for batch in args.batches:
                    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
                    if batch == args.batches[0]:  # the exactness check (float64), once per ticket
                        r64 = compact.check(masked, c, x)
                        assert compact.exact(r64["max_logit_diff_fp64"], r64["max_abs_logit"])
                    t_masked, t_compact = timed([torch_runner(masked, x, args.device),
                                                 torch_runner(c.model, x, args.device)], args.repeats)
                    o_dense = onnx_runner(Path(tmp) / f"{name}-{keep}-masked.onnx", x, args.device, args.threads)
                    o_compact = onnx_runner(Path(tmp) / f"{name}-{keep}.onnx", x, args.device, args.threads)
                    o = timed([o_dense, o_compact], args.repeats) if o_dense else None
                    rows.append((name, units, r["mac_ratio"], batch, t_masked, t_compact, o))
                    print(_row(rows[-1]), flush=True)
                    if name in ("conv2", "resnet20") and units <= 0.25 and batch == 128:
                        goals.append((name, units, r["mac_ratio"], t_masked / t_compact))
                masked.cpu()
                c.model.cpu()
    print(f"\nload average after {os.getloadavg()[0]:.2f}\n")
    print("| model | units kept | MAC ratio | batch | torch masked ms | torch compact ms | speedup "
          "| ORT masked ms | ORT compact ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_row(row))
    for name, units, ratio, speedup in goals:
        print(f"\ngoal ({name}, {units:.0%} of units, batch 128, torch): speedup {speedup:.2f}x (>= 2.5x: "
              f"{'yes' if speedup >= 2.5 else 'no'}), {speedup / ratio:.0%} of the MAC ratio {ratio:.2f}x "
              f"(within 60%, >= 40%: {'yes' if speedup >= 0.4 * ratio else 'no'})")


def _row(row) -> str:
    name, units, ratio, batch, t_masked, t_compact, o = row
    ort = (f"{o[0] * 1e3:.3f} | {o[1] * 1e3:.3f} | {o[0] / o[1]:.2f}x" if o else "n/a | n/a | n/a")
    return (f"| {name} | {units:.0%} | {ratio:.2f}x | {batch} | {t_masked * 1e3:.3f} | {t_compact * 1e3:.3f} "
            f"| {t_masked / t_compact:.2f}x | {ort} |")


if __name__ == "__main__":
    main()
