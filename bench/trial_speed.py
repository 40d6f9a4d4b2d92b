"""Engine vs hand-written loop: samples/s of the same LeNet-300-100 IMP job, run two ways.

    (a) engine: trials.runner.levels.run_lottery(spec, tmp_out, data=data), file writes included
    (b) hand:   a minimal masked training loop written below (plain for-loop, index-slice
                batches from a per-epoch randperm, torch.optim.Adam, masks on grads and
                weights after every step, validation every eval_interval iterations with a
                weight snapshot on improvement, test at the end, magnitude pruning and
                rewinding to the init between levels)

Both use the same model init (trials.nets.models.build), the same data tensors (one
trials.nets.datasets.load), the same iterations per level, batch size and optimizer. The
paths alternate `--repeats` times after one short warm-up of each; the median is reported.

Data: real MNIST when ../shared/data/mnist-t10k (from the repo root) has the official
t10k files (first 8,000 images train, last 2,000 test, 1,000 of train for validation),
else the bundled `digits` dataset.

    samples/s = iterations x batch_size summed over trained levels / wall seconds

Modes (`--mode`):
    loop        (default) the above, in one process on preloaded data: the inner loop
    process     whole processes, imports and data loading included, same job and data:
                `lth trial run CONFIG` vs a minimal hand-written script (this file with
                --hand-process: numpy reads the IDX files, then the loop of (b)), and the
                engine as committed at git HEAD (`git archive HEAD trials`; --head-ref
                another commit) vs this tree,
                both through the same few-line driver, and the trial as a pack of one
                (trials.runner.levels.run_pack: fused Adam, not bit-identical): ratios
                lth/hand, tree/HEAD and pack1/HEAD
    optimizers  the engine's inner loop with each Adam: torch's default (single-tensor)
                path, foreach, trials.loop.optim.ExactAdam (the default on CPU) and fused

Run with `make bench` or `.venv/bin/python bench/trial_speed.py [--mode M] [--levels N] ...`.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trials.nets import datasets, masks, models
from trials.methods import pruning
from trials.runner.levels import run_lottery
from trials.spec import DatasetSpec, ModelSpec, PruneSpec, TrainSpec, TrialSpec

REPO = Path(__file__).resolve().parent.parent
MNIST_T10K = Path(os.environ.get("LTH_MNIST_T10K") or REPO.parent / "shared" / "data" / "mnist-t10k")  # or elsewhere
EVAL_BATCH = 1000  # same chunking as the engine's evaluation
N_TRAIN_MNIST = 8000  # of the 10,000 t10k images; the rest is the test set


# ---------------------------------------------------------------- data


def _read_idx(path: Path) -> tuple[bytes, bytes]:
    """(header, payload) of a gzipped IDX file."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    return raw[:header_len], raw[header_len:]


def _write_idx(path: Path, header: bytes, payload: bytes, count: int, item_bytes: int) -> None:
    ndim = header[3]
    dims = list(struct.unpack(f">{ndim}I", header[4:]))
    dims[0] = count
    path.write_bytes(header[:4] + struct.pack(f">{ndim}I", *dims) + payload[: count * item_bytes])


def mnist_root(tmp: Path) -> Path | None:
    """A torchvision MNIST root (ROOT/MNIST/raw/...) built from the t10k files, or None."""
    images, labels = MNIST_T10K / "t10k-images-idx3-ubyte.gz", MNIST_T10K / "t10k-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        return None
    img_head, img = _read_idx(images)
    lab_head, lab = _read_idx(labels)
    pixels = 28 * 28
    n = len(lab)
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)  # run again: the files are written anew
    for split, lo, hi in (("train", 0, N_TRAIN_MNIST), ("t10k", N_TRAIN_MNIST, n)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", img_head, img[lo * pixels : hi * pixels], hi - lo, pixels)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", lab_head, lab[lo:hi], hi - lo, 1)
    return tmp


def dataset_spec(tmp: Path) -> DatasetSpec:
    root = mnist_root(tmp)
    if root is not None:
        return DatasetSpec(name="mnist", data_dir=str(root), validation=1000)
    return DatasetSpec(name="digits")


# ---------------------------------------------------------------- (b) the hand-written loop


@torch.no_grad()
def evaluate(net, x, y) -> tuple[float, float]:
    net.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), EVAL_BATCH):
        out = net(x[i : i + EVAL_BATCH])
        loss += F.cross_entropy(out, y[i : i + EVAL_BATCH], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + EVAL_BATCH]).sum().item()
    net.train()
    return loss / len(x), correct / len(x)


