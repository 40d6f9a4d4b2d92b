"""MLflow -> one tidy pandas DataFrame: a row per trial x level, typed columns.

Trial runs and their levels come from orchestrator/tracking/read.py: the sweeps' levels
tables (one download per sweep) where current, MLflow run by run otherwise."""
from __future__ import annotations

from typing import Optional, get_origin

import pandas as pd

from orchestrator.tracking import levels_table, read, store
from trials import methods
from trials.folder.record import COUNTS, TRACKED
from trials.spec import field_paths
from trials.core.errors import ConfigError
from trials.core.typed import from_logged, non_null

DENSE_FIELDS = ("model.", "dataset.", "train.")  # with seed, all that decides the dense (level 0) network
HEAD = levels_table.NAMES


def runs(experiment: str, tracking_uri: Optional[str] = None, tables: bool = True, sweeps=None) -> pd.DataFrame:
    """Every logged level of every trial of `experiment` (of the named `sweeps` only, when
    given), each trial once (read.select): spec fields (typed as the spec types them),
    seed, level, density, accuracies, early-stop iteration, run status. `df.attrs["read"]`
    says what was read (read.describe). `tables=False` reads every run's metric histories
    instead of the sweeps' tables."""
    uri, c = store.connect(tracking_uri)
    heads, levels = [], []
    trials, what = read.select(read.trials(c, experiment, uri, TRACKED, tables), experiment, sweeps)
    kept: dict = {}  # (method, param names) -> the names its method reads (methods.logged), asked once
    for trial in trials:
        params = trial["params"]
        key = (params.get("method"), tuple(params))
        if key not in kept:
            kept[key] = tuple(methods.logged(params))
        names = kept[key]
        heads.append({**{k: trial[k] for k in HEAD}, "environments": trial.get("environments"),
                      **{name: params[name] for name in names}})
        levels += [{"run_id": trial["run_id"], "level": level, **{m: values.get(m) for m in TRACKED}}
                   for level, values in sorted(trial["levels"].items())]
    if not levels:
        return pd.DataFrame()
    # spec columns are parsed once per run, not per level (thousands of runs x levels)
    per_run = spec_typed(_spec_order(pd.DataFrame(heads)))
    df = tidy(per_run.merge(pd.DataFrame(levels), on="run_id", validate="one_to_many"))
    df.attrs["read"] = what
    return df


DENSITIES = {"nominal": "density", "effective": "effective_density"}


def with_density(df: pd.DataFrame, kind: str = "nominal") -> pd.DataFrame:
    """`df` with its `density` column the chosen kind: nominal (the mask's fraction of
    weights) or effective (the fraction on some input-to-output path, `effective_density`
    in records that carry it). Refused when a trial's records lack it (older sweeps)."""
    if kind not in DENSITIES:
        raise ConfigError("--density-kind", kind, f"allowed: {', '.join(DENSITIES)}")
    if kind == "nominal":
        return df
    column = DENSITIES[kind]
    lacking = df[df[column].isna()] if column in df else df
    if not lacking.empty:
        sweeps = sorted(set(lacking["sweep"].dropna().astype(str)))
        raise ConfigError("--density-kind", kind, f"allowed: nominal (the records of sweep(s) {', '.join(sweeps) or '?'} "
                          f"have no {column}: written by an lth before it was recorded)")
    out = df.assign(density=df[column].astype(float))
    out.attrs = dict(df.attrs)
    return out


def method_names(df: pd.DataFrame) -> pd.Series:
    """Each row's trial method; runs logged before there was a choice are IMP."""
    if "method" not in df:
        return pd.Series(methods.DEFAULT, index=df.index, dtype="string")
    return df["method"].astype("string").fillna(methods.DEFAULT)


COST = "cost_iterations"  # trials/folder/record.py: iterations trained to obtain a level's network


def with_cost(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with `cost_iterations` on every row: the iterations trained to obtain that
    level's network, its own training included. Where a record carries it (early-bird
    draws) that value; otherwise it follows from the spec and the method (trials/methods),
    with T = train.iterations and k = rewind_iteration: a pruned mask (IMP and its
    controls) costs levels 0..L, T + L (T - k), since level 0 trains T and each later
    level T - k; a mask scored at the rewind point costs the k dense iterations to get
    there plus its own T - k, so T; a searched supermask (edge-popup) its own T. A row of
    an unregistered method, or whose runs lack train.iterations, stays NaN."""
    out = df.copy()
    out.attrs = dict(df.attrs)
    recorded = pd.to_numeric(out[COST], errors="coerce") if COST in out else pd.Series(float("nan"), index=out.index)
    T = pd.to_numeric(out.get("train.iterations"), errors="coerce") if "train.iterations" in out else None
    if T is None:
        out[COST] = recorded.astype(float)
        return out
    k = pd.to_numeric(out["rewind_iteration"], errors="coerce").fillna(0) if "rewind_iteration" in out else 0
    level = pd.to_numeric(out["level"], errors="coerce")
    entries = [methods.METHODS.get(m) if m in methods.METHODS else None for m in method_names(out)]
    pruned = pd.Series([e is not None and e.mask == "pruned" for e in entries], index=out.index)
    known = pd.Series([e is not None and e.mask in ("pruned", "scored", "searched") for e in entries], index=out.index)
    derived = T.where(~pruned, T + level * (T - k)).astype(float)
    derived = derived.where(known)
    out[COST] = recorded.where(recorded.notna(), derived).astype(float)
    return out


def _spec_order(df: pd.DataFrame) -> pd.DataFrame:
    """Columns: the run's names, the spec's fields in the spec's order, then other params."""
    spec = [p for p in field_paths() if p in df]
    return df[[*HEAD, *spec, *sorted(set(df.columns) - set(HEAD) - set(spec))]]


