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
from trials.core.errors import ConfigError
from trials.folder.record import TRACKED

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


def select(trials: list[dict], experiment: str, sweeps=None) -> tuple[list[dict], dict]:
    """The trial runs of the named sweeps (all when `sweeps` is empty), each trial once.

    A trial is its content key (`trial_key`: the spec, seed included): two sweeps of one
    experiment that ran the same trial (or a sweep re-run under another name) hold two
    runs of one measurement, and a table that pooled both would count it twice. The run
    kept is the one with the most levels, then a finished one, then the lowest run id.
    Returns (trials, what was read: experiment, sweeps, trials, duplicates)."""
    known = sorted({str(t["sweep"]) for t in trials if t.get("sweep") is not None})
    wanted = list(dict.fromkeys(sweeps or []))
    for name in wanted:
        if name not in known:
            raise ConfigError("--sweep", name, f"allowed: {', '.join(known) or 'none'} (the sweeps of "
                              f"experiment {experiment!r})")
    if wanted:
        trials = [t for t in trials if t.get("sweep") in wanted]
    best: dict = {}
    for t in sorted(trials, key=lambda t: (-len(t["levels"]), t.get("status") != "FINISHED", t["run_id"])):
        best.setdefault(t.get("trial_key") or t["run_id"], t)
    kept = sorted(best.values(), key=_run_id)
    read = {"experiment": experiment, "sweeps": sorted({str(t.get("sweep")) for t in kept}),
            "trials": len(kept), "duplicates": len(trials) - len(kept)}
    return kept, read


def describe(read: dict) -> str:
    """One line: what a table or ranking read."""
    sweeps = read["sweeps"]
    text = (f"read {read['trials']} trial{'s' * (read['trials'] != 1)} of experiment {read['experiment']!r}, "
            f"sweep{'s' * (len(sweeps) != 1)} {', '.join(sweeps) or 'none'}")
    if read.get("duplicates"):  # the same trial (spec and seed) run by two sweeps: read once
        text += f" ({read['duplicates']} repeat{'s' * (read['duplicates'] != 1)} counted once)"
    return text