def hand_level(net, mask, data, t, seed: int) -> dict:
    """Train `net` for t.iterations under `mask` (None = dense); net ends with final weights."""
    params = dict(net.named_parameters())
    pairs = [] if mask is None else [(params[k], m) for k, m in mask.items()]
    with torch.no_grad():
        for p, m in pairs:
            p.mul_(m)
    opt = torch.optim.Adam(net.parameters(), lr=t.lr)
    g = torch.Generator().manual_seed(seed)
    n = len(data.train_x)
    steps_per_epoch = n // t.batch_size
    best_loss, best_it, best_state = float("inf"), 0, None
    train_loss = torch.zeros(())
    net.train()
    for it in range(t.iterations):
        step = it % steps_per_epoch
        if step == 0:
            perm = torch.randperm(n, generator=g)
        idx = perm[step * t.batch_size : (step + 1) * t.batch_size]
        loss = F.cross_entropy(net(data.train_x[idx]), data.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, m in pairs:
            p.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for p, m in pairs:
                p.mul_(m)
        train_loss += loss.detach()
        if (it + 1) % t.eval_interval == 0 or it + 1 == t.iterations:
            val_loss, val_acc = evaluate(net, data.val_x, data.val_y)
            if val_loss < best_loss:
                best_loss, best_it = val_loss, it + 1
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    # same end-of-level evaluation work as the engine: test the final and the early-stop weights
    _, test_acc = evaluate(net, data.test_x, data.test_y)
    final = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    _, test_acc_best = evaluate(net, data.test_x, data.test_y)
    net.load_state_dict(final)
    return {"test_acc": test_acc, "test_acc_at_early_stop": test_acc_best, "early_stop_iteration": best_it,
            "val_acc": val_acc}


def run_hand(spec: TrialSpec, data) -> list[dict]:
    net = models.build(spec.model, data.info, seed=spec.seed, device=data.train_x.device)
    init = {k: v.detach().clone() for k, v in net.state_dict().items()}
    layers = masks.Layers.of(net)
    mask, records = None, []
    for level in range(spec.prune.levels + 1):
        if level > 0:
            weights = {k: v.detach() for k, v in net.state_dict().items()}
            mask = pruning.prune(spec.prune, weights, mask or masks.ones(layers), layers)
            net.load_state_dict(init)  # rewind to the init (k = 0)
        record = hand_level(net, mask, data, spec.train, spec.seed)
        record["density"] = 1.0 if mask is None else masks.density(mask, layers)
        records.append(record)
    return records


# ---------------------------------------------------------------- (a) the engine


def run_engine(spec: TrialSpec, data) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="lth-bench-") as out:
        return [r.to_dict() for r in run_lottery(spec, Path(out) / "trial", data=data)]  # as the hand loop's


# ---------------------------------------------------------------- bench


def make_spec(ds: DatasetSpec, levels: int, iterations: int) -> TrialSpec:
    return TrialSpec(
        model=ModelSpec(name="lenet_300_100"),
        dataset=ds,
        train=TrainSpec(optimizer="adam", lr=1.2e-3, batch_size=60, iterations=iterations, eval_interval=100),
        prune=PruneSpec(kind="unstructured", scope="layerwise", rate=0.2, levels=levels - 1),
        device="cpu",
    )


def timed(fn, *args) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    records = fn(*args)
    return time.perf_counter() - started, records


# ---------------------------------------------------------------- whole processes


def read_mnist_numpy(root: Path, validation: int = 1000):
    """The hand-written script's data: IDX files -> normalised tensors, the engine's split."""
    import numpy as np

    raw = root / "MNIST" / "raw"

    def idx(name, ndim):
        b = (raw / name).read_bytes()
        return np.frombuffer(b, np.uint8, offset=4 + 4 * ndim)

    def images(split):
        x = torch.from_numpy(idx(f"{split}-images-idx3-ubyte", 3).copy()).view(-1, 1, 28, 28)
        return (x.float() / 255.0 - 0.1307) / 0.3081

    labels = lambda split: torch.from_numpy(idx(f"{split}-labels-idx1-ubyte", 1).astype("int64"))  # noqa: E731
    train_x, train_y, test_x, test_y = images("train"), labels("train"), images("t10k"), labels("t10k")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(datasets.SPLIT_SEED))
    tr, val = order[: len(train_x) - validation], order[len(train_x) - validation :]
    return datasets.Data(datasets.DatasetInfo((1, 28, 28), 10), train_x[tr], train_y[tr], train_x[val],
                         train_y[val], test_x, test_y)


