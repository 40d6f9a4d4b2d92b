"""Sweep efficiency: N equal IMP trials on a local Ray instance, `concurrency` at a time.

    ideal      = sum over trials of the trial's own training seconds / concurrency
    efficiency = ideal / wall

The trial's own seconds are the per-level `seconds` it reports (training, evaluation,
pruning of that level), measured inside the trial while the others run beside it.
Wall is timed two ways: from `lth`'s sweep call to its return (Ray already started),
and including `ray.init` (what a user waits for on a laptop).

    .venv/bin/python bench/sweep_efficiency.py [--trials 6] [--iterations 3000] [--levels 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=3000, help="per level (3000: ~30 s trials)")
    ap.add_argument("--levels", type=int, default=3, help="pruning levels after the dense one")
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()

    import ray

    from orchestrator.sweeps import runner
    from orchestrator.sweep_spec import load_sweep

    with tempfile.TemporaryDirectory() as tmp:
        sweep_file = Path(tmp) / "bench.yaml"
        sweep_file.write_text(yaml.safe_dump({
            "name": "efficiency", "experiment": "bench",
            "base": {"preset": "lenet_digits_quick", "device": "cpu",
                     "train": {"iterations": args.iterations, "eval_interval": 100},
                     "prune": {"levels": args.levels}},
            "space": {"prune.rate": {"grid": [0.2]}},
            "seeds": args.trials, "resources": {"cpu": 1}, "max_concurrent": args.concurrency,
            "storage": str(Path(tmp) / "runs"),
            "tracking_uri": f"sqlite:///{Path(tmp) / 'mlflow.db'}",  # the driver logs every level, as in use
        }))
        sweep = load_sweep(sweep_file)
        started = time.perf_counter()
        ray.init(address="local", num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False)
        ray_ready = time.perf_counter()
        rows = runner.run(sweep)
        finished = time.perf_counter()
        ray.shutdown()

    per_trial: dict = {}
    for r in rows:
        per_trial[r["trial_id"]] = per_trial.get(r["trial_id"], 0.0) + float(r["seconds"])
    own = sum(per_trial.values())
    ideal = own / args.concurrency
    wall, wall_with_init = finished - ray_ready, finished - started
    print(f"{len(per_trial)} trials x {args.levels + 1} levels x {args.iterations} iterations "
          f"(LeNet-300-100, digits), {args.concurrency} concurrent on {args.concurrency} CPUs")
    print(f"trial seconds: mean {own / len(per_trial):.1f} s, sum {own:.1f} s; ideal wall {ideal:.1f} s")
    print(f"sweep wall {wall:.1f} s -> efficiency {ideal / wall:.3f}")
    print(f"with ray.init {wall_with_init:.1f} s -> efficiency {ideal / wall_with_init:.3f}")


if __name__ == "__main__":
    main()
