"""The `lth` command line. Bad input: one line on stderr naming key, value and what is
allowed, exit status 2, nothing written."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trials.errors import ConfigError

EXIT_BAD_INPUT = 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"lth: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lth", description="Lottery-ticket sweeps on Ray.")
    commands = parser.add_subparsers(title="commands")
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
    add_sweep_commands(commands)
    add_ticket_commands(commands)
    add_report_commands(commands)
    return parser


def add_report_commands(commands) -> None:
    report = commands.add_parser("report", help="tables and plots for the paper").add_subparsers(title="report")
    table = report.add_parser("table", help="ablation table: groups x density, mean ± std over seeds")
    table.add_argument("--experiment", required=True)
    table.add_argument("--rows", default="prune.kind,rewind_iteration,control",
                       help="spec fields that form the rows, comma-separated")
    table.add_argument("--density", help="target densities, e.g. 1,0.5,0.2,0.1 (default: the levels)")
    table.add_argument("--metric", default="test_acc_at_early_stop")
    table.add_argument("--format", choices=("latex", "markdown", "csv"), default="markdown")
    table.add_argument("--out", help="write here instead of stdout")
    _tracking_flag(table)
    table.set_defaults(func=report_table)
    plot = report.add_parser("plot", help="accuracy and early-stop iteration vs weights remaining")
    plot.add_argument("--experiment", required=True)
    plot.add_argument("--out", required=True, help="FILE.png or FILE.pdf")
    plot.add_argument("--rows", default="prune.kind,rewind_iteration,control")
    _tracking_flag(plot)
    plot.set_defaults(func=report_plot)


def _fields(text: str) -> list:
    return [f.strip() for f in text.split(",") if f.strip()]


def _densities(text):
    if text is None:
        return None
    try:
        values = [float(x) for x in _fields(text)]
    except ValueError:
        raise ConfigError("--density", text, "comma-separated numbers in (0, 1], e.g. 1,0.5,0.2") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise ConfigError("--density", text, "comma-separated numbers in (0, 1], e.g. 1,0.5,0.2")
    return values


def _experiment_runs(args):
    import analysis

    df = analysis.runs(args.experiment, args.tracking_uri)
    if df.empty:
        raise ConfigError("--experiment", args.experiment, "an experiment with logged trial levels")
    return df


def report_table(args) -> int:
    import analysis

    densities = _densities(args.density)
    table = analysis.ablation(_experiment_runs(args), _fields(args.rows), densities, args.metric)
    render = {"latex": analysis.to_latex, "markdown": analysis.to_markdown, "csv": analysis.to_csv}[args.format]
    text = render(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text if text.endswith("\n") else text + "\n")
        tmp.replace(out)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)
    return 0


def report_plot(args) -> int:
    import analysis

    df = _experiment_runs(args)
    out = analysis.imp_curves(df, _fields(args.rows), args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _tracking_flag(cmd) -> None:
    cmd.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else "
                     "sqlite:///mlflow.db in this folder)")


def add_ticket_commands(commands) -> None:
    tickets = commands.add_parser("tickets", help="query MLflow for tickets").add_subparsers(title="tickets")
    best = tickets.add_parser("best", help="rank (trial, level) pairs across an experiment")
    best.add_argument("--experiment", required=True)
    best.add_argument("--max-density", type=float, help="only levels at or below this density")
    best.add_argument("--min-acc", type=float, help="only levels at or above this accuracy (of --metric)")
    best.add_argument("--metric", default="test_acc_at_early_stop")
    best.add_argument("--top", type=int, default=10)
    best.add_argument("--format", choices=("table", "json", "csv"), default="table")
    _tracking_flag(best)
    best.set_defaults(func=tickets_best)
    export = tickets.add_parser("export", help="write one level's ticket (mask, weights, spec)")
    export.add_argument("run_id")
    export.add_argument("--level", type=int, required=True)
    export.add_argument("--out", required=True)
    _tracking_flag(export)
    export.set_defaults(func=tickets_export)


def tickets_best(args) -> int:
    import pandas as pd

    from orchestrator import tickets

    rows = tickets.best(args.experiment, args.tracking_uri, args.metric, args.max_density, args.min_acc, args.top)
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    elif args.format == "csv":
        print(pd.DataFrame(rows).to_csv(index=False), end="")
    else:
        print(pd.DataFrame(rows).to_string(index=False) if rows else "no level matches")
    return 0


def tickets_export(args) -> int:
    from orchestrator import tickets

    out = tickets.export(args.run_id, args.level, args.out, args.tracking_uri)
    print(f"ticket of run {args.run_id} level {args.level} -> {out}  (trials.load_ticket('{out}'))")
    return 0


def add_sweep_commands(commands) -> None:
    sweep = commands.add_parser("sweep", help="many trials on Ray Tune").add_subparsers(title="sweep")
    run = sweep.add_parser("run", help="validate a sweep file, then run it (or continue it)")
    run.add_argument("file", help="sweep YAML (see sweeps/)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    run.add_argument("--name", help="override the sweep's name")
    run.add_argument("--storage", help="override where results go (folder, s3://, gs://)")
    run.add_argument("--tracking-uri", help="MLflow store (default: the file's tracking_uri, "
                     "else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a sweep key, e.g. --set seeds=2 --set base.prune.levels=3")
    run.set_defaults(func=sweep_run)
    for name, func, text in (("resume", sweep_resume, "finish a sweep whose driver stopped"),
                             ("status", sweep_status, "trials done/running/failed, best so far")):
        cmd = sweep.add_parser(name, help=text)
        cmd.add_argument("name")
        cmd.add_argument("--storage", default="./runs", help="where the sweep lives (default ./runs)")
        if name == "resume":
            cmd.add_argument("--address", help="Ray cluster address")
        cmd.set_defaults(func=func)


def sweep_run(args) -> int:
    from orchestrator.sweep_spec import load_sweep

    overrides = args.overrides + ([f"tracking_uri={args.tracking_uri}"] if args.tracking_uri else [])
    sweep = load_sweep(args.file, overrides, name=args.name, storage=args.storage)  # before Ray
    from orchestrator import runner

    return _sweep_done(sweep, runner.run(sweep, args.address))


def sweep_resume(args) -> int:
    from orchestrator import runner
    from orchestrator.sweep_spec import _storage

    sweep, _ = runner.load_saved(_storage(args.storage, Path.cwd()), args.name)
    return _sweep_done(sweep, runner.resume(sweep.name, sweep.storage, args.address))


def sweep_status(args) -> int:
    from orchestrator import results, runner
    from orchestrator.sweep_spec import _storage

    sweep, _ = runner.load_saved(_storage(args.storage, Path.cwd()), args.name)
    rows = results.collect(sweep)
    path = results.write_csv(sweep, rows)
    print(results.status_report(sweep, rows))
    print(f"trials.csv: {path}")
    return 0


def _sweep_done(sweep, rows) -> int:
    from orchestrator import results

    print(results.summary_table(sweep, rows))
    print(results.status_report(sweep, rows))
    return 0


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
    print(summary_table(records))
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


def summary_table(records: list[dict]) -> str:
    head = f"{'level':>5} {'density':>8} {'params':>9} {'test_acc':>9} {'es_iter':>8} {'es_acc':>8} {'seconds':>8}"
    rows = [f"{r['level']:>5} {r['density']:>8.4f} {r['remaining_params']:>9} {r['test_acc']:>9.4f} "
            f"{r['early_stop_iteration']:>8} {r['test_acc_at_early_stop']:>8.4f} {r['seconds']:>8.1f}"
            for r in records]
    return "\n".join([head, *rows])


if __name__ == "__main__":
    sys.exit(main())
