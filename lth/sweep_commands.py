"""`lth sweep ...`: run, resume and inspect sweeps on Ray Tune."""
from __future__ import annotations

import sys
from pathlib import Path


def add(commands) -> None:
    sweep = commands.add_parser("sweep", help="many trials on Ray Tune").add_subparsers(title="sweep")
    run = sweep.add_parser("run", help="validate a sweep file, then run it (or continue it)")
    run.add_argument("file", help="sweep YAML (see sweeps/)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    run.add_argument("--dashboard", action="store_true", help="start Ray's dashboard with a local Ray "
                     "(off by default: it costs seconds at every start)")
    run.add_argument("--name", help="override the sweep's name")
    run.add_argument("--storage", help="override where results go (folder, s3://, gs://)")
    run.add_argument("--tracking-uri", help="MLflow store (default: the file's tracking_uri, "
                     "else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a sweep key, e.g. --set seeds=2 --set base.prune.levels=3")
    run.set_defaults(func=sweep_run)
    plan = sweep.add_parser("plan", help="the work units a sweep file needs and what sharing saves (runs nothing)")
    plan.add_argument("file", help="sweep YAML (see sweeps/)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a sweep key, as for `lth sweep run`")
    plan.add_argument("--address", help="the Ray cluster `sweep run` will use (default: RAY_ADDRESS, else a local "
                      "instance, whose size the plan checks); plan connects to nothing")
    plan.add_argument("--name", help="override the sweep's name, as for `lth sweep run`")
    plan.add_argument("--storage", help="override where results go, as for `lth sweep run`")
    plan.add_argument("--tracking-uri", help="MLflow store, as for `lth sweep run`")
    plan.set_defaults(func=sweep_plan)
    for name, func, text in (("resume", sweep_resume, "finish a sweep whose driver stopped"),
                             ("status", sweep_status, "trials done/running/failed, best so far")):
        cmd = sweep.add_parser(name, help=text)
        cmd.add_argument("name")
        cmd.add_argument("--storage", default="./runs", help="where the sweep lives (default ./runs)")
        if name == "resume":
            cmd.add_argument("--address", help="Ray cluster address")
            cmd.add_argument("--dashboard", action="store_true", help="start Ray's dashboard with a local Ray")
        cmd.set_defaults(func=func)


def sweep_run(args) -> int:
    from orchestrator.sweep_spec import load_sweep

    overrides = args.overrides + ([f"tracking_uri={args.tracking_uri}"] if args.tracking_uri else [])
    sweep = load_sweep(args.file, overrides, name=args.name, storage=args.storage)  # before Ray
    from orchestrator.sweeps import runner

    return _sweep_done(sweep, runner.run(sweep, args.address, args.dashboard))


def sweep_plan(args) -> int:
    from orchestrator import plan
    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps import preflight

    overrides = args.overrides + ([f"tracking_uri={args.tracking_uri}"] if args.tracking_uri else [])
    sweep = load_sweep(args.file, overrides, name=args.name, storage=args.storage,
                       here=False)  # plans for wherever it will run
    preflight.check(sweep, args.address)  # what `sweep run` would refuse before Ray starts
    preflight.check_tracking(sweep.tracking_uri)
    print(plan.describe(sweep, plan.plan(sweep)))
    return 0


def sweep_resume(args) -> int:
    from orchestrator.sweeps import runner
    from orchestrator.sweep_spec import resolve_storage

    sweep, _ = runner.load_saved(resolve_storage(args.storage, Path.cwd()), args.name)
    return _sweep_done(sweep, runner.resume(sweep.name, sweep.storage, args.address, args.dashboard, sweep))


def sweep_status(args) -> int:
    from orchestrator.sweeps import progress, results, runner
    from orchestrator.sweep_spec import resolve_storage

    sweep, _ = runner.load_saved(resolve_storage(args.storage, Path.cwd()), args.name)
    rows = results.collect(sweep)
    path = results.write_csv(sweep, rows)
    print(results.status_report(sweep, rows))
    width = progress.columns(sys.stdout) if sys.stdout.isatty() else None
    print(progress.of_rows(sweep, rows, save=True).line(elapsed=False, trials=False, width=width, prefix="progress: "))
    print(f"trials.csv: {path}")
    return 0


def _sweep_done(sweep, rows) -> int:
    from orchestrator.sweeps import results

    print(results.summary_table(sweep, rows))
    print(results.status_report(sweep, rows))
    trials = results.per_trial(rows)
    failed = [t for t in trials if t["status"] == "ERROR"]
    if failed:  # their reasons are in the status report above
        print(f"lth: {len(failed)} of {len(trials)} trials failed", file=sys.stderr)
        return 1
    return 0


