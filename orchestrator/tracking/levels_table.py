"""The sweep's levels table: what readers show of every trial run of a sweep and every
level it logged, in one Parquet artifact of the sweep's parent run (`levels.parquet`,
one row per trial run x level).

Why: reading an experiment run by run costs one metric-history request per run and
metric, and even `search_runs` of thousands of full runs takes longer than a user should
wait; with the table a reader pays one download per sweep (ARCHITECTURE.md, "Tracking").

Columns: HEAD (run id, trial key, sweep, run status, varied fields, the run's params as
one JSON object) and the fields of trials.folder.record.LevelRecord (`flat()`: layer_density as
a JSON string). Only the sweep driver writes it (store.SweepTracker). Each trial run
carries the tag `lth.table`: `stale` while MLflow holds something of the run the
uploaded table lacks, `current` once the table holds all of it; readers take only
`current` runs from the tables. This module needs the MLflow client passed in (mlflow
itself is imported in store.py only).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from trials.folder.environment import listed
from trials.folder.record import FIELDS, TRACKED, LevelRecord

TABLE = "levels.parquet"  # artifact of the sweep's parent run
NAMES = ("run_id", "trial_key", "sweep", "status")  # what names a trial run in every reader's rows
HEAD = (*NAMES, "varied", "params")
COLUMNS = HEAD + FIELDS
STATE_TAG, CURRENT, STALE = "lth.table", "current", "stale"  # on each trial run
MLFLOW_MAX = 1.7976931348623157e308  # what MLflow's SQL store keeps for an infinite metric


def head(run_id: str, trial_key, sweep, status: str, varied, params: dict) -> dict:
    """What readers show of a trial run (params as JSON, sorted: equal runs, equal heads)."""
    return {"run_id": run_id, "trial_key": trial_key, "sweep": sweep, "status": status, "varied": varied or "",
            "params": json.dumps(dict(params), sort_keys=True)}


class LevelsTable:
    """The driver's copy of one sweep's table."""

    def __init__(self, frame: Optional[pd.DataFrame] = None):
        self.heads: dict = {}  # run_id -> head
        self.records: dict = {}  # (run_id, level) -> flat record
        for row in ([] if frame is None else frame.to_dict("records")):
            self.heads[row["run_id"]] = {k: _none(row[k]) for k in HEAD}
            self.records[(row["run_id"], int(row["level"]))] = {f: row[f] for f in FIELDS}
        self.dirty = False  # changed since the last upload
        self.pending: dict = {}  # run_id -> its logged levels (a live set): runs to mark current

    def set_head(self, run_head: dict) -> None:
        if self.heads.get(run_head["run_id"]) != run_head:
            self.heads[run_head["run_id"]] = run_head
            self.dirty = True

    def mark(self, run_id: str, logged_levels: set) -> None:
        """Mark the run current after the upload that holds it and every level it logged."""
        self.pending[run_id] = logged_levels

    def add(self, run_id: str, record: LevelRecord) -> None:
        # the first record of a level wins, as MLflow keeps a step's first metric values
        if (run_id, record.level) not in self.records:
            self.records[(run_id, record.level)] = record.flat()
            self.dirty = True

    def frame(self) -> pd.DataFrame:
        rows = [{**self.heads[run_id], **self.records[(run_id, level)]} for run_id, level in sorted(self.records)]
        return pd.DataFrame(rows, columns=list(COLUMNS))

    def publish(self, c, parent_id: str) -> None:
        """Upload the table if it changed, then mark current the pending runs it holds in
        full (a run whose levels are not all in it yet stays stale: readers ask MLflow)."""
        if self.dirty:
            self.upload(c, parent_id)
        for run_id, levels in list(self.pending.items()):
            if run_id in self.heads and all((run_id, level) in self.records for level in levels):
                c.set_tag(run_id, STATE_TAG, CURRENT)
                del self.pending[run_id]

    def upload(self, c, parent_id: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / TABLE
            self.frame().to_parquet(path, index=False)
            c.log_artifact(parent_id, str(path))
        self.dirty = False


def download(c, parent_id: str) -> Optional[pd.DataFrame]:
    """The parent run's table, or None when it has none (or one of another schema)."""
    if TABLE not in {f.path for f in c.list_artifacts(parent_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:  # repeated strings (a run's params on each of its levels) are read once
            table = pq.read_table(c.download_artifacts(parent_id, TABLE, tmp), read_dictionary=list(HEAD))
        except (OSError, ValueError):  # caught mid-upload (not every artifact store replaces atomically)
            return None
    return table.to_pandas() if tuple(table.column_names) == COLUMNS else None


def trials(frame: pd.DataFrame, fields=TRACKED) -> list[dict]:
    """The table's trial runs: head (params as a dict) + levels {level: {field: value}},
    values as MLflow returns the metric (a float)."""
    out = {}
    for row in frame.drop_duplicates("run_id")[list(HEAD)].to_dict("records"):
        out[row["run_id"]] = {**{k: _none(row[k]) for k in HEAD}, "params": json.loads(row["params"]), "levels": {}}
    values = as_logged(frame[list(fields)].to_numpy(dtype=float)).tolist()
    for run_id, level, row in zip(frame["run_id"].tolist(), frame["level"].tolist(), values):
        out[run_id]["levels"][int(level)] = dict(zip(fields, row))
    envs = (frame.groupby("run_id")["environment"].agg(lambda v: listed(_none(x) for x in v)).to_dict()
            if "environment" in frame else {})  # a table from before lth recorded environments: none
    for run_id, trial in out.items():  # as the run's tag lth.environment holds them (store._log_levels)
        trial["environments"] = envs.get(run_id)
    return list(out.values())


def as_logged(values: np.ndarray) -> np.ndarray:
    """Table values as MLflow returns the same metrics: floats, infinities clipped as its
    SQL store clips them (so the table and history paths give equal numbers)."""
    return np.where(np.isinf(values), np.copysign(MLFLOW_MAX, values), values)


def _none(value):
    """A missing head value (None written, NaN read back from a dictionary column) as None."""
    return None if value is None or (isinstance(value, float) and value != value) else value
