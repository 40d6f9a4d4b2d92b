"""Shared work against `share: false` on the ablation grid of issue 10, in one run.

    grid   prune.kind {unstructured, structured} x rewind_iteration {0, 30}
           x control {none, reinit, random_prune} x 3 seeds = 36 trials
    trial  LeNet-300-100 on scikit-learn's digits (preset lenet_digits_quick), L = 4 levels

Both sweeps run on one local Ray instance (`--concurrency` trials at a time), each on
fresh storage and a fresh MLflow store, so nothing is reused from elsewhere. Reported:

    iterations  optimizer steps trained, counted from what was stored: shared = every unit
                trained (STORAGE/_units/_log) + the controls' own levels; unshared = every
                trial's levels + the IMP levels each control reran (its imp/levels.jsonl)
    wall        the sweep call, from start to its return (Ray already up)
    busy        seconds spent training / (wall x concurrency): how little the workers idled
    waited      seconds trials sat waiting on a unit another trial held (nothing else ready)

Records must be identical (seconds aside); the script says so or fails.

    .venv/bin/python bench/sweep_sharing.py [--iterations 400] [--seeds 3] [--concurrency 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml


def sweep_file(folder: Path, name: str, share: bool, args) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "experiment": name,
        "base": {"preset": "lenet_digits_quick", "device": "cpu",
                 "train": {"iterations": args.iterations, "eval_interval": args.iterations // 10},
                 "prune": {"levels": 4}},
        "space": {"prune.kind": {"grid": ["unstructured", "structured"]}, "rewind_iteration": {"grid": [0, 30]},
                  "control": {"grid": ["none", "reinit", "random_prune"]}},
        "seeds": args.seeds, "resources": {"cpu": 1}, "max_concurrent": args.concurrency, "share": share,
        "storage": str(folder / "runs"), "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
    }))
    return path


def run(folder: Path, name: str, share: bool, args) -> dict:
    from ray.tune import ExperimentAnalysis

    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps import runner
    from orchestrator.sweeps.units import trained_log

    sweep = load_sweep(sweep_file(folder, name, share, args))
    started = time.perf_counter()
    runner.run(sweep)
    wall = time.perf_counter() - started
    df = pd.read_csv(folder / "runs" / name / "trials.csv")
    own = df[(df.control != "none") & (df.level >= 1)] if share else df
    iterations, seconds = int(own.iterations.sum()), float(own.seconds.sum())
    if share:
        log = trained_log(str(folder / "runs"))
        iterations += sum(e["iterations"] for e in log)
        seconds += sum(e["seconds"] for e in log)
        units = len(log)
    else:
        units = 0
        for trial in (folder / "runs" / name).iterdir():
            newest = {}  # a Tune trial's member folder -> its control's IMP rerun, in its newest checkpoint
            for levels in sorted(trial.glob("checkpoint_*/m*/imp/levels.jsonl")):
                newest[levels.parent.parent.name] = levels
            for levels in newest.values():
                reran = [json.loads(line) for line in levels.read_text().splitlines()]
                iterations += sum(r["iterations"] for r in reran if r["level"] >= 1)
                seconds += sum(r["seconds"] for r in reran if r["level"] >= 1)
    waited = sum((t.last_result or {}).get("unit_wait_s", 0.0)
                 for t in ExperimentAnalysis(str(folder / "runs" / name)).trials)
    return {"df": df, "wall": wall, "iterations": iterations, "seconds": seconds, "units": units,
            "waited": waited, "trials": df.trial_id.nunique()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=400, help="per level (the preset's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()

    import ray

    ray.init(address="local", num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        warm = argparse.Namespace(**{**vars(args), "seeds": 1, "iterations": 40})
        (Path(tmp) / "warm").mkdir()
        run(Path(tmp) / "warm", "warmup", False, warm)  # worker start-up and imports, not timed
        results = {}
        for name, share in (("shared", True), ("unshared", False)):
            folder = Path(tmp) / name
            folder.mkdir()
            results[name] = run(folder, name, share, args)
    ray.shutdown()

    s, u = results["shared"], results["unshared"]
    cols = [c for c in s["df"].columns if c not in ("trial_id", "seconds", "node_id")]
    key = ["trial_key", "level"]
    same = s["df"][cols].sort_values(key).reset_index(drop=True).equals(u["df"][cols].sort_values(key).reset_index(drop=True))
    print(f"{s['trials']} trials x 5 levels, LeNet-300-100 on digits, {args.iterations} iterations per level, "
          f"{args.concurrency} at a time")
    print(f"{'':10} {'iterations':>11} {'wall s':>8} {'busy':>6} {'waited s':>9}")
    for name, r in results.items():
        busy = r["seconds"] / (r["wall"] * args.concurrency)
        print(f"{name:10} {r['iterations']:>11,} {r['wall']:>8.1f} {busy:>6.0%} {r['waited']:>9.1f}")
    print(f"sharing: {1 - s['iterations'] / u['iterations']:.0%} fewer iterations, "
          f"{1 - s['wall'] / u['wall']:.0%} less wall time, {s['units']} units trained once each; "
          f"records identical: {same}")
    if not same:
        raise SystemExit("records differ between shared and unshared sweeps")


if __name__ == "__main__":
    main()
