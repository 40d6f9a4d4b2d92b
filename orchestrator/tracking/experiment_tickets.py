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
from trials.folder import layout
from trials.core.errors import ConfigError
from trials.folder.record import ACCURACIES, COUNTS, HEADLINE, LevelRecord, read_lines
from trials.spec import field_paths
from trials.core.typed import from_logged


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
    """Write one level's ticket folder (trials/folder/layout.py names; trials.load_ticket reads it):
    from the run's ticket/ artifacts where it has them (a sweep with track_tensors, a ticket
    logged by `lth tickets best --export`, a sweep of an earlier lth), else from the trial's
    folder in the sweep's storage (the run's lth.folder tag). The final weights are
    left out where the sweep did not keep them (its keep_finals)."""
    uri, c = store.connect(uri)
    try:
        run = c.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing run
        raise ConfigError("RUN_ID", run_id, f"a run id of {uri}") from None
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", str(out), "a new or empty folder")
    with tempfile.TemporaryDirectory() as tmp:
        got = _from_mlflow(c, run_id, level, Path(tmp))
        if got is None and store.TAG_FOLDER not in run.data.tags:  # a run of an earlier lth: its files alone
            found = (layout.level_of(p.rsplit("/", 1)[-1]) for p in _levels_logged(c, run_id))
            logged = ", ".join(str(lv) for lv in sorted(lv for lv in found if lv is not None)) or "none"
            raise ConfigError("--level", level, f"levels logged for this run: {logged}")
        if got is None:
            got = _from_storage(run, level, Path(tmp))
        records = read_lines((Path(tmp) / layout.LEVELS).read_text())
        out.mkdir(parents=True, exist_ok=True)
        for local in got:
            if local != layout.LEVELS:
                shutil.move(Path(tmp) / local, out / local)
    record: LevelRecord = next(r for r in records if r.level == level)
    (out / layout.RECORD).write_text(json.dumps(record.to_dict(), indent=1, sort_keys=True) + "\n")
    (out / layout.SOURCE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}, indent=1) + "\n")
    return out


def _levels_logged(c, run_id: str) -> list:
    return [f.path for f in c.list_artifacts(run_id, store.TICKET) if f.is_dir]


def _from_mlflow(c, run_id: str, level: int, tmp: Path) -> Optional[list]:
    """The level's files from the run's ticket/ artifacts into `tmp` (their names), None
    when the run has none of this level."""
    level_dir = f"{store.TICKET}/{layout.level_dir(level)}"
    levels = _levels_logged(c, run_id)
    if level_dir not in levels:
        return None
    there = {f.path for f in c.list_artifacts(run_id, level_dir)}
    wanted = {layout.SPEC: layout.SPEC, layout.LEVELS: layout.LEVELS,
              f"{store.TICKET}/{layout.REWIND}": layout.REWIND, f"{level_dir}/{layout.MASK}": layout.MASK}
    if f"{level_dir}/{layout.FINAL}" in there:
        wanted[f"{level_dir}/{layout.FINAL}"] = layout.FINAL
    for remote, local in wanted.items():
        shutil.move(c.download_artifacts(run_id, remote, str(tmp / "dl")), tmp / local)
    return list(wanted.values())


def _from_storage(run, level: int, tmp: Path) -> list:
    """The level's files from the trial's folder in storage (its run's lth.folder tag),
    the tensors of a level that a work unit holds from the unit (folders.unit_files)."""
    from orchestrator.sweeps.folders import download, read_file, unit_files

    where = run.data.tags.get(store.TAG_FOLDER)
    levels = read_file(where, layout.LEVELS) if where else None
    if levels is None:
        raise ConfigError("RUN_ID", run.info.run_id, "a trial run whose ticket was logged or whose folder is in "
                          f"storage ({'its folder ' + where + ' is gone' if where else 'it names none'})")
    stored = sorted(r.level for r in read_lines(levels.decode()))
    if level not in stored:
        raise ConfigError("--level", level, f"levels logged for this run: {', '.join(map(str, stored)) or 'none'}")
    trial = tmp / "trial"
    download(where, trial, [layout.SPEC, layout.UNITS, layout.REWIND])
    (tmp / layout.LEVELS).write_bytes(levels)
    d = layout.level_dir(level)
    units = unit_files(trial, "", level)
    got = [layout.LEVELS]
    for name in (layout.MASK, layout.FINAL):
        data = read_file(where, f"{d}/{name}")
        if data is None and name in units:
            data = read_file(units[name].rsplit("/", 1)[0], name)
        if data is None and name == layout.MASK:
            raise ConfigError("RUN_ID", run.info.run_id, f"a trial folder that holds its ticket ({where} lacks "
                              f"{d}/{name}, and no work unit holds it)")
        if data is not None:
            (tmp / name).write_bytes(data)
            got.append(name)
    for name in (layout.SPEC, layout.REWIND):
        if not (trial / name).exists():
            raise ConfigError("RUN_ID", run.info.run_id, f"a trial folder that holds its ticket ({where} lacks {name})")
        shutil.move(trial / name, tmp / name)
        got.append(name)
    return got


def log_ticket(run_id: str, level: int, uri: Optional[str] = None) -> None:
    """Send one level's ticket tensors (rewind, mask, final where kept) from the trial's
    folder in storage to its MLflow run (ticket/...), where they are not yet."""
    uri, c = store.connect(uri)
    run = c.get_run(run_id)
    if _from_mlflow_has(c, run_id, level):
        return
    with tempfile.TemporaryDirectory() as tmp:
        got = _from_storage(run, level, Path(tmp))
        c.log_artifact(run_id, str(Path(tmp) / layout.SPEC))
        c.log_artifact(run_id, str(Path(tmp) / layout.LEVELS))
        d = f"{store.TICKET}/{layout.level_dir(level)}"
        for name in got:
            if name == layout.REWIND:
                c.log_artifact(run_id, str(Path(tmp) / name), store.TICKET)
            elif name in (layout.MASK, layout.FINAL):
                c.log_artifact(run_id, str(Path(tmp) / name), d)


def _from_mlflow_has(c, run_id: str, level: int) -> bool:
    return f"{store.TICKET}/{layout.level_dir(level)}" in _levels_logged(c, run_id)


COMPACT = "compact"  # a trial run's artifact folder of compact networks: compact/level_XX/


def compact(run_id: str, level: int, out, uri: Optional[str] = None):
    """Export one level's ticket, compact it into `out` (trials.export.compact.compact_folder: the
    compact network's files and report) and log that folder to the run as
    compact/level_XX/. Returns trials.export.compact's Compacted."""
    from trials.export.compact import compact_folder

    uri, c = store.connect(uri)
    with tempfile.TemporaryDirectory() as tmp:
        ticket = export(run_id, level, Path(tmp) / "ticket", uri)
        if not (ticket / layout.FINAL).exists():
            raise ConfigError("--level", level, "a level whose final weights were kept (its sweep kept only its "
                              "last level's: sweep setting keep_finals: all keeps every level's)")
        result = compact_folder(ticket, out)
    c.log_artifacts(run_id, str(out), f"{COMPACT}/{layout.level_dir(level)}")
    return result
