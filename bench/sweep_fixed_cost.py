"""The fixed cost of a sweep: a one-trial `lth sweep run` against `lth trial run` of the
same trial, both as whole processes (what a user waits for), and where the sweep's time goes.

The trial: the lenet_digits_quick preset at train.iterations=20 (eval every 10), its 4
levels; the sweep: that trial alone (seeds: 1), its storage a fresh temporary folder per
run, its MLflow store one SQLite file made before the runs (a user's next sweep; a
store's first use adds MLflow's schema migrations, seconds once). The sweep runs in a child process that times, from the inside,
the functions of each phase (wrapped before `lth.cli.main` runs; nothing in lth is changed):

    process start    interpreter start and lth's imports, to main()
    checks           main() up to Ray's start: the sweep file, its checks, less tracking's
    ray start        orchestrator.sweeps.runner.init_ray
    broker           the shared-work broker (runner._share)
    first trial      Tuner.fit() start to the first level's training start (the first
                     result's arrival less that level's `seconds`): Tune's start, the
                     trial's worker, its imports and data
    training         the levels' `seconds` (what `lth trial run` also spends)
    tune rest        the rest of fit(): results and checkpoints handed over, the trial's end
    tracking         MLflow: the store checked (the part of it not under Ray's start, where
                     it runs on a thread of its own), the tracker opened, the live callbacks
    sync             the end-of-sweep replay into MLflow (runner.replay)
    tables           trials.csv and the end-of-sweep tables (results.collect, write_csv,
                     summary_table, status_report)
    exit             main()'s return to the process's end (Ray's shutdown, the interpreter's end)

`--ref REF` runs the same against the code of a commit (`git archive REF` of lth,
orchestrator and trials, first on PYTHONPATH; default: none), alternating with this tree.

    .venv/bin/python bench/sweep_fixed_cost.py [--repeats 3] [--ref COMMIT]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRIAL = ["--preset", "lenet_digits_quick", "--set", "train.iterations=20", "--set", "train.eval_interval=10"]
SWEEP = """name: {name}
experiment: one
base: {{preset: lenet_digits_quick, train: {{iterations: 20, eval_interval: 10}}}}
seeds: 1
storage: ./runs
tracking_uri: sqlite:///{store}/mlflow.db
"""
PHASES = ["process start", "checks", "ray start", "broker", "first trial", "training", "tune rest", "tracking",
          "sync", "tables", "exit"]


def child(sweep_file: str, out: str, t0: float) -> None:
    """Run `lth sweep run` in this process with each phase's functions timed."""
    spent: dict = {}
    marks: dict = {"main": time.time()}

    def timed(owner, name, phase):
        fn = getattr(owner, name, None)
        if fn is None:  # an older commit without it
            return

        def wrapper(*a, **k):
            start = time.time()
            try:
                return fn(*a, **k)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.time() - start
                marks.setdefault(f"{phase}:start", start)
                marks.setdefault(f"{phase}:end", time.time())

        setattr(owner, name, wrapper)

    from ray import tune

    from lth.cli import main
    from orchestrator.sweeps import callbacks, results, runner
    from orchestrator.tracking import store
    try:
        from trials.folder.record import LevelRecord
    except ImportError:  # a commit before trials/ in wings (--ref)
        from trials.record import LevelRecord

    timed(runner, "init_ray", "ray start")
    timed(runner, "_share", "broker")
    timed(runner, "replay", "sync")
    timed(store, "check_reachable", "store check")
    timed(store.SweepTracker, "__init__", "tracking")
    for name in ("on_trial_start", "on_checkpoint", "on_trial_complete", "on_trial_error"):
        timed(callbacks.MlflowLogger, name, "tracking live")
    for name in ("collect", "write_csv", "summary_table", "status_report"):
        timed(results, name, "tables")
    timed(tune.Tuner, "fit", "fit")
    seconds: list = []
    on_result = callbacks.LevelProgress.on_trial_result

    def result(self, iteration, trials, trial, result, **info):
        for new in result.get("pack_new", ()):
            s = LevelRecord.from_flat(new).seconds
            marks.setdefault("first level start", time.time() - s)
            seconds.append(s)
        return on_result(self, iteration, trials, trial, result, **info)

    callbacks.LevelProgress.on_trial_result = result

    def record(argv=None):
        code = main(argv)
        write(code, time.time())
        return code

    def write(code: int, end: float) -> None:
        fit_start = marks.get("fit:start", end)
        first = marks.get("first level start", fit_start) - fit_start
        # the store's check: before Ray's start (older code), or on a thread of its own while
        # Ray starts: what of it lies before Ray's start counts as tracking, not checks; what
        # overlaps Ray's start, as Ray's start; what outlasts it, as tracking
        ray_start, ray_end = marks.get("ray start:start", end), marks.get("ray start:end", end)
        check_start, check_end = marks.get("store check:start", end), marks.get("store check:end", end)
        check_before = max(0.0, min(check_end, ray_start) - check_start)
        check_after = max(0.0, check_end - max(ray_end, check_start))
        phases = {"process start": marks["main"] - t0, "checks": ray_start - marks["main"] - check_before,
                  "ray start": spent.get("ray start", 0.0), "broker": spent.get("broker", 0.0),
                  "first trial": first, "training": sum(seconds),
                  "tune rest": spent.get("fit", 0.0) - first - sum(seconds) - spent.get("tracking live", 0.0),
                  "tracking": check_before + check_after + spent.get("tracking", 0.0) + spent.get("tracking live", 0.0),
                  "sync": spent.get("sync", 0.0), "tables": spent.get("tables", 0.0)}
        Path(out).write_text(json.dumps({"code": code, "phases": phases, "main_end": end, "levels": len(seconds)}))

    import lth.cli

    lth.cli.main = record  # then the program's own end, as `lth` ends (lth.cli.entry where it exists)
    sys.argv = ["lth", "sweep", "run", sweep_file]
    if hasattr(lth.cli, "entry"):
        lth.cli.entry()
    sys.exit(record())


