"""The README's instability figure: dense Conv-2 on bundled digits (the base spec of
sweeps/stability_conv2_digits.yaml), instability of level 0 against the rewind iteration
k, trials run in this process (no Ray, no MLflow), drawn by analysis.instability_curves.

    .venv/bin/python bench/stability_curve.py [OUT.png] [--seeds 3]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import instability_curves  # noqa: E402
from orchestrator.config import trial_spec  # noqa: E402
from trials.runner.levels import run_lottery  # noqa: E402

BASE = ["model=conv2", "train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9", "train.iterations=400",
        "train.eval_interval=40", "prune.levels=0", "stability.copies=2", "stability.levels=[0]", "device=cpu"]
GRID = (0, 4, 16, 64, 256)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="docs/stability_conv2_digits.png")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in range(args.seeds):
        for k in GRID:
            spec = trial_spec(None, "lenet_digits_quick", [*BASE, f"seed={seed}", f"rewind_iteration={k}"])
            with tempfile.TemporaryDirectory() as tmp:
                record = run_lottery(spec, Path(tmp) / "trial")[0]
            rows.append({"seed": seed, "rewind_iteration": k, "retrain": spec.retrain, **record.flat()})
            print(f"seed {seed} k={k:<4d} instability {100 * record.stability_error_barrier:5.2f}%  loss barrier "
                  f"{record.stability_loss_barrier:.3f}  ends {record.stability_acc_a:.4f} / "
                  f"{record.stability_acc_b:.4f}", flush=True)
    df = pd.DataFrame(rows)
    summary = df.groupby("rewind_iteration")["stability_error_barrier"].agg(["mean", "std"]) * 100
    print(summary.round(2).to_string())
    print("wrote", instability_curves(df, [], args.out))


if __name__ == "__main__":
    main()
