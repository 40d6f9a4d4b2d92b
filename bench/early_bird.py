"""Early-bird tickets at CPU size (README, "Early-bird tickets"): the early-bird ticket
(method=early_bird, weight rewinding to k), IMP with early-bird levels
(early_bird.imp_levels) and IMP with rewinding, on LeNet-300-100 / real MNIST (the t10k
files split 8,000 / 2,000 as bench/trial_speed.py does) and Conv-2 / the bundled digits;
the dense network is IMP's level 0. Per method, seed and density: test accuracy (after the
last iteration), the iterations the ticket cost (trials/folder/record.py cost_iterations; IMP:
levels 0..L) and the iterations the whole trial trained.

    python bench/early_bird.py --out runs/early_bird            # all cases, seeds 0-2
    python bench/early_bird.py --out runs/early_bird --report   # table and plot of what has run

Trials run one after another in this process, in folders under --out (a rerun resumes:
finished levels are kept), with a line per level on stdout; then
--out/early_bird.md (the table) and --out/early_bird.png (accuracy against density, and
against iterations spent) are written.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.trial_speed import MNIST_T10K, mnist_root  # noqa: E402
from trials.runner.levels import run_lottery  # noqa: E402
from trials.spec import from_dict  # noqa: E402
from trials.folder.store import TrialDir  # noqa: E402

EARLY = {"interval": 30, "window": 5, "epsilon": 0.1}  # the paper's window and epsilon; a draw every 30 iterations
TRAIN = {"optimizer": "adam", "batch_size": 60, "iterations": 600, "eval_interval": 30}
CASES = {
    "lenet_mnist": {"model": {"name": "lenet_300_100", "init": "xavier_normal"},
                    "dataset": {"name": "mnist", "validation": 1000}, "train": {**TRAIN, "lr": 1.2e-3},
                    "prune": {"rate": 0.45, "output_rate": 0.1, "levels": 5}},
    "conv2_digits": {"model": {"name": "conv2", "init": "xavier_normal"}, "dataset": {"name": "digits"},
                     "train": {**TRAIN, "lr": 1e-3},
                     "prune": {"rate": 0.45, "layer_rates": {"features.0": 0.2, "features.2": 0.2},
                               "output_rate": 0.1, "levels": 5}},
}
K = 12  # rewind iteration of every method (2% of the run)
METHODS = {
    "imp": {"method": "imp"},
    "imp_early_levels": {"method": "imp", "early_bird": {**EARLY, "imp_levels": True}},
    "early_bird": {"method": "early_bird", "early_bird": EARLY},
    "early_bird_strict": {"method": "early_bird", "early_bird": {**EARLY, "epsilon": 0.02}},
}
LABELS = {"imp": "IMP, rewinding", "imp_early_levels": "IMP, early-bird levels", "early_bird": "early-bird ticket",
          "early_bird_strict": "early-bird ticket, ε 0.02"}


def spec(case: str, method: str, seed: int, data_dir):
    data = {**CASES[case], **METHODS[method], "seed": seed, "rewind_iteration": K, "device": "cpu"}
    if data_dir is not None:
        data["dataset"] = {**data["dataset"], "data_dir": str(data_dir)}
    return from_dict(data)


def run(out: Path, cases: list, seeds: list) -> None:
    mnist = mnist_root(out / "mnist8k")
    for case in cases:
        if case == "lenet_mnist" and mnist is None:
            print(f"skipping {case}: no t10k files in {MNIST_T10K} (set LTH_MNIST_T10K)", flush=True)
            continue
        for seed in seeds:
            for method in METHODS:
                s = spec(case, method, seed, mnist if case == "lenet_mnist" else None)
                started = time.time()

                def told(record, folder, case=case, method=method, seed=seed):
                    print(f"{case} {method} seed {seed} level {record.level}: density {record.density:.4f} "
                          f"acc {record.test_acc:.4f} iterations {record.iterations}"
                          + (f" drawn at {record.early_bird_iteration}" if record.early_bird_iteration is not None else "")
                          + f" ({time.time() - started:.0f} s)", flush=True)

                run_lottery(s, out / case / method / str(seed), report=told)


def records(out: Path) -> "pd.DataFrame":
    import pandas as pd

    rows = []
    for case in CASES:
        for method in METHODS:
            for folder in sorted((out / case / method).glob("*")):
                if not (folder / "levels.jsonl").exists():
                    continue
                s = from_dict(__import__("json").loads((folder / "spec.json").read_text())["spec"])
                recs = [TrialDir(folder, s).record(lv) for lv in range(s.prune.levels + 1)
                        if TrialDir(folder, s).done(lv)]
                if len(recs) != s.prune.levels + 1:
                    continue  # unfinished
                spent = 0
                for r in recs:
                    spent += r.iterations
                    cost = r.cost_iterations if r.cost_iterations is not None else spent
                    rows.append({"case": case, "method": method, "seed": s.seed, "level": r.level,
                                 "density": r.density, "test_acc": r.test_acc, "iterations": r.iterations,
                                 "cost": cost, "drawn": r.early_bird_iteration, "stable": r.early_bird_stable})
    return pd.DataFrame(rows)


def table(df) -> str:
    out = []
    for case, rows in df.groupby("case", sort=False):
        seeds = rows.seed.nunique()
        out.append(f"**{case}** ({seeds} seeds; test accuracy %, mean ± std; in brackets the iterations that "
                   "density's network cost, mean)\n")
        present = [m for m in METHODS if m in set(rows.method)]
        out.append("| level | density | " + " | ".join(LABELS[m] for m in present) + " |")
        out.append("|---|---|" + "---|" * len(present))
        for level, at in rows.groupby("level"):
            cells = []
            for m in present:
                x = at[at.method == m]
                if x.empty:
                    cells.append("")
                    continue
                drawn = f", drawn at {x.drawn.mean():.0f}" if x.drawn.notna().any() else ""
                cells.append(f"{100 * x.test_acc.mean():.2f} ± {100 * x.test_acc.std(ddof=0):.2f} "
                             f"({x.cost.mean():.0f}{drawn})")
            out.append(f"| {level} | {100 * at.density.mean():.1f}% | " + " | ".join(cells) + " |")
        totals = rows.groupby(["method", "seed"]).iterations.sum().groupby("method").mean()
        out.append("\nIterations each trial trained in all (every density), mean over seeds: "
                   + "; ".join(f"{LABELS[m]} {totals[m]:.0f}"
                               + (f" ({totals[m] / totals['imp']:.2f}x IMP's)" if m != "imp" and "imp" in totals else "")
                               for m in METHODS if m in totals) + ".\n")
    return "\n".join(out)


def plot(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(df.case))
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 4 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        rows = df[df.case == case]
        dense = rows[(rows.method == "imp") & (rows.level == 0)].test_acc.mean()
        for m in METHODS:
            x = rows[rows.method == m].groupby("level").agg(density=("density", "mean"), acc=("test_acc", "mean"),
                                                           sd=("test_acc", "std"), cost=("cost", "mean"))
            x = x[x.index > 0]  # level 0: the dense network (IMP's, full length) is the dashed line
            if x.empty:
                continue
            line = row[0].errorbar(100 * x.density, 100 * x.acc, yerr=100 * x.sd.fillna(0), marker="o", capsize=2,
                                   label=LABELS[m])
            row[1].scatter(x.cost, 100 * x.acc, color=line[0].get_color(), label=LABELS[m])
        for ax in row:
            ax.axhline(100 * dense, color="grey", ls="--", lw=1, label="dense (IMP level 0)")
        row[0].set(xscale="log", xlabel="weights kept (%)", ylabel="test accuracy (%)", title=f"{case}: accuracy")
        row[0].set_xticks([50, 30, 20, 10, 5], ["50", "30", "20", "10", "5"])
        row[0].minorticks_off()
        row[0].invert_xaxis()
        row[1].set(xlabel="iterations trained to get that network (cost_iterations)", ylabel="test accuracy (%)",
                   title=f"{case}: accuracy against iterations spent")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/early_bird"))
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--report", action="store_true", help="only the table and plot of what has run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.report:
        run(args.out, args.cases, args.seeds)
    df = records(args.out)
    if df.empty:
        print("nothing finished yet")
        return 0
    text = table(df)
    (args.out / "early_bird.md").write_text(text + "\n")
    plot(df, args.out / "early_bird.png")
    print(text)
    print(f"wrote {args.out / 'early_bird.md'} and {args.out / 'early_bird.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
