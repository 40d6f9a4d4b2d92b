"""A sweep's bookkeeping at the rate of a GPU (issue 32): tiny trials, so that what a sweep
spends besides training shows. LeNet-300-100 on the bundled digits, `--iterations` (10)
iterations, the dense level and `--levels` (1) pruning, a grid of prune.rate x 16 seeds,
`max_concurrent` 2, `pack` 64, an SQLite MLflow store made before the runs; each size a
whole `lth sweep run` process in a fresh folder.

    trials/s        trials / wall of the process
    steady          the slope between the two sizes: (N2 - N1) / (wall2 - wall1)
    ms per trial    wall / trials, and where it went (seconds per trial of each kind, timed
                    inside the driver and the Ray workers by bench/bookkeeping_hook):
        training        the levels' own `seconds` (a pack's level once, not once per member)
        trial folder    the engine writing trial folders (spec, rewind, level files, nodes)
        checkpoints     the trainable's checkpoints to Tune (and restores)
        units           shared work units: claims, publishing, listings
        mlflow          the driver's MLflow callbacks in Tune's loop while the sweep runs, and
                        the end's wait for the queued writes and replay (the writes made off
                        the loop are printed apart as `mlflow writer`: they overlap the rest)
        tables          the end: trials.csv and the tables
        tune (rest)     wall less the above (workers' seconds divided by `max_concurrent`,
                        as they run side by side): Ray and Tune's own work, process starts
    storage         bytes and files per trial under the sweep's storage (sweep folder and
                    _units), and in MLflow (artifacts and the database)
    tables          with --tables: after the sweep, seconds of `lth sweep status NAME`,
                    `lth report table` and `lth tickets best` as whole processes (what a
                    user waits for, imports included)

Worker seconds are each Ray worker's own wall clock, so on a loaded machine they stretch
and `tune (rest)` can come out negative: report the load with the numbers.

`--ref COMMIT` runs the same sizes with that commit's code first (`git archive` of lth,
orchestrator and trials, first on PYTHONPATH): before and after on one machine, one load.

    .venv/bin/python bench/sweep_bookkeeping.py [--sizes 256 1024] [--pack 64] [--ref main] [--json out.json]
        [--tables] [--keep DIR]
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
HOOK = Path(__file__).resolve().parent / "bookkeeping_hook"
SEEDS = 16
KINDS = ["training", "trial folder", "checkpoints", "units", "mlflow", "tables", "tune (rest)"]


def sweep_yaml(name: str, trials: int, args, tmp: Path) -> str:
    configs = trials // SEEDS
    rates = [round(0.05 + 0.85 * i / max(1, configs - 1), 6) for i in range(configs)]
    extra = "".join(f"{line}\n" for line in args.extra)
    return (f"name: {name}\nexperiment: {name}\n"
            f"base: {{preset: lenet_digits_quick, train: {{iterations: {args.iterations}, "
            f"eval_interval: {args.iterations}}}, prune: {{levels: {args.levels}}}}}\n"
            f"space: {{prune.rate: {{grid: {json.dumps(rates)}}}}}\n"
            f"seeds: {SEEDS}\nmax_concurrent: {args.concurrent}\npack: {args.pack}\n"
            f"resources: {{cpu: 1}}\nstorage: {tmp / 'runs'}\ntracking_uri: sqlite:///{tmp / 'mlflow' / 'mlflow.db'}\n"
            + extra)


def tree(path: Path) -> tuple[int, int]:
    """(bytes, files) under `path`."""
    size = files = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                size += os.lstat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                pass
    return size, files


def model_bytes() -> int:
    """The fp32 size of LeNet-300-100's parameters on 8x8 digits (64-300-100-10, with biases)."""
    return (64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10) * 4


