"""`lth report ...` and `lth tickets ...`: read MLflow, write tables, plots and tickets."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lth import compact_commands
from trials.core.errors import ConfigError


def add_reports(commands) -> None:
    report = commands.add_parser("report", help="tables and plots for the paper").add_subparsers(title="report")
    table = report.add_parser("table", help="ablation table: groups x density, mean ± std over seeds")
    table.add_argument("--experiment", required=True)
    table.add_argument("--rows", default="prune.kind,rewind_iteration,control",
                       help="spec fields that form the rows, comma-separated")
    _sweep_flag(table)
    table.add_argument("--density", help="target densities, e.g. 1,0.5,0.2,0.1 (default: the levels)")
    _density_kind_flag(table)
    table.add_argument("--metric", default="test_acc_at_early_stop")
    table.add_argument("--cost", action="store_true",
                       help="add to each cell the iterations trained to obtain its networks (mean cost_iterations: "
                       "IMP counts every level before it; early-bird tickets where their masks were drawn)")
    table.add_argument("--format", choices=("latex", "markdown", "csv"), default="markdown")
    table.add_argument("--out", help="write here instead of stdout")
    _tracking_flag(table)
    table.set_defaults(func=report_table)
    plot = report.add_parser("plot", help="accuracy and early-stop iteration vs weights remaining, "
                             "instability vs rewind iteration (--kind instability), or accuracy vs "
                             "iterations spent (--kind cost)")
    plot.add_argument("--experiment", required=True)
    _sweep_flag(plot)
    plot.add_argument("--out", required=True, help="FILE.png (screens), FILE.pdf or FILE.svg (papers)")
    plot.add_argument("--rows", default="prune.kind,rewind_iteration,control",
                      help="spec fields whose values form the lines (instability: and the level)")
    plot.add_argument("--kind", choices=("imp", "instability", "cost"), default="imp",
                      help="imp = IMP curves against weights remaining; instability = error and loss "
                      "barriers against the rewind iteration, a line per group and level (trials with "
                      "stability.copies >= 2); cost = accuracy at early stop against the iterations trained "
                      "to obtain each level's network, a line per group through its levels")
    _density_kind_flag(plot)
    _tracking_flag(plot)
    plot.set_defaults(func=report_plot)


def _sweep_flag(cmd) -> None:
    cmd.add_argument("--sweep", action="append", metavar="NAME",
                     help="read only this sweep of the experiment (repeat, or NAME,NAME, for several; "
                     "default: every sweep, each trial once)")


def _density_kind_flag(cmd) -> None:
    cmd.add_argument("--density-kind", default="nominal", metavar="{nominal,effective}",
                     help="nominal (default): the mask's fraction of weights; effective: the fraction on "
                     "some input-to-output path (records that carry effective_density)")


def _sweeps(args) -> list:
    return [name for text in (args.sweep or []) for name in _fields(text)]


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

    df = analysis.runs(args.experiment, args.tracking_uri, sweeps=_sweeps(args))
    if df.empty:
        raise ConfigError("--experiment", args.experiment, "an experiment with logged trial levels")
    df = analysis.with_density(df, args.density_kind)
    from trials.folder.environment import mixed

    warning = mixed(df.drop_duplicates("run_id")["environments"]) if "environments" in df else None
    if warning:
        print(warning, file=sys.stderr)
    return df


def report_table(args) -> int:
    import analysis

    densities = _densities(args.density)
    table = analysis.ablation(_experiment_runs(args), _fields(args.rows), densities, args.metric, cost=args.cost)
    render = {"latex": analysis.to_latex, "markdown": analysis.to_markdown, "csv": analysis.to_csv}[args.format]
    text = render(table)
    if args.format == "csv":  # the file stays whole for machines: what it read goes to stderr
        for line in analysis.provenance(table):
            print(line, file=sys.stderr)
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

    analysis.plots.checked_out(args.out)  # a bad --out is refused before anything is read
    df = _experiment_runs(args)
    draw = {"imp": analysis.imp_curves, "instability": analysis.instability_curves,
            "cost": analysis.cost_curves}[args.kind]
    out = draw(df, _fields(args.rows), args.out)
    from orchestrator.tracking.read import describe

    if df.attrs.get("read"):
        print(describe(df.attrs["read"]), file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _tracking_flag(cmd) -> None:
    cmd.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else "
                     "sqlite:///mlflow.db in this folder)")


def add_tickets(commands) -> None:
    tickets = commands.add_parser("tickets", help="query MLflow for tickets").add_subparsers(title="tickets")
    best = tickets.add_parser("best", help="rank (trial, level) pairs across an experiment")
    best.add_argument("--experiment", required=True, help="the MLflow experiment (a sweep's `experiment`)")
    best.add_argument("--max-density", type=float, help="only levels at or below this density")
    best.add_argument("--min-acc", type=float, help="only levels at or above this accuracy (of --metric)")
    best.add_argument("--metric", default="test_acc_at_early_stop",
                      help="the accuracy to rank by: test_acc_at_early_stop (default), test_acc or val_acc")
    best.add_argument("--top", type=int, default=10, help="how many (trial, level) pairs to list (default 10)")
    _sweep_flag(best)
    best.add_argument("--format", choices=("table", "json", "csv"), default="table",
                      help="table (default), json or csv (every column, with a header even when nothing matches)")
    best.add_argument("--columns", help="the table's columns, comma-separated, or `all` (default: run_id, "
                      "sweep, the varied fields, seed, level, density and --metric); json and csv hold every column")
    best.add_argument("--export", action="store_true",
                      help="also send each listed ticket's tensors (rewind, mask, final weights where kept) from "
                           "its trial folder in storage to its MLflow run (ticket/...)")
    _tracking_flag(best)
    best.set_defaults(func=tickets_best)
    export = tickets.add_parser("export", help="write one level's ticket (mask, weights, spec)")
    export.add_argument("run_id")
    export.add_argument("--level", type=int, required=True)
    export.add_argument("--out", required=True)
    _tracking_flag(export)
    export.set_defaults(func=tickets_export)
    compact_commands.add(tickets)


TICKET_COLUMNS = ("run_id", "sweep", "seed", "level", "density")  # the table's default view (+ varied, metric)


def tickets_best(args) -> int:
    import pandas as pd

    from orchestrator.tracking import read, experiment_tickets

    if args.top < 1:
        raise ConfigError("--top", args.top, "an integer >= 1")
    rows, what = experiment_tickets.ranked(args.experiment, args.tracking_uri, args.metric, args.max_density,
                                           args.min_acc, args.top, sweeps=_sweeps(args))
    for r in rows if getattr(args, "export", False) else ():
        experiment_tickets.log_ticket(r["run_id"], r["level"], args.tracking_uri)
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    elif args.format == "csv":
        columns = None if rows else [*experiment_tickets.HEAD_COLUMNS,
                                     *dict.fromkeys(experiment_tickets.HEADLINE + (args.metric,))]
        print(pd.DataFrame(rows, columns=columns).to_csv(index=False), end="")
    else:
        frame = pd.DataFrame(rows)
        columns = _ticket_columns(args, frame)
        print(describe_ranking(what, args))
        print(_wrapped(frame[columns]) if rows else "no level matches")
        return 0
    print(describe_ranking(what, args), file=sys.stderr)  # json and csv stay whole for machines
    return 0


def describe_ranking(what: dict, args) -> str:
    from orchestrator.tracking.read import describe

    return f"{describe(what)}\nbest {args.top} (trial, level) pairs by {args.metric}:"


def _ticket_columns(args, frame) -> list:
    """The table's columns: --columns (checked against the rows), else the default view."""
    if frame.empty:
        return list(frame.columns)
    if args.columns is None:
        from orchestrator.tracking import experiment_tickets

        fixed = {*experiment_tickets.HEAD_COLUMNS, *experiment_tickets.HEADLINE, args.metric}
        varied = [c for c in frame.columns if c not in fixed]  # level_rows: the sweeps' varied fields
        order = ["run_id", "sweep", *varied, "seed", "level", "density", args.metric]
        return [c for c in dict.fromkeys(order) if c in frame]
    if args.columns.strip() == "all":
        return list(frame.columns)
    wanted = _fields(args.columns)
    for name in wanted:
        if name not in frame:
            raise ConfigError("--columns", name, f"allowed: all, or columns of: {', '.join(frame.columns)}")
    if not wanted:
        raise ConfigError("--columns", args.columns, f"allowed: all, or columns of: {', '.join(frame.columns)}")
    return wanted


def _wrapped(frame) -> str:
    """The table at the terminal's width (80 when not a terminal and COLUMNS is unset):
    columns that do not fit continue in a block below."""
    import shutil

    width = shutil.get_terminal_size((80, 24)).columns
    floats = {c: (lambda v: f"{v:.4g}") for c in frame.columns if frame[c].dtype.kind == "f"}
    return frame.to_string(index=False, line_width=width, formatters=floats)


def tickets_export(args) -> int:
    from orchestrator.tracking import experiment_tickets

    out = experiment_tickets.export(args.run_id, args.level, args.out, args.tracking_uri)
    print(f"ticket of run {args.run_id} level {args.level} -> {out}  (trials.load_ticket('{out}'))")
    return 0


