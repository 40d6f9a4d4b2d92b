"""The parts of bench/gpu_day.sh that are Python: MNIST-shaped data, one timed sweep, a
pack's GPU memory against the planner's estimate, and the one results file.

    python bench/gpu_day.py data DIR                  # an MNIST root (torchvision layout) in DIR
    python bench/gpu_day.py sweep --name pack128 --pack 128 --trials 512 --gpu 0.25 ... --out X.json
    python bench/gpu_day.py memory --packs 64 128 --data DIR --out X.json
    python bench/gpu_day.py report WORK OUT_FILE      # every step and result in one file

`sweep` runs `lth sweep run` in this process with some of its functions timed from the
outside (nothing in lth is changed): Ray's start (runner.init_ray), the shared-work broker
(runner._share), Tune's fit, the MLflow work inside and around it (the tracker's setup, the
MlflowLogger callbacks, which Tune runs between its own steps, and the end-of-sweep
replay), and the rest (checks, trials.csv, tables). Training is fit less the MLflow work
inside it. While it runs, a thread reads nvidia-smi every half second: the GPU's memory in
use and the largest process's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- data
def data(root: Path) -> None:
    """ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte: the real t10k split as
    bench/trial_speed.py does (8,000 train, 2,000 test) when LTH_MNIST_T10K holds the files,
    else generated digits of the same shape: ten fixed random strokes per class, shifted
    and noised (learnable, not MNIST; the accuracy means nothing, the work is the same)."""
    from bench.trial_speed import MNIST_T10K, mnist_root

    if mnist_root(root) is not None:
        print(f"data: MNIST t10k from {MNIST_T10K} (8,000 train, 2,000 test)")
        return
    import numpy as np

    rng = np.random.default_rng(0)
    templates = np.zeros((10, 28, 28), np.float32)
    for c in range(10):
        for _ in range(3):  # three strokes per class
            r, col = rng.integers(6, 22, 2)
            dr, dc = rng.integers(-1, 2, 2)
            for t in range(10):
                templates[c, np.clip(r + t * dr, 0, 27), np.clip(col + t * dc + (t if dr == dc == 0 else 0), 0, 27)] = 1
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 8000), ("t10k", 2000)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        shift = rng.integers(-4, 5, (n, 2))
        images = np.stack([np.roll(templates[y], tuple(s), (0, 1)) for y, s in zip(labels, shift)])
        images = np.clip(images * 200 + rng.normal(0, 90, images.shape), 0, 255).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    print(f"data: generated MNIST-shaped digits in {root} (8,000 train, 2,000 test; no t10k files found)")


def base_spec(root: str, iterations: int, device: str) -> dict:
    """LeNet-300-100, 3 levels x `iterations` (bench/packed.py's job, the README's GPU numbers)."""
    from bench.packed import spec_data

    spec = {k: v for k, v in spec_data(Path(root), 0, iterations, device).items() if k != "seed"}
    spec["train"]["eval_interval"] = min(spec["train"]["eval_interval"], iterations)
    return spec


# ---------------------------------------------------------------- GPU memory
class GpuWatch(threading.Thread):
    """Peak of nvidia-smi's memory.used (the GPU) and of its largest compute process, MiB."""

    def __init__(self):
        super().__init__(daemon=True)
        self.gpu = self.process = 0
        self.stop = threading.Event()
        self.ok = shutil.which("nvidia-smi") is not None

    def run(self):
        while self.ok and not self.stop.wait(0.5):
            for query, attr in (("--query-gpu=memory.used", "gpu"), ("--query-compute-apps=used_memory", "process")):
                try:
                    out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True,
                                         text=True, timeout=5).stdout
                    values = [int(v) for v in out.split() if v.strip().isdigit()]
                    setattr(self, attr, max([getattr(self, attr), *values]))
                except (OSError, subprocess.SubprocessError, ValueError):
                    pass


def estimate_mib(spec: dict, k: int) -> float:
    from orchestrator.plan import member_bytes
    from trials.spec import from_dict

    return k * member_bytes(from_dict({**spec, "seed": 0})) / 2**20


