"""The ticket registry: rank (trial, level) pairs across an experiment, export one.

Reads MLflow through orchestrator.tracking.store's client (mlflow itself is imported there);
trial runs and their levels come from read.py (the sweeps' levels tables where current).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from orchestrator.tracking import levels_table, read, store
from trials import layout
from trials.errors import ConfigError
from trials.record import ACCURACIES, COUNTS, HEADLINE, LevelRecord, read_lines
from trials.spec import field_paths
from trials.typed import from_logged


HEAD_COLUMNS = (*levels_table.NAMES, "seed", "level")  # level_rows' columns before varied params and metrics


def level_rows(trial: dict, metrics=HEADLINE) -> list[dict]:
    """One dict per logged level of a trial run (read.trials): its metrics, varied params and tags."""
    varied = [p for p in trial["varied"].split(",") if p]
    types = field_paths()  # varied params back as the spec types them ("model" shorthand: a name)
    head = {**{k: trial[k] for k in levels_table.NAMES},
            **{p: from_logged(trial["params"].get(p), types.get(p, str)) for p in ["seed", *varied]}}
    levels = trial["levels"]
    # MLflow stores every metric as a float: whole-number fields are made ints again
    return [{**head, "level": step, **{m: _count(levels[step].get(m)) if m in COUNTS else levels[step].get(m)
                                       for m in metrics}}
            for step in sorted(levels)]


def _count(value):
    return None if value is None else int(value)


def best(experiment: str, uri: Optional[str] = None, metric: str = "test_acc_at_early_stop",
         max_density: Optional[float] = None, min_acc: Optional[float] = None, top: int = 10,
         tables: bool = True, sweeps=None) -> list[dict]:
    """(trial, level) pairs ranked by `metric` (descending), filtered by density and accuracy,
    of the named `sweeps` (default: all), each trial once (read.select). `tables=False`
    reads every run's metric histories instead of the sweeps' tables."""
    return ranked(experiment, uri, metric, max_density, min_acc, top, tables, sweeps)[0]


def ranked(experiment: str, uri: Optional[str] = None, metric: str = "test_acc_at_early_stop",
           max_density: Optional[float] = None, min_acc: Optional[float] = None, top: int = 10,
           tables: bool = True, sweeps=None) -> tuple[list[dict], dict]:
    """`best`'s rows and what was read (read.select)."""
    if metric not in ACCURACIES:
        raise ConfigError("--metric", metric, f"allowed: {', '.join(ACCURACIES)}")
    uri, c = store.connect(uri)
    metrics = tuple(dict.fromkeys(HEADLINE + (metric,)))
    trials, what = read.select(read.trials(c, experiment, uri, metrics, tables), experiment, sweeps)
    rows = [r for trial in trials for r in level_rows(trial, metrics)]
    rows = [r for r in rows if r.get(metric) is not None
            and (max_density is None or r["density"] <= max_density)
            and (min_acc is None or r[metric] >= min_acc)]
    rows.sort(key=lambda r: (-r[metric], r["density"], r["run_id"], r["level"]))
    return rows[:top], what


def export(run_id: str, level: int, out, uri: Optional[str] = None) -> Path:
    """Write one level's ticket folder (trials/layout.py names; trials.load_ticket reads it)."""
    uri, c = store.connect(uri)
    try:
        c.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing run
        raise ConfigError("RUN_ID", run_id, f"a run id of {uri}") from None
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", str(out), "a new or empty folder")
    level_dir = f"{store.TICKET}/{layout.level_dir(level)}"
    wanted = {layout.SPEC: layout.SPEC, layout.LEVELS: layout.LEVELS,
              f"{store.TICKET}/{layout.REWIND}": layout.REWIND,
              f"{level_dir}/{layout.MASK}": layout.MASK, f"{level_dir}/{layout.FINAL}": layout.FINAL}
    with tempfile.TemporaryDirectory() as tmp:
        levels = [f.path for f in c.list_artifacts(run_id, store.TICKET) if f.is_dir]
        if level_dir not in levels:
            found = (layout.level_of(p.rsplit("/", 1)[-1]) for p in levels)
            logged = ", ".join(str(lv) for lv in sorted(lv for lv in found if lv is not None)) or "none"
            raise ConfigError("--level", level, f"levels logged for this run: {logged}")
        for remote, local in wanted.items():
            shutil.move(c.download_artifacts(run_id, remote, tmp), Path(tmp) / f"x_{local}")
        records = read_lines((Path(tmp) / f"x_{layout.LEVELS}").read_text())
        out.mkdir(parents=True, exist_ok=True)
        for local in wanted.values():
            if local != layout.LEVELS:
                shutil.move(Path(tmp) / f"x_{local}", out / local)
    record: LevelRecord = next(r for r in records if r.level == level)
    (out / layout.RECORD).write_text(json.dumps(record.to_dict(), indent=1, sort_keys=True) + "\n")
    (out / layout.SOURCE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}, indent=1) + "\n")
    return out


COMPACT = "compact"  # a trial run's artifact folder of compact networks: compact/level_XX/


def compact(run_id: str, level: int, out, uri: Optional[str] = None):
    """Export one level's ticket, compact it into `out` (trials.compact.compact_folder: the
    compact network's files and report) and log that folder to the run as
    compact/level_XX/. Returns trials.compact's Compacted."""
    from trials.compact import compact_folder

    uri, c = store.connect(uri)
    with tempfile.TemporaryDirectory() as tmp:
        ticket = export(run_id, level, Path(tmp) / "ticket", uri)
        result = compact_folder(ticket, out)
    c.log_artifacts(run_id, str(out), f"{COMPACT}/{layout.level_dir(level)}")
    return result