def spec_typed(df: pd.DataFrame) -> pd.DataFrame:
    """Spec columns get the spec's types (nullable where the spec allows null)."""
    for path, tp in field_paths().items():
        if path in df:
            df[path] = _column(df[path], tp)
    return df


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Counts as whole numbers (MLflow stores floats), names as strings, rows in (sweep,
    trial, level) order."""
    for name in COUNTS:
        if name in df:
            df[name] = pd.to_numeric(df[name], errors="coerce").round().astype("Int64")
    for name in set(TRACKED) - set(COUNTS):  # an optional metric never logged is NaN on both read paths
        if name in df:
            df[name] = pd.to_numeric(df[name], errors="coerce").astype(float)
    for name in HEAD:
        df[name] = df[name].astype("string")
    return df.sort_values(["sweep", "trial_key", "level", "run_id"], kind="stable").reset_index(drop=True)


def _column(values: pd.Series, tp) -> pd.Series:
    """A column of logged params (strings) as the spec's type `tp`; null stays null. Each
    distinct value is parsed once (a column of 10,000 runs holds a few), except where the
    parsed value could be changed in place (a mapping)."""
    core = non_null(tp)
    if get_origin(core) is tuple:
        parsed = [from_logged(v, tp) for v in values]
    else:
        seen: dict = {}  # keyed with the type too: 1, 1.0 and True are one dict key
        parsed = [seen[k] if (k := (type(v), v)) in seen else seen.setdefault(k, from_logged(v, tp)) for v in values]
    dtype = {int: "Int64", float: "Float64", bool: "boolean"}.get(core)
    if dtype:
        return pd.array(parsed, dtype=dtype)
    column = pd.Series(parsed, index=values.index, dtype=object)
    return column if get_origin(core) is tuple else column.astype("string")


def dense_key(df: pd.DataFrame) -> pd.Series:
    """Trials sharing this key trained the same dense network (level 0 is shared)."""
    cols = sorted(c for c in df.columns if c.startswith(DENSE_FIELDS)) + ["seed"]
    key = df[cols[0]].astype(object).map(str)
    for col in cols[1:]:  # column by column: a row-wise join takes seconds on 50,000 rows
        key = key + "|" + df[col].astype(object).map(str)
    return key.rename(None)


# Spec fields that never split a row: the seed (a row pools seeds), and where a trial ran
# or read its data from (not what it computed).
NOT_CONFIGURATION = ("seed", "device", "dataset.data_dir", "train.fused")


def configuration_fields(df: pd.DataFrame) -> list:
    """The spec fields in `df` that describe what a trial computed (all but NOT_CONFIGURATION)."""
    return [p for p in field_paths() if p in df and p not in NOT_CONFIGURATION]


def differing(df: pd.DataFrame, rows: list, axis=()) -> list:
    """Configuration fields (not `rows`, nor a figure's `axis`) in which two trials of one
    row differ."""
    per_run = df.drop_duplicates("run_id") if "run_id" in df else df  # fewer rows; same answer
    rest = [f for f in configuration_fields(per_run) if f not in rows and f not in axis]
    if not rest:
        return []
    text = per_run[rest].astype(object).map(str)
    grouped = text.groupby([per_run[r].astype(object).map(str) for r in rows]) if rows else text.groupby(
        pd.Series(0, index=text.index))
    counts = grouped.nunique()
    return [f for f in rest if (counts[f] > 1).any()]


def row_fields(df: pd.DataFrame, rows: list, axis=()) -> tuple[list, list]:
    """(the rows a table or figure groups by, the fields added to the asked ones). Added:
    `method` and `control` when trials differ in them (a control is never averaged into
    its ticket's row, nor one method into another), then every other configuration field
    in which the trials of a row differ: a row pools seeds, never configurations."""
    rows = list(rows)
    added = [f for f in ("method", "control") if f not in rows and f in df and df[f].astype(str).nunique() > 1]
    rows = [*added[:1], *rows, *added[1:]] if added[:1] == ["method"] else [*rows, *added]
    extra = differing(df, rows, axis)
    return [*rows, *extra], [*added, *extra]
