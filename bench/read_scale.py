"""Reading a paper-scale experiment: `lth tickets best` and `lth report table`, the whole
commands as a user waits for them, against a real `mlflow server` on 127.0.0.1.

    .venv/bin/python bench/read_scale.py [--runs 5000] [--levels 10] [--sweeps 5] [--old-runs 200] [--keep DIR]

The store holds what sweep drivers leave (orchestrator/tracking/store.py): per sweep a
parent run with its levels table, per trial a child run with the flattened spec as
params, the driver's tags (marked `lth.table=current`) and the tracked fields as metrics
with step = level. It is written straight into the server's SQLite file before the
server starts (log_batch through MlflowClient: minutes instead of hours of per-level
requests); the tables are uploaded through the server, as the driver uploads them.

`--old-runs` trials are logged twice more, as experiments `subset` (with a table) and
`subset-old` (as an lth without tables logged them): the old read path (one metric-
history request per run and metric) is timed there, beside the new one on equal data.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.config import expand  # noqa: E402
from orchestrator.tracking import levels_table, store  # noqa: E402
from tests.test_tracking import MlflowServer, free_port  # noqa: E402 - the tests' real server
from trials.folder.record import TRACKED, LevelRecord  # noqa: E402
from trials.spec import flatten, from_dict  # noqa: E402

LTH = str(Path(sys.executable).parent / "lth")
CONFIGS = [{"prune": {"kind": kind}, "rewind_iteration": rewind, "control": control}
           for kind in ("unstructured", "structured") for rewind in (0, 500)
           for control in ("none", "reinit", "random_prune")]
VARIED = "prune.kind,rewind_iteration,control"


def specs(n: int, levels: int) -> list:
    """n trial specs: the CONFIGS grid on seeds 0, 1, ... (LeNet-300-100 on MNIST)."""
    base = expand({"preset": "lenet_mnist_frankle2019", "prune": {"levels": levels}, "device": "cpu"})
    out = []
    for i in range(n):
        config = CONFIGS[i % len(CONFIGS)]
        out.append(from_dict({**base, **config, "prune": {**base["prune"], **config["prune"]},
                              "seed": i // len(CONFIGS)}))
    return out


def records(rng: random.Random, levels: int) -> list:
    """Plausible level records: density 0.8^L, accuracy drifting with noise."""
    out = []
    for level in range(levels + 1):
        density, acc = 0.8 ** level, 0.98 - 0.002 * level + rng.gauss(0, 0.002)
        out.append(LevelRecord(
            level=level, density=density, remaining_params=round(266200 * density),
            layer_density={"hidden.0": density, "hidden.1": density, "fc": 0.9 ** level},
            test_acc=acc - 0.001, early_stop_iteration=rng.randrange(1000, 50000, 100),
            test_acc_at_early_stop=acc, val_loss=0.07 + rng.random() / 100, val_acc=acc + 0.001,
            val_loss_at_early_stop=0.06, train_loss=0.01, start_iteration=0 if level == 0 else 500,
            iterations=50000, seconds=300 + rng.random()))
    return out


def log_sweep(c, exp: str, name: str, trial_specs: list, levels: int, tables: bool):
    """One sweep as the driver leaves it; returns (parent run id, its table or None)."""
    parent = c.create_run(exp, run_name=name, tags={store.TAG_KIND: "sweep", store.TAG_SWEEP: name,
                                                    store.TAG_VARIED: VARIED}).info.run_id
    table = levels_table.LevelsTable() if tables else None
    for spec in trial_specs:
        flat = flatten(spec.to_dict())
        tags = {store.TAG_KIND: "trial", store.TAG_SWEEP: name, store.TAG_KEY: spec.key, store.TAG_VARIED: VARIED,
                "mlflow.parentRunId": parent, "git_sha": "bench", "lth.version": "bench",
                **{tag: str(flat.get(p)) for p, tag in store.SPEC_TAGS.items()}}
        run_id = c.create_run(exp, run_name=spec.key, tags=tags).info.run_id
        params = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in flat.items()}
        recs = records(random.Random(spec.key), levels)  # equal trials, equal records
        metrics = [Metric(k, float(getattr(r, k)), 0, r.level) for r in recs for k in TRACKED
                   if getattr(r, k) is not None]
        # the driver's final state: the table holds the run, which is marked current
        state = [RunTag(levels_table.STATE_TAG, levels_table.CURRENT)] if tables else []
        c.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()], tags=state)
        c.set_terminated(run_id)
        if tables:
            table.set_head(levels_table.head(run_id, spec.key, name, "FINISHED", VARIED, params))
            for r in recs:
                table.add(run_id, r)
    c.set_terminated(parent)
    return parent, table


def build(db: Path, args) -> list:
    """The store in the SQLite file; returns the (parent, table) pairs still to upload."""
    c = store.client(f"sqlite:///{db}")
    todo, t0 = [], time.perf_counter()
    all_specs = specs(args.runs, args.levels)
    per = -(-args.runs // args.sweeps)
    plan = [("paper", f"sweep-{s}", all_specs[s * per:(s + 1) * per], True) for s in range(args.sweeps)]
    plan += [("subset", "subset", all_specs[:args.old_runs], True),
             ("subset-old", "subset", all_specs[:args.old_runs], False)]
    exps = {}
    for exp, name, trial_specs, tables in plan:
        if exp not in exps:  # artifacts go through the server, as for any experiment it creates
            exps[exp] = c.create_experiment(exp, artifact_location=f"mlflow-artifacts:/{exp}")
        parent, table = log_sweep(c, exps[exp], name, trial_specs, args.levels, tables)
        if table is not None:
            todo.append((parent, table))
        print(f"  {exp}/{name}: {len(trial_specs)} runs ({time.perf_counter() - t0:.0f} s)", flush=True)
    return todo


def timed(cmd: list) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def commands(experiment: str, uri: str) -> dict:
    flags = ["--experiment", experiment, "--tracking-uri", uri]
    return {"lth tickets best": [LTH, "tickets", "best", *flags, "--max-density", "0.2", "--top", "5"],
            "lth report table": [LTH, "report", "table", *flags, "--rows", VARIED, "--format", "markdown"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5000)
    ap.add_argument("--levels", type=int, default=10, help="pruning levels after the dense one")
    ap.add_argument("--sweeps", type=int, default=5)
    ap.add_argument("--old-runs", type=int, default=200, help="trials of the old-path comparison")
    ap.add_argument("--keep", help="build the store in this folder once and reuse it (the build takes minutes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = MlflowServer(Path(args.keep or tmp), free_port(), workers=4)  # mlflow's default, as measured before
        ready = server.folder / "READY"  # written once the tables are uploaded: a kept store is whole
        todo = []
        if not ready.exists():
            shutil.rmtree(server.folder, ignore_errors=True)
            server.folder.mkdir(parents=True)
            print(f"building {args.runs} trial runs x {args.levels + 1} levels in {args.sweeps} sweeps ...", flush=True)
            todo = build(server.folder / "server.db", args)
        try:
            server.start()
            c = store.client(server.uri)
            for parent, table in todo:
                table.upload(c, parent)
            ready.touch()
            report(server.uri, args)
        finally:
            server.stop()


def report(uri: str, args) -> None:
    print(f"\nagainst mlflow server {uri} (SQLite backend), whole commands:")
    for what, cmd in commands("paper", uri).items():
        seconds, _ = timed(cmd)
        print(f"  {what:18s} {args.runs} runs, tables     {seconds:6.1f} s")
    seconds, outputs = {}, {}
    for experiment, label in (("subset", "tables"), ("subset-old", "old path")):
        for what, cmd in commands(experiment, uri).items():
            seconds[label, what], outputs[label, what] = timed(cmd)
            print(f"  {what:18s} {args.old_runs} runs, {label:9s} {seconds[label, what]:6.1f} s")
    for what in commands("", uri):
        old = seconds["old path", what]
        print(f"  {what:18s} old path / tables on {args.old_runs} runs: {old / seconds['tables', what]:.0f}x; "
              f"old path at {args.runs} runs, linearly: ~{old * args.runs / args.old_runs / 60:.0f} min")
    same = outputs["tables", "lth report table"] == outputs["old path", "lth report table"]
    print(f"  the same table from both paths: {same}")


if __name__ == "__main__":
    main()