def run_once(kind: str, code_path: Path | None, store: Path, name: str) -> dict:
    """One whole process in a fresh folder: its wall seconds, and the sweep's phases. The
    MLflow store is one that exists already (a user's second sweep)."""
    env = {**os.environ, "PYTHONPATH": str(code_path or REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="lth-fixed-") as tmp:
        if kind == "sweep":
            (Path(tmp) / "one.yaml").write_text(SWEEP.format(name=name, store=store))
            t0 = time.time()
            cmd = [sys.executable, __file__, "--child", "one.yaml", "phases.json", repr(t0)]
        else:
            t0 = time.time()
            cmd = [sys.executable, "-m", "lth", "trial", "run", *TRIAL, "--out", "trial"]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{kind} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        out = {"wall": wall}
        if kind == "sweep":
            data = json.loads((Path(tmp) / "phases.json").read_text())
            if data["code"] != 0 or data["levels"] == 0:
                raise SystemExit(f"sweep failed ({data}):\n{proc.stderr[-3000:]}")
            out["phases"] = {**data["phases"], "exit": t0 + wall - data["main_end"]}
        return out


def archive(ref: str, into: Path) -> Path:
    """The code of `ref` (lth, orchestrator, trials) in `into`."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", ref, "lth", "orchestrator", "trials"],
                          check=True, capture_output=True).stdout
    tar = into / "code.tar"
    tar.write_bytes(blob)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref", help="also measure this commit's code (e.g. HEAD~3, main)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lth-ref-") as tmp:
        codes = {"tree": None}
        if args.ref:
            codes[args.ref] = archive(args.ref, Path(tmp))
        runs: dict = {(name, kind): [] for name in codes for kind in ("sweep", "trial")}
        store = Path(tmp) / "store"
        store.mkdir()  # made once, untimed: a store's first use adds MLflow's schema migrations
        subprocess.run([sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                        "MlflowClient(sys.argv[1]).search_experiments()", f"sqlite:///{store}/mlflow.db"], check=True,
                       capture_output=True)
        for r in range(args.repeats):  # alternate, so that the machine's load falls on all alike
            for name, path in codes.items():
                for kind in ("sweep", "trial"):
                    runs[name, kind].append(run_once(kind, path, store, f"one-{list(codes).index(name)}-{r}"))
                    print(f"# {r + 1}/{args.repeats} {name} {kind}: {runs[name, kind][-1]['wall']:.1f} s",
                          file=sys.stderr, flush=True)
    print(f"one-trial sweep vs `lth trial run` ({os.cpu_count()} CPUs), median of {args.repeats}, seconds")
    header = f"{'':16}" + "".join(f"{name:>12}" for name in codes)
    print(header)
    for phase in PHASES:
        print(f"  {phase:14}" + "".join(
            f"{statistics.median(x['phases'][phase] for x in runs[name, 'sweep']):12.2f}" for name in codes))
    for kind in ("sweep", "trial"):
        print(f"{kind + ' (wall)':16}" + "".join(
            f"{statistics.median(x['wall'] for x in runs[name, kind]):12.2f}" for name in codes))
    print(f"{'sweep / trial':16}" + "".join(
        f"{statistics.median(s['wall'] / t['wall'] for s, t in zip(runs[name, 'sweep'], runs[name, 'trial'])):12.2f}"
        for name in codes))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        main()
