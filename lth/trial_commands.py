"""`lth trial ...`: one IMP run in this process, with its console output."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from trials.errors import ConfigError


def add(commands) -> None:
    trial = commands.add_parser("trial", help="one IMP run, in this process").add_subparsers(title="trial")

    run = trial.add_parser("run", help="run or resume one trial")
    run.add_argument("config", nargs="?", help="trial config YAML (may start with `preset: NAME`)")
    run.add_argument("--preset", help="a shipped paper preset (see `lth trial presets`)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any spec key by its path, e.g. --set prune.rate=0.3")
    run.add_argument("--out", help="trial folder (default: runs/trials/KEY)")
    run.set_defaults(func=trial_run)

    show = trial.add_parser("show", help="print the resolved spec and its key")
    show.add_argument("config", nargs="?")
    show.add_argument("--preset")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=trial_show)

    trial.add_parser("presets", help="list the shipped presets").set_defaults(func=trial_presets)


def _spec(args):
    from orchestrator.config import trial_spec

    if not args.config and not args.preset:
        raise ConfigError("config", None, "give a config file or --preset NAME")
    return trial_spec(args.config, args.preset, args.overrides)


def trial_show(args) -> int:
    import yaml

    spec = _spec(args)
    print(f"# key: {spec.key}")
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
    return 0


def trial_presets(args) -> int:
    from orchestrator.config import PRESETS_DIR, preset_names

    for name in preset_names():
        first = (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:28s} {first}")
    return 0


def trial_run(args) -> int:
    from trials.lottery import prepare, run_lottery

    spec = _spec(args)
    out = Path(args.out or Path("runs") / "trials" / spec.key)
    data, _ = prepare(spec, out)  # every input error surfaces here, before any write
    print(f"trial {spec.key}: {spec.model.name} on {spec.dataset.name}, {spec.prune.levels} levels "
          f"x {spec.train.iterations} iterations -> {out}", file=sys.stderr)
    progress = Progress(spec.prune.levels)
    records = run_lottery(spec, out, report=progress.level_done, progress=progress.step, data=data)
    print(records_table(records))
    return 0


class Progress:
    """One line per finished level, and a line at most every `every_seconds` within a level."""

    def __init__(self, levels: int, every_seconds: float = 10.0):
        self.levels, self.every, self.last = levels, every_seconds, time.monotonic()

    def step(self, level: int, iteration: int, total: int, val_loss: float) -> None:
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(f"  level {level}/{self.levels}  iteration {iteration}/{total}  val_loss {val_loss:.4f}",
                  file=sys.stderr, flush=True)

    def level_done(self, r: dict, out) -> None:
        print(f"level {r['level']}/{self.levels} done: density {r['density']:.4f}  test_acc {r['test_acc']:.4f}"
              f"  early stop {r['early_stop_iteration']} ({r['test_acc_at_early_stop']:.4f})"
              f"  {r['seconds']:.1f} s", file=sys.stderr, flush=True)
        self.last = time.monotonic()


def records_table(records: list) -> str:
    head = f"{'level':>5} {'density':>8} {'params':>9} {'test_acc':>9} {'es_iter':>8} {'es_acc':>8} {'seconds':>8}"
    rows = [f"{r['level']:>5} {r['density']:>8.4f} {r['remaining_params']:>9} {r['test_acc']:>9.4f} "
            f"{r['early_stop_iteration']:>8} {r['test_acc_at_early_stop']:>8.4f} {r['seconds']:>8.1f}"
            for r in records]
    return "\n".join([head, *rows])