def archive(ref: str, into: Path) -> Path:
    """The code of `ref` (lth, orchestrator, trials) in `into`."""
    import tarfile

    blob = subprocess.run(["git", "-C", str(REPO), "archive", ref, "lth", "orchestrator", "trials"],
                          check=True, capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=__import__("io").BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def one(trials: int, args, code: Path = REPO) -> dict:
    with tempfile.TemporaryDirectory(prefix="lth-books-") as t:
        tmp = Path(t)
        if args.keep:  # the sweep's folder stays, for the reading commands or a profiler
            tmp = Path(args.keep) / f"books{trials}-{time.strftime('%Y%m%d-%H%M%S')}"
            tmp.mkdir(parents=True)
        (tmp / "mlflow").mkdir()
        (tmp / "times").mkdir()
        name = f"books{trials}"
        (tmp / "sweep.yaml").write_text(sweep_yaml(name, trials, args, tmp))
        env = {**os.environ, "PYTHONPATH": f"{HOOK}:{code}", "LTH_BENCH_TIMES": str(tmp / "times")}
        env.pop("MLFLOW_TRACKING_URI", None)
        load = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lth", "sweep", "run", "sweep.yaml"], cwd=tmp, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"sweep failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        answers = tables(name, tmp, code) if args.tables else {}
        times: dict = {}
        for f in (tmp / "times").glob("*.json"):
            for k, v in json.loads(f.read_text()).items():
                times[k] = times.get(k, 0.0) + v
        import csv

        rows = list(csv.DictReader(open(tmp / "runs" / name / "trials.csv")))
        done = {r["trial_id"] for r in rows if r.get("level") not in (None, "")}
        pack_levels: dict = {}
        for r in rows:
            if r.get("seconds"):
                key = (r["trial_id"].rsplit("_", 1)[0], r["level"])
                pack_levels[key] = max(pack_levels.get(key, 0.0), float(r["seconds"]))
        training = sum(pack_levels.values())
        storage = tree(tmp / "runs")
        mlflow = tree(tmp / "mlflow")
        c = args.concurrent
        spent = {"training": training / c, "trial folder": times.get("folder", 0.0) / c,
                 "checkpoints": times.get("checkpoints", 0.0) / c, "units": times.get("units", 0.0) / c,
                 "mlflow": times.get("mlflow", 0.0) + times.get("mlflow end", 0.0),
                 "tables": times.get("tables and end", 0.0) - times.get("mlflow end", 0.0)}
        spent["tune (rest)"] = wall - sum(spent.values())
        return {"trials": trials, "finished": len(done), "wall_s": wall, "trials_per_s": trials / wall,
                "load_before": load, "load_after": os.getloadavg(),
                "ms_per_trial": {k: 1000 * v / trials for k, v in spent.items()},
                "worker_s": {k: v for k, v in times.items()},
                "storage_bytes_per_trial": storage[0] / trials, "storage_files_per_trial": storage[1] / trials,
                "mlflow_bytes_per_trial": mlflow[0] / trials, "mlflow_files_per_trial": mlflow[1] / trials,
                "storage_bytes": storage[0], "storage_files": storage[1],
                "mlflow_bytes": mlflow[0], "mlflow_files": mlflow[1], "tables_s": answers}


def tables(name: str, tmp: Path, code: Path) -> dict:
    """Seconds of each reading command on the finished sweep, as whole processes."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
    commands = {"sweep status": ["sweep", "status", name, "--storage", str(tmp / "runs")],
                # the trials differ in prune.rate, so a level is no density: target densities
                "report table": ["report", "table", "--experiment", name, "--rows", "prune.kind",
                                 "--density", "1,0.5,0.2", "--tracking-uri", uri],
                "tickets best": ["tickets", "best", "--experiment", name, "--tracking-uri", uri]}
    out = {}
    for label, argv in commands.items():
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lth", *argv], cwd=tmp, env=env, capture_output=True, text=True)
        out[label] = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="trials per sweep (multiples of 16)")
    ap.add_argument("--pack", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--levels", type=int, default=1)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--extra", action="append", default=[], help="a line added to the sweep file (a setting)")
    ap.add_argument("--ref", help="first measure this commit's code (e.g. main)")
    ap.add_argument("--tables", action="store_true", help="time the reading commands after each sweep")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--keep", metavar="DIR", help="run each sweep in a new folder under DIR and keep it")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="lth-ref-") as tmp:
        codes = {args.ref: archive(args.ref, Path(tmp))} if args.ref else {}
        codes["this tree"] = REPO
        for label, code in codes.items():
            print(f"== {label} ==", flush=True)
            results[label] = measure(args, code)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def measure(args, code: Path) -> list:
    fp32 = model_bytes()
    out = []
    for n in args.sizes:
        r = one(n, args, code)
        out.append(r)
        print(f"{n} trials: {r['wall_s']:.1f} s wall, {r['trials_per_s']:.1f} trials/s "
              f"(load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}); ms per trial: "
              + ", ".join(f"{k} {r['ms_per_trial'][k]:.1f}" for k in KINDS), flush=True)
        print(f"  storage {r['storage_bytes_per_trial'] / 1e6:.3f} MB/trial ({r['storage_bytes_per_trial'] / fp32:.2f}x "
              f"the fp32 model, {fp32 / 1e3:.0f} kB), {r['storage_files_per_trial']:.1f} files/trial; "
              f"MLflow {r['mlflow_bytes_per_trial'] / 1e6:.3f} MB/trial, {r['mlflow_files_per_trial']:.1f} files/trial",
              flush=True)
        if r["worker_s"].get("mlflow writer"):
            print(f"  mlflow writer (driver thread, overlapped): "
                  f"{1000 * r['worker_s']['mlflow writer'] / n:.1f} ms per trial", flush=True)
        if r["tables_s"]:
            print("  answers: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["tables_s"].items()), flush=True)
    if len(out) >= 2:
        a, b = out[0], out[-1]
        steady = (b["trials"] - a["trials"]) / (b["wall_s"] - a["wall_s"])
        print(f"steady: {steady:.1f} trials/s ({1000 / steady:.0f} ms per trial), "
              f"between {a['trials']} and {b['trials']} trials")
        out.append({"steady_trials_per_s": steady})
    return out


if __name__ == "__main__":
    main()
