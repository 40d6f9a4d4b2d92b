"""Trials per hour: 16 LeNet-300-100 IMP trials (seeds 0..15, 3 levels each) on real MNIST,
one trial per process against packs of K trials per process (trials/runner/levels.py run_pack).

    head    one trial per process, the engine as committed at git HEAD (`git archive HEAD
            trials`), or at --head-ref: today's trials per hour
    single  one trial per process, this tree's engine (trials.runner.levels.run_lottery)
    pack K  16/K processes, each trains a pack of K trials (trials.runner.levels.run_pack), K in --packs

Every path is whole processes (imports and data loading included), run one after another
with the same thread count, each trial writing its normal trial folder. --model runs
another registered model on the same data (e.g. conv2); --pack-ref REV runs the packs
with the engine of commit REV (with --skip head), to compare a change of the pack code;
--method edge_popup times supermask searches (3 densities) instead of IMP trials:

    .venv/bin/python bench/packed.py --skip head single --packs 4 16 --pack-ref HEAD~1

--sweep measures what a user waits for instead: the same 16 trials as one `lth sweep run`
per K (Ray start, Tune, checkpoints, MLflow logging, shared units and trials.csv
included), `pack: K` (K=1: one trial per Tune trial), using the whole machine each time:
Tune trials of --threads / min(--threads, Tune trials) CPUs each, --threads at once. Data: the MNIST
t10k files in ../shared/data/mnist-t10k (first 8,000 images train, of which 1,000
validation, last 2,000 test), as bench/trial_speed.py.

    .venv/bin/python bench/packed.py [--iterations 300] [--packs 1 4 16] [--threads 2] [--sweep]

On a GPU (--device cuda) the question is trials per GPU-hour, one trial per GPU (a process
at a time, the GPU to itself) against packs, and larger packs pay:

    python bench/packed.py --device cuda --skip head --trials 128 --packs 1 16 64 128 --sample 4

--sample N times only the first N processes of a path (the rate is what counts; one trial
per process at 128 trials would take most of the run). LTH_MNIST_T10K points elsewhere for
the t10k files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.trial_speed import mnist_root  # noqa: E402

SINGLE = """import sys, json
from pathlib import Path
import trials
assert Path(trials.__file__).resolve().parent == Path(sys.argv[3]).resolve(), trials.__file__
try:
    from trials.runner.levels import run_lottery
except ImportError:  # an engine before trials/ in wings (--head-ref)
    from trials.lottery import run_lottery
from trials.spec import from_dict
records = run_lottery(from_dict(json.loads(sys.argv[1])), Path(sys.argv[2]))
print(records[-1].density, records[-1].test_acc)
"""

PACK = """import sys, json
from pathlib import Path
import trials
assert Path(trials.__file__).resolve().parent == Path(sys.argv[3]).resolve(), trials.__file__
try:
    from trials.runner.levels import run_pack
except ImportError:  # an engine before trials/ in wings, or before the one level runner (--pack-ref)
    try:
        from trials.lottery import run_pack
    except ImportError:
        from trials.packed import run_pack