def hand_process(root: Path, levels: int, iterations: int) -> None:
    records = run_hand(make_spec(DatasetSpec(name="mnist", data_dir=str(root), validation=1000), levels, iterations),
                       read_mnist_numpy(root))
    print(" ".join(f"{r['density']:.3f}:{r['test_acc']:.4f}" for r in records))


DRIVER = """import sys, json
from pathlib import Path
try:
    from trials.runner.levels import run_lottery
except ImportError:  # an engine before trials/ in wings (--head-ref)
    from trials.lottery import run_lottery
from trials.spec import from_dict
import trials
assert Path(trials.__file__).resolve().parent == Path(sys.argv[3]).resolve(), trials.__file__
records = run_lottery(from_dict(json.loads(sys.argv[1])), Path(sys.argv[2]))
print(" ".join(f"{r.density:.3f}:{r.test_acc:.4f}" for r in records))
"""
PACK_OF_ONE = DRIVER.replace("import run_lottery", "import run_pack").replace(
    "records = run_lottery(from_dict(json.loads(sys.argv[1])), Path(sys.argv[2]))",
    "records = run_pack([from_dict(json.loads(sys.argv[1]))], [Path(sys.argv[2])])[0]")


def spec_data(root: Path, levels: int, iterations: int) -> dict:
    return {"model": "lenet_300_100", "dataset": {"name": "mnist", "data_dir": str(root), "validation": 1000},
            "train": {"optimizer": "adam", "lr": 1.2e-3, "batch_size": 60, "iterations": iterations,
                      "eval_interval": 100},
            "prune": {"kind": "unstructured", "scope": "layerwise", "rate": 0.2, "levels": levels - 1},
            "device": "cpu"}


def process_mode(args, tmp: Path) -> None:
    root = mnist_root(tmp / "data")
    if root is None:
        sys.exit(f"--mode process needs the MNIST t10k files in {MNIST_T10K}")
    head = tmp / "head"
    head.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.head_ref, "trials"], check=True,
                             capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(head)], input=archive.stdout, check=True)
    data = spec_data(root, args.levels, args.iterations)
    config = tmp / "trial.json"
    config.write_text(__import__("json").dumps(data))
    lth = Path(sys.executable).parent / "lth"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    paths = {
        "lth": ([str(lth), "trial", "run", str(config), "--out"], None),
        "hand": ([sys.executable, __file__, "--hand-process", str(root), "--levels", str(args.levels),
                  "--iterations", str(args.iterations), "--out"], None),
        "tree": ([sys.executable, "-c", DRIVER, config.read_text()], REPO / "trials"),
        "head": ([sys.executable, "-c", DRIVER, config.read_text()], head / "trials"),
        "pack1": ([sys.executable, "-c", PACK_OF_ONE, config.read_text()], REPO / "trials"),
    }
    print(f"job: lenet_300_100 on real MNIST (8000 train incl. 1000 val / 2000 test), {args.levels} levels x "
          f"{args.iterations} iterations, batch 60, adam; whole processes, {args.threads} threads each")
    times: dict = {k: [] for k in paths}
    for r in range(args.repeats):
        for name, (cmd, trials_dir) in paths.items():
            out = tmp / f"out-{name}-{r}"
            full = cmd + [str(out)] if trials_dir is None else cmd + [str(out), str(trials_dir)]
            cwd = trials_dir.parent if trials_dir is not None else REPO
            started = time.perf_counter()
            done = subprocess.run(full, env={**env, "PYTHONPATH": str(cwd)}, cwd=cwd, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            times[name].append(seconds)
            print(f"  repeat {r + 1}/{args.repeats} {name:5s} {seconds:7.2f} s   {done.stdout.strip().splitlines()[-1][:90]}")
            shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:5s} median {v:7.2f} s  (best {min(times[k]):.2f})")
    print(f"ratio lth trial run / hand-written script (speed, whole process): {med['hand'] / med['lth']:.3f}")
    print(f"ratio this tree / {args.head_ref} engine (speed, whole process):  {med['head'] / med['tree']:.3f}")
    print(f"ratio pack of one (fused Adam) / {args.head_ref} engine (whole process): {med['head'] / med['pack1']:.3f}")