# ---------------------------------------------------------------- one timed sweep
def sweep(args) -> None:
    import yaml

    spent = {"ray start": 0.0, "units": 0.0, "fit": 0.0, "tracking in fit": 0.0, "tracking setup": 0.0,
             "replay": 0.0, "finish": 0.0}

    def timed(owner, attr, phase):
        fn = getattr(owner, attr)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[phase] += time.perf_counter() - t
        setattr(owner, attr, wrapper)

    t_imports = time.perf_counter()
    from ray import tune

    from lth.cli import main
    from orchestrator.sweeps import callbacks, runner
    from orchestrator.tracking import store
    imports = time.perf_counter() - t_imports
    timed(runner, "init_ray", "ray start")
    timed(runner, "_share", "units")
    timed(tune.Tuner, "fit", "fit")
    timed(callbacks.MlflowLogger, "_try", "tracking in fit")
    timed(store, "check_reachable", "tracking setup")
    timed(store.SweepTracker, "__init__", "tracking setup")
    timed(runner, "replay", "replay")
    timed(runner, "_finish", "finish")

    spec = base_spec(args.data, args.iterations, args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    doc = {"name": args.name, "experiment": "gpu-day", "base": spec, "seeds": args.trials, "pack": args.pack,
           "resources": {"cpu": args.cpu, "gpu": args.gpu}, "max_concurrent": args.concurrent,
           "storage": str(work / "runs"), "tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "share": True}
    path = work / f"{args.name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    watch = GpuWatch()
    watch.start()
    t0 = time.perf_counter()
    try:
        rc = main(["sweep", "run", str(path)])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    wall = time.perf_counter() - t0
    watch.stop.set()
    import pandas as pd

    result = {"name": args.name, "rc": rc, "trials": args.trials, "pack": args.pack, "device": args.device,
              "resources": doc["resources"], "max_concurrent": args.concurrent, "iterations": args.iterations,
              "levels": 3, "imports_s": round(imports, 2), "wall_s": round(wall, 2)}
    csv = work / "runs" / args.name / "trials.csv"
    if csv.exists():
        rows = pd.read_csv(csv)
        last = rows[rows.level == rows.level.max()]
        result.update(done=int((last.status == "TERMINATED").sum()), rows=len(rows),
                      member_training_s=round(float(rows.seconds.sum()), 1),
                      final_test_acc=round(float(last.test_acc.mean()), 4))
    tracking = spent["tracking in fit"] + spent["tracking setup"] + spent["replay"]
    result["phases_s"] = {
        "ray start": round(spent["ray start"], 2),
        "shared-work broker": round(spent["units"], 2),
        "training (Tune's fit less MLflow inside it)": round(spent["fit"] - spent["tracking in fit"], 2),
        "tracking (MLflow: setup, callbacks, replay)": round(tracking, 2),
        "trials.csv and tables": round(spent["finish"] - spent["replay"], 2),
        "rest (checks, plan, Ray's shutdown)": round(wall - spent["ray start"] - spent["units"] - spent["fit"]
                                                     - spent["tracking setup"] - spent["finish"], 2),
    }
    gpus = 1 if args.device.startswith("cuda") else 0
    hours = wall / 3600
    result["trials_per_hour"] = round(result.get("done", 0) / hours)
    if gpus:
        result["trials_per_gpu_hour"] = result["trials_per_hour"]
        fit_only = max(spent["fit"] - spent["tracking in fit"], 1e-9) / 3600
        result["trials_per_gpu_hour_training_only"] = round(result.get("done", 0) / fit_only)
    if watch.ok:
        result["gpu_memory_mib"] = {"peak used (nvidia-smi)": watch.gpu, "largest process (nvidia-smi)": watch.process,
                                    "pack estimate (K x member_bytes)": round(estimate_mib(spec, args.pack), 1),
                                    "packs on the GPU at once": int(min(1 / args.gpu, args.concurrent))
                                    if args.gpu else None}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    sys.exit(0 if rc == 0 else 1)


# ---------------------------------------------------------------- a pack's memory, in process
MEMORY = """
import json, sys, tempfile
from pathlib import Path
import torch
from trials.runner.levels import run_pack
from trials.spec import from_dict
spec, k = json.loads(sys.argv[1]), int(sys.argv[2])
specs = [from_dict({**spec, "seed": s}) for s in range(k)]
torch.cuda.reset_peak_memory_stats()
with tempfile.TemporaryDirectory() as tmp:
    run_pack(specs, [Path(tmp) / str(i) for i in range(k)])
print(json.dumps({"k": k, "max_memory_allocated": torch.cuda.max_memory_allocated(),
                  "max_memory_reserved": torch.cuda.max_memory_reserved()}))
"""


def memory(args) -> None:
    """torch.cuda.max_memory_allocated of a real pack (run_pack, 3 levels of --iterations)
    against K x member_bytes, the estimate `pack: auto` sizes packs by (orchestrator/plan.py)."""
    spec = base_spec(args.data, args.iterations, "cuda")
    out = []
    for k in args.packs:
        done = subprocess.run([sys.executable, "-c", MEMORY, json.dumps(spec), str(k)], cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            out.append({"k": k, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"})
            continue
        got = json.loads(done.stdout.strip().splitlines()[-1])
        est = estimate_mib(spec, k)
        row = {"k": k, "max_memory_allocated_mib": round(got["max_memory_allocated"] / 2**20, 1),
               "max_memory_reserved_mib": round(got["max_memory_reserved"] / 2**20, 1),
               "estimate_mib": round(est, 1),
               "estimate_over_allocated": round(est / max(got["max_memory_allocated"] / 2**20, 1e-9), 2)}
        out.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------- the one results file
def report(work: Path, out_file: Path) -> None:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").exists() else []:
        name, rc, seconds, limit, log = line.split("\t")
        step = {"step": name, "rc": int(rc), "seconds": int(seconds), "limit_s": int(limit)}
        step["status"] = {0: "ok", 124: "timed out", 137: "timed out", -1: "skipped (out of time)"}.get(
            int(rc), "failed")
        text = Path(log).read_text(errors="replace") if log and Path(log).exists() else ""
        summary = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)\b.* in \d", l)]
        if summary:
            step["tests"] = summary[-1].strip("= ")
        if step["status"] not in ("ok", "skipped (out of time)"):
            step["log_tail"] = text.splitlines()[-40:]
        steps.append(step)
    doc = {"what": "bench/gpu_day.sh: the kit installed, Ray sweeps on the GPU, CUDA and CPU tests",
           "machine": json.loads((work / "machine.json").read_text()) if (work / "machine.json").exists() else {},
           "steps": steps,
           "sweeps": {p.stem.removeprefix("sweep-"): json.loads(p.read_text())
                      for p in sorted(work.glob("sweep-*.json"))},
           "pack_memory": json.loads((work / "memory.json").read_text()) if (work / "memory.json").exists() else None}
    if (work / "pip_check.txt").exists():
        doc["pip_check"] = (work / "pip_check.txt").read_text().splitlines()[:40]
    single = doc["sweeps"].get("single", {}).get("trials_per_hour")
    lines = ["", "step                 status            seconds  tests"]
    lines += [f"{s['step']:20s} {s['status']:17s} {s['seconds']:7d}  {s.get('tests', '')}" for s in steps]
    lines += ["", "sweep     trials  wall s  trials/h (per GPU-hour on a GPU)  vs one per Tune trial  phases (s)"]
    for name, s in doc["sweeps"].items():
        rate = s.get("trials_per_hour", 0)
        vs = f"{rate / single:.1f}x" if single and rate else "-"
        lines.append(f"{name:9s} {s.get('done', 0):6d} {s['wall_s']:7.1f}  {rate:32,d}  {vs:>21s}  "
                     + ", ".join(f"{k.split(' (')[0]} {v}" for k, v in s["phases_s"].items()))
        if "gpu_memory_mib" in s:
            lines.append(f"          GPU memory MiB: {s['gpu_memory_mib']}")
        for k in ("gpu_memory_mib",):
            if k in s:
                doc["sweeps"][name][k] = s[k]
        if single and rate:
            doc["sweeps"][name]["vs_one_per_tune_trial"] = round(rate / single, 2)
    if doc["pack_memory"]:
        lines.append(f"pack memory (in process): {doc['pack_memory']}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(doc, indent=1))
    print("\n".join(lines))
    print(f"\nresults: {out_file}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("root", type=Path)
    s = sub.add_parser("sweep")
    s.add_argument("--name", required=True)
    s.add_argument("--trials", type=int, required=True)
    s.add_argument("--pack", type=int, default=1)
    s.add_argument("--gpu", type=float, default=0.0)
    s.add_argument("--cpu", type=float, default=1.0)
    s.add_argument("--concurrent", type=int, default=4)
    s.add_argument("--device", default="cuda")
    s.add_argument("--iterations", type=int, default=300)
    s.add_argument("--data", required=True)
    s.add_argument("--work", required=True)
    s.add_argument("--out", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--packs", type=int, nargs="+", default=[64, 128])
    m.add_argument("--iterations", type=int, default=30)
    m.add_argument("--data", required=True)
    m.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("work", type=Path)
    r.add_argument("out_file", type=Path)
    args = ap.parse_args()
    if args.cmd == "data":
        data(args.root)
    elif args.cmd == "sweep":
        sweep(args)
    elif args.cmd == "memory":
        memory(args)
    else:
        report(args.work, args.out_file)


if __name__ == "__main__":
    main()