from trials.spec import from_dict
specs = [from_dict(d) for d in json.loads(sys.argv[1])]
records = run_pack(specs, [Path(p) for p in json.loads(sys.argv[2])])
print(" ".join(f"{r[-1].test_acc:.4f}" for r in records))
"""


def spec_data(root: Path, seed: int, iterations: int, device: str = "cpu", model: str = "lenet_300_100",
              method: str = "imp") -> dict:
    """An IMP trial of 3 levels, or (method edge_popup) a supermask search at 3 densities."""
    levels = ({"prune": {"kind": "unstructured", "scope": "layerwise", "rate": 0.2, "levels": 2}} if method == "imp"
              else {"method": method, "supermask": {"densities": [0.5, 0.2, 0.05]}})
    return {"model": model, "dataset": {"name": "mnist", "data_dir": str(root), "validation": 1000},
            "train": {"optimizer": "adam", "lr": 1.2e-3, "batch_size": 60, "iterations": iterations,
                      "eval_interval": 100},
            **levels, "seed": seed, "device": device}


def run(cmd: list, trials_dir: Path, env: dict) -> str:
    done = subprocess.run(cmd + [str(trials_dir)], cwd=trials_dir.parent,
                          env={**env, "PYTHONPATH": str(trials_dir.parent)}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:3])}\n{done.stderr[-3000:]}")
    return done.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=300, help="optimizer steps per level (3 levels)")
    ap.add_argument("--packs", type=int, nargs="+", default=[1, 4, 16], help="pack sizes K")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of every process")
    ap.add_argument("--skip", nargs="*", default=[], help="paths to leave out: head, single")
    ap.add_argument("--head-ref", default="HEAD", help="the commit whose engine the head path runs")
    ap.add_argument("--sweep", action="store_true", help="whole `lth sweep run` commands, pack: K")
    ap.add_argument("--device", default="cpu", help="the trials' device: cpu, cuda")
    ap.add_argument("--sample", type=int, default=0, help="time only the first N processes of each path")
    ap.add_argument("--model", default="lenet_300_100", help="any registered model that runs on MNIST, e.g. conv2")
    ap.add_argument("--method", default="imp", help="imp, or edge_popup: supermask searches at 3 densities")
    ap.add_argument("--pack-ref", default=None, help="packs run the engine of this commit (as head), not this tree's")
    args = ap.parse_args()
    if args.sweep:
        return sweeps(args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    with tempfile.TemporaryDirectory(prefix="lth-bench-packed-") as tmp:
        tmp = Path(tmp)
        root = mnist_root(tmp / "data")
        if root is None:
            sys.exit("needs the MNIST t10k files in ../shared/data/mnist-t10k")
        head = tmp / "head"
        head.mkdir()
        if "head" not in args.skip or args.pack_ref:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.pack_ref or args.head_ref, "trials"],
                                     check=True,
                                     capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(head)], input=archive.stdout, check=True)
        specs = [spec_data(root, seed, args.iterations, args.device, args.model, args.method)
                 for seed in range(args.trials)]
        if args.pack_ref and "head" not in args.skip and args.pack_ref != args.head_ref:
            sys.exit("--pack-ref: give --skip head (head and the packs would need two engines)")
        print(f"packs: the engine at {args.pack_ref}" if args.pack_ref else "packs: this tree's engine")
        print(f"{args.trials} {args.method} trials: {args.model}, real MNIST 8k, 3 levels x {args.iterations} iterations, "
              f"batch 60, adam, {args.device}; {args.threads} threads per process; "
              f"load average {os.getloadavg()[0]:.1f}")

        # one untimed short trial first: the first process to import torch and train reads (and
        # byte-compiles) from disk what later ones find cached
        run([sys.executable, "-c", SINGLE, json.dumps(spec_data(root, 0, 100, args.device)), str(tmp / "warm")],
            REPO / "trials", env)
        results = {}
        paths = [(name, None) for name in ("head", "single") if name not in args.skip]
        paths += [(f"pack {k}", k) for k in args.packs]
        for name, k in paths:
            started = time.perf_counter()
            out = tmp / name.replace(" ", "")
            starts = range(0, len(specs), k or 1)
            starts = starts[: args.sample or None]
            if k is None:
                trials_dir = head / "trials" if name == "head" else REPO / "trials"
                last = [run([sys.executable, "-c", SINGLE, json.dumps(specs[a]), str(out / str(a))], trials_dir, env)
                        for a in starts]
            else:
                last = [run([sys.executable, "-c", PACK, json.dumps(specs[a : a + k]),
                             json.dumps([str(out / str(i)) for i in range(a, a + k)])],
                            head / "trials" if args.pack_ref else REPO / "trials", env)
                        for a in starts]
            seconds = time.perf_counter() - started
            done = len(starts) * (k or 1)
            results[name] = done / seconds * 3600
            print(f"{name:7s} {done:4d} trials {seconds:8.1f} s  {results[name]:8.0f} trials/h   "
                  f"(last process: {last[-1][:60]})", flush=True)
        if "head" in results and "single" in results:  # the bit-exact default: the same numbers as head's?
            def numbers(folder):
                rows = [json.loads(line) for line in (folder / "levels.jsonl").read_text().splitlines()]
                return [{k: v for k, v in r.items() if k not in ("seconds", "environment")} for r in rows]
            ran = [p.name for p in (tmp / "single").iterdir() if (tmp / "head" / p.name / "levels.jsonl").exists()]
            same = sum(numbers(tmp / "head" / n) == numbers(tmp / "single" / n) for n in ran)
            print(f"single: the same records (all but seconds and environment) as head for {same} of {len(ran)} trials")
        base = results.get("head") or results.get("single")
        for name, rate in results.items() if base else ():  # --skip head single: rates only
            print(f"{name:7s} trials per hour vs {'head' if 'head' in results else 'single'} "
                  f"(one trial per process): {rate / base:.2f}x")
        print(f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def sweeps(args) -> None:
    import pandas as pd
    import yaml

    lth = Path(sys.executable).parent / "lth"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="lth-bench-packed-sweep-") as tmp:
        tmp = Path(tmp)
        root = mnist_root(tmp / "data")
        if root is None:
            sys.exit("needs the MNIST t10k files in ../shared/data/mnist-t10k")
        base = {k: v for k, v in spec_data(root, 0, args.iterations).items() if k != "seed"}
        print(f"{args.trials} trials as one sweep each: lenet_300_100, real MNIST 8k, 3 levels x "
              f"{args.iterations} iterations; {args.threads} CPUs; load average {os.getloadavg()[0]:.1f}")
        results = {}
        for k in args.packs:
            tune_trials = -(-args.trials // k)
            cpus = max(1, args.threads // min(args.threads, tune_trials))
            sweep = {"name": f"pack{k}", "experiment": "bench-packed", "base": base, "seeds": args.trials,
                     "pack": k, "resources": {"cpu": cpus}, "max_concurrent": args.threads,
                     "storage": str(tmp / f"runs{k}"),  # its own: no sweep reuses another's units
                     "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}
            path = tmp / f"pack{k}.yaml"
            path.write_text(yaml.safe_dump(sweep))
            started = time.perf_counter()
            done = subprocess.run([str(lth), "sweep", "run", str(path)], cwd=tmp, env=env,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                sys.exit(f"pack {k} failed:\n{done.stderr[-3000:]}")
            rows = pd.read_csv(tmp / f"runs{k}" / f"pack{k}" / "trials.csv")
            assert len(rows) == args.trials * 3 and set(rows.status) == {"TERMINATED"}, rows
            results[k] = seconds
            acc = rows[rows.level == 2].test_acc.mean()
            print(f"pack {k:2d}: {tune_trials:2d} Tune trials of {cpus} CPU  {seconds:7.1f} s  "
                  f"{args.trials / seconds * 3600:7.0f} trials/h  final test acc {acc:.4f}", flush=True)
        if 1 in results:
            for k, seconds in results.items():
                print(f"pack {k:2d} vs one trial per Tune trial: {results[1] / seconds:.2f}x")
        print(f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