# ---------------------------------------------------------------- optimizer options


def optimizer_mode(args, spec, data) -> None:
    from trials.loop import arithmetic, optim

    def variant(kind):
        def make(t, params, fused=None):
            params = list(params)
            if kind == "exact":
                return optim.ExactAdam(params, lr=t.lr, weight_decay=t.weight_decay)
            flags = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
            return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **flags)
        return make

    samples = args.levels * args.iterations * spec.train.batch_size
    kinds = ("single", "foreach", "exact", "fused")
    times: dict = {k: [] for k in kinds}
    original = arithmetic.make_optimizer
    try:
        for r in range(args.repeats):
            for kind in kinds:
                arithmetic.make_optimizer = variant(kind)
                seconds, records = timed(run_engine, spec, data)
                times[kind].append(seconds)
                accs = " ".join(f"{x['density']:.3f}:{x['test_acc']:.4f}" for x in records)
                print(f"  repeat {r + 1}/{args.repeats} {kind:7s} {seconds:7.2f} s  {samples / seconds:9.0f} samples/s  {accs}")
    finally:
        arithmetic.make_optimizer = original
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in kinds:
        print(f"{k:7s} median {med[k]:7.2f} s  {samples / med[k]:9.0f} samples/s  speed vs torch default "
              f"{med['single'] / med[k]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("loop", "process", "optimizers"), default="loop")
    ap.add_argument("--head-ref", default="HEAD", help="--mode process: the commit of the 'head' engine")
    ap.add_argument("--levels", type=int, default=4, help="trained levels, the dense level 0 included")
    ap.add_argument("--iterations", type=int, default=1000, help="optimizer steps per level")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path (alternating)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both paths")
    ap.add_argument("--hand-process", type=Path, help=argparse.SUPPRESS)  # internal: the hand-written process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.hand_process:
        return hand_process(args.hand_process, args.levels, args.iterations)
    if args.mode == "process":
        with tempfile.TemporaryDirectory(prefix="lth-bench-proc-") as tmp:
            return process_mode(args, Path(tmp))

    with tempfile.TemporaryDirectory(prefix="lth-bench-data-") as tmp:
        ds = dataset_spec(Path(tmp))
        data = datasets.load(ds, torch.device("cpu"), 60)
    spec = make_spec(ds, args.levels, args.iterations)
    samples = args.levels * args.iterations * spec.train.batch_size
    print(f"dataset: {ds.name} ({'real MNIST t10k: 8000 train / 2000 test' if ds.name == 'mnist' else 'bundled'}; "
          f"train {len(data.train_x)}, val {len(data.val_x)}, test {len(data.test_x)})")
    print(f"job: lenet_300_100, {args.levels} levels x {args.iterations} iterations, batch 60, adam 1.2e-3, "
          f"unstructured layerwise 20%, eval every 100; {samples} training samples per run; "
          f"torch threads {torch.get_num_threads()}")

    warm = make_spec(ds, 2, 200)
    run_engine(warm, data)
    if args.mode == "optimizers":
        return optimizer_mode(args, spec, data)
    run_hand(warm, data)

    times = {"engine": [], "hand": []}
    last = {}
    for r in range(args.repeats):
        for name, fn in (("engine", run_engine), ("hand", run_hand)):
            seconds, last[name] = timed(fn, spec, data)
            times[name].append(seconds)
            print(f"  repeat {r + 1}/{args.repeats} {name:6s} {seconds:7.2f} s  {samples / seconds:9.0f} samples/s")

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    rate = {k: samples / v for k, v in med.items()}
    for name in ("engine", "hand"):
        accs = " ".join(f"{r['density']:.3f}:{r['test_acc']:.4f}" for r in last[name])
        print(f"{name:6s} median {med[name]:7.2f} s  {rate[name]:9.0f} samples/s  "
              f"(best {samples / best[name]:.0f})   density:test_acc {accs}")
    print(f"ratio engine/hand-written: {rate['engine'] / rate['hand']:.3f} (median)  "
          f"{best['hand'] / best['engine']:.3f} (best runs)")
    load = os.getloadavg()[0]
    if load > os.cpu_count() + 0.5:  # our own process accounts for about cpu_count
        print(f"note: 1-minute load average {load:.1f} on {os.cpu_count()} CPUs: other processes competed "
              f"for the CPU; the timings are noisy")


if __name__ == "__main__":
    main()
