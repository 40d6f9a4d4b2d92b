"""The read path: every trial run of an experiment with its logged levels, for
analysis.runs and the ticket ranking.

A trial run marked `lth.table = current` is read from its sweep's levels table
(levels_table.py): one download per sweep. Every other run is read from MLflow, one
metric-history request per run and field: runs marked stale (levels or a status the
table does not hold yet), runs of an lth without tables (no mark), and current runs of a
sweep whose table is missing or unreadable. Stale and unmarked runs are searched before
the tables are downloaded, so a run marked current meanwhile is in the table read.
Both paths give equal values: the table path returns numbers as MLflow returns metrics.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from orchestrator.tracking import levels_table, store
from trials.errors import ConfigError
from trials.record import TRACKED

TRIAL, SWEEP = {store.TAG_KIND: "trial"}, {store.TAG_KIND: "sweep"}
STATE, PARENT = levels_table.STATE_TAG, "mlflow.parentRunId"


def experiment_id(c, experiment: str, uri: str) -> str:
    exp = store.experiment_id(c, experiment, uri, create=False)
    if exp is None:
        names = [e.name for e in c.search_experiments()]
        raise ConfigError("--experiment", experiment, f"known experiments: {', '.join(names) or 'none'}")
    return exp


def trials(c, experiment: str, uri: str, fields=TRACKED, tables: bool = True) -> list[dict]:
    """Every active trial run, sorted by run id: run_id, trial_key, sweep, status, varied,
    params (dict) and levels ({level: {field: value}}). `tables=False` reads every run
    from MLflow (what lth did before the tables; for checks and comparisons)."""
    if not set(fields) <= set(TRACKED):
        raise ValueError(f"not tracked as metrics: {sorted(set(fields) - set(TRACKED))}")
    exp = experiment_id(c, experiment, uri)
    if not tables:
        return sorted(from_mlflow(c, store.search(c, exp, TRIAL), fields), key=_run_id)
    live = (store.search(c, exp, {**TRIAL, STATE: levels_table.STALE})
            + store.search(c, exp, {**TRIAL, STATE: None}))
    skip = {r.info.run_id for r in live + store.search(c, exp, TRIAL, view="DELETED_ONLY")}
    return sorted(from_mlflow(c, live, fields) + from_tables(c, exp, skip, fields), key=_run_id)


def from_tables(c, exp: str, skip: set, fields=TRACKED) -> list[dict]:
    """The current runs of every sweep of the experiment (runs in `skip` left out): from
    its table, or from MLflow where the sweep has no usable table."""
    # deleted sweep runs too: their trials may live on
    parents = [r.info.run_id for r in store.search(c, exp, SWEEP, view="ALL")]
    with ThreadPoolExecutor(max_workers=4) as pool:  # downloads overlap (I/O bound)
        frames = list(pool.map(lambda parent: levels_table.download(c, parent), parents))
    out = []
    for parent, frame in zip(parents, frames):
        if frame is None:
            runs = store.search(c, exp, {**TRIAL, PARENT: parent, STATE: levels_table.CURRENT})
            out += from_mlflow(c, [r for r in runs if r.info.run_id not in skip], fields)
        else:
            out += levels_table.trials(frame[~frame["run_id"].isin(skip)], fields)
    return out


def from_mlflow(c, runs: list, fields=TRACKED) -> list[dict]:
    """Trial runs as `trials` returns them, their levels from the metric histories."""
    out = []
    for run in runs:
        history = {m: {x.step: x.value for x in c.get_metric_history(run.info.run_id, m)} for m in fields}
        levels = {step: {m: history[m].get(step) for m in fields} for step in history[fields[0]]}
        out.append({**store.head(run), "params": dict(sorted(run.data.params.items())), "levels": levels,
                    "environments": run.data.tags.get(store.TAG_ENVIRONMENT)})
    return out


def _run_id(trial: dict) -> str:
    return trial["run_id"]
