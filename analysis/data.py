"""MLflow -> one tidy pandas DataFrame: a row per trial x level, typed columns."""
from __future__ import annotations

import json
from typing import Optional, get_origin

import pandas as pd

from orchestrator.tracking import store
from orchestrator.tracking.tickets import trial_runs
from trials.record import COUNTS, TRACKED
from trials.spec import field_paths
from trials.typed import non_null

DENSE_FIELDS = ("model.", "dataset.", "train.")  # with seed, all that decides the dense (level 0) network


def runs(experiment: str, tracking_uri: Optional[str] = None) -> pd.DataFrame:
    """Every logged level of every trial of `experiment`: spec fields (typed as the spec
    types them), seed, level, density, accuracies, early-stop iteration, run status."""
    uri = store.resolve_uri(tracking_uri)
    store.check_reachable(uri, "--tracking-uri")
    c = store.client(uri)
    rows = []
    for run in trial_runs(c, experiment, uri):
        history = {m: {x.step: x.value for x in c.get_metric_history(run.info.run_id, m)} for m in TRACKED}
        head = {"run_id": run.info.run_id, "trial_key": run.data.tags.get(store.TAG_KEY),
                "sweep": run.data.tags.get(store.TAG_SWEEP), "status": run.info.status,
                **{k: v for k, v in run.data.params.items()}}
        for level in sorted(history[TRACKED[0]]):
            rows.append({**head, "level": level, **{m: history[m].get(level) for m in TRACKED}})
    return typed(pd.DataFrame(rows))


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """Spec columns get the spec's types (nullable where the spec allows null)."""
    if df.empty:
        return df
    for path, tp in field_paths().items():
        if path in df:
            df[path] = _column(df[path], tp)
    for name in COUNTS:
        if name in df:
            df[name] = pd.to_numeric(df[name], errors="coerce").round().astype("Int64")
    for name in ("run_id", "trial_key", "sweep", "status"):
        df[name] = df[name].astype("string")
    return df.sort_values(["sweep", "trial_key", "level"], kind="stable").reset_index(drop=True)


def _column(values: pd.Series, tp) -> pd.Series:
    """A column of logged params (strings) as the spec's type `tp`; null stays null."""
    core = non_null(tp)
    parsed = values.map(lambda v: None if v is None or v == "None" or (isinstance(v, float) and v != v) else v)
    if core is int:
        return pd.array([None if v is None else int(v) for v in parsed], dtype="Int64")
    if core is float:
        return pd.array([None if v is None else float(v) for v in parsed], dtype="Float64")
    if core is bool:
        return pd.array([None if v is None else v in (True, "True", "true") for v in parsed], dtype="boolean")
    if get_origin(core) is tuple:  # logged as JSON; rates by layer stay a dict
        return parsed.map(lambda v: None if v is None else _tuple(json.loads(v) if isinstance(v, str) else v))
    return parsed.astype("string")


def _tuple(value):
    return value if isinstance(value, dict) else tuple(value)


def dense_key(df: pd.DataFrame) -> pd.Series:
    """Trials sharing this key trained the same dense network (level 0 is shared)."""
    cols = sorted(c for c in df.columns if c.startswith(DENSE_FIELDS)) + ["seed"]
    return df[cols].astype(object).map(str).agg("|".join, axis=1)
