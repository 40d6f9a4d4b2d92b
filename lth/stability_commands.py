"""`lth stability find`: the earliest rewind iteration k at which a level is stable
(Frankle et al. 2020: instability, the test-error barrier between two copies trained from
k with different SGD noise, below a threshold), by bisection over a grid of k, with real
trials run in this process (trials.runner.levels.run_lottery, as `lth trial run`).

Bisection assumes instability falls as k grows (what the paper found); it trains about
log2(grid size) + 2 trials. Every trial is a full trial folder under OUT/k_<k>/ (spec
stability on at the chosen level), so a rerun resumes and `lth trial run` can inspect one.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import textwrap
from pathlib import Path

from trials import methods
from trials.core.errors import ConfigError, check


def add(commands) -> None:
    stability = commands.add_parser("stability", help="instability analysis (Frankle et al. 2020)")
    sub = stability.add_subparsers(title="stability")
    find = sub.add_parser("find", help="the earliest rewind iteration k whose instability is below a threshold")
    find.add_argument("config", nargs="?", help="trial config YAML (may start with `preset: NAME`)")
    find.add_argument("--preset", help="a shipped paper preset (see `lth trial presets`)")
    find.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override any spec key by its path, e.g. --set train.lr=0.05")
    find.add_argument("--level", default="0",
                      help="the level whose instability is measured: 0 = the dense network (default); "
                      "L = IMP's level L (the trials then run levels 0..L)")
    find.add_argument("--threshold", default="0.02",
                      help="stable = instability below this (fraction; default 0.02, the paper's 2%%)")
    find.add_argument("--grid", help="comma-separated increasing rewind iterations to search "
                      "(default: 0 and the powers of 2 below train.iterations)")
    find.add_argument("--out", help="folder of the trials, one per k in k_<k>/ (default: "
                      "runs/stability/KEY of the base spec)")
    find.set_defaults(func=stability_find)


def default_grid(iterations: int) -> list[int]:
    """0, then 1, 2, 4, ... below `iterations`."""
    return [0] + [2 ** i for i in range(iterations.bit_length()) if 2 ** i < iterations]


def parse_grid(text, iterations: int) -> list[int]:
    if text is None:
        return default_grid(iterations)
    allowed = f"comma-separated increasing integers 0 <= k < train.iterations ({iterations}), e.g. 0,100,500"
    try:
        grid = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("--grid", text, allowed) from None
    check(grid and grid == sorted(set(grid)) and grid[0] >= 0 and grid[-1] < iterations, "--grid", text, allowed)
    return grid


def _number(text: str, kind, key: str, ok, allowed: str):
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(key, text, allowed) from None
    check(ok(value), key, text, allowed)
    return value


def spec_at(base, k: int, level: int):
    """The trial that measures `level`'s instability at rewind iteration k: prune.levels =
    level, stability at that level only (copies as the base spec says, at least 2)."""
    stability = dataclasses.replace(base.stability, copies=max(2, base.stability.copies), levels=(level,))
    try:
        return base.replace(rewind_iteration=k, prune=dataclasses.replace(base.prune, levels=level),
                            stability=stability)
    except ConfigError as e:
        raise ConfigError(e.key, e.value, f"{e.allowed} (in the trial for --level {level} at k={k})") from None


def stability_find(args) -> int:
    from lth.trial_commands import _spec
    from trials.runner.levels import prepare, run_lottery
    from trials.folder.store import TrialDir

    base = _spec(args)
    args.level = _number(args.level, int, "--level", lambda v: v >= 0, "an integer >= 0 (0 = the dense network)")
    args.threshold = _number(args.threshold, float, "--threshold", lambda v: 0 < v < 1,
                             "a fraction 0 < t < 1, e.g. 0.02")
    check(methods.get(base.method).stability, "method", base.method,
          f"allowed for lth stability find: {', '.join(methods.names(stability=True))}")
    grid = parse_grid(args.grid, base.train.iterations)
    specs = [spec_at(base, k, args.level) for k in grid]  # every trial validated before anything runs
    out = Path(args.out or Path("runs") / "stability" / base.key)
    folders = [out / f"k_{k}" for k in grid]
    for spec, folder in zip(specs, folders):
        TrialDir(folder, spec).check()
    data, _ = prepare(specs[0], folders[0])  # the data are the same for every k
    width = shutil.get_terminal_size().columns  # 80 where no terminal says: lines wrap there

    def say(text: str, file=sys.stdout) -> None:
        print(textwrap.fill(text, width, subsequent_indent="  ", break_on_hyphens=False), file=file, flush=True)

    say(f"instability of level {args.level} of {base.model.name} on {base.dataset.name}, stable below "
        f"{100 * args.threshold:.2f}%: bisecting k over {', '.join(map(str, grid))} -> {out}", sys.stderr)

    measured: dict = {}

    def instability(i: int) -> float:
        records = run_lottery(specs[i], folders[i], data=data)
        record = records[args.level]
        value = measured[i] = record.stability_error_barrier
        verdict = "stable" if value < args.threshold else "unstable"
        say(f"k={grid[i]:<6d} instability {100 * value:6.2f}%  {verdict:8s} density {100 * record.density:.3g}%, "
            f"copies' acc {record.stability_acc_a:.4f}/{record.stability_acc_b:.4f}")
        return value

    lo, hi = 0, len(grid) - 1
    if instability(lo) < args.threshold:
        hi = lo
    elif hi == lo or instability(hi) >= args.threshold:
        say(f"no stable k in the grid: instability at k={grid[hi]} is {100 * measured[hi]:.2f}% "
            f">= {100 * args.threshold:.2f}%")
        return 1
    while hi - lo > 1:  # grid[lo] unstable, grid[hi] stable
        mid = (lo + hi) // 2
        if instability(mid) < args.threshold:
            hi = mid
        else:
            lo = mid
    before = f"; k={grid[lo]}: {100 * measured[lo]:.2f}%" if lo != hi else ""
    say(f"earliest stable rewind iteration: k={grid[hi]} (instability {100 * measured[hi]:.2f}% < "
        f"{100 * args.threshold:.2f}%{before})")
    return 0
