"""A sweep's results as rows: one per trial x level, read from Tune's experiment folder
(a Tune trial's members are trials of their own: orchestrator/sweeps/packs.py).

Works on a local folder or s3:// / gs:// storage (through pyarrow's filesystems), and
needs no running Ray instance, so `lth sweep status` is cheap.
"""
from __future__ import annotations

import io
import json
import logging

import pandas as pd

from orchestrator.objectives import OBJECTIVES, STOPPED, summarise
from orchestrator.sweeps import folders, packs
from orchestrator.sweeps.storage import TRIALS_CSV, checkpoint_dirs, sweep_path, write_text
from trials.folder import labels, layout
from trials.folder.environment import mixed
from trials.folder.record import FIELDS, LevelRecord, read_lines

NODE_ID = "node_id"  # the Ray node that trained the level (result key and CSV column)
SUMMARY_FIELDS = (*OBJECTIVES, STOPPED, NODE_ID)


def error_line(trial) -> str:
    """The exception's own message: the last meaningful line of Tune's error trace."""
    text = trial.get_error() if hasattr(trial, "get_error") else None
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "unknown error"


def stored_records(sweep, trial, trial_id: str, sub: str) -> tuple[list[LevelRecord], dict]:
    """(level records, level -> node id) of a trial: from its folder in storage
    (folders.py), the authoritative record (Tune's own result log of a trial that failed
    over may miss rows); in a sweep of the previous layout, from the member's folder `sub`
    of the Tune trial's newest checkpoint."""
    found = folders.stored_records(folders.trial_folder(sweep.storage, sweep.name, trial_id), units=False)
    if found is not None:
        return found[0], found[1]
    fs, base = trial.storage.storage_filesystem, trial.storage.trial_fs_path
    for d in reversed(checkpoint_dirs(fs, base)):
        folder = f"{d}/{sub}"
        try:
            with fs.open_input_stream(f"{folder}/{layout.LEVELS}") as f:
                records = read_lines(f.readall().decode())
            with fs.open_input_stream(f"{folder}/{layout.NODES}") as f:
                return records, json.loads(f.readall().decode())
        except (OSError, ValueError):
            continue  # cut short by a lost node (or the member had not started): the one before holds it
    return [], {}


def tune_trials(experiment_path: str) -> list:
    """The Tune trials of an experiment folder (id, config, status, last result, storage),
    from Tune's experiment state alone. ExperimentAnalysis also reads every trial's result
    log into a DataFrame, which lth never uses: a pack's results carry every member, so at
    10,000 trials that was seconds of `lth sweep status` and of a sweep's end. Raises
    ValueError where Tune saved no state yet."""
    from ray.tune import ExperimentAnalysis

    class StateOnly(ExperimentAnalysis):
        def _fetch_trial_dataframes(self):
            return {}

    # its "Failed to fetch metrics" for trials that reported nothing yet (a stopped
    # driver's): the rows come from the checkpoints, not from Tune's result logs
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    return StateOnly(experiment_path).trials


def collect(sweep) -> list[dict]:
    try:
        trials = tune_trials(sweep_path(sweep.storage, sweep.name))
    except ValueError:  # no experiment state yet
        return []
    rows = []
    for trial in trials:
        ids = packs.members(trial.trial_id, trial.config)
        trial_error = error_line(trial) if trial.status == "ERROR" else ""
        for (trial_id, member, sub), state in zip(ids, packs.statuses(trial.last_result, len(ids))):
            config = member["config"]
            status = packs.member_status(state, trial.status)
            error = state.get("error") or trial_error
            head = {"trial_id": trial_id, "status": status, "error": error if status == "ERROR" else "",
                    **{p: config.get(p) for p in sweep.varied}, "seed": config.get("seed")}
            records, nodes = stored_records(sweep, trial, trial_id, sub)
            if not records:
                rows.append(head)
                continue
            stopped = bool(state.get(STOPPED))  # only a trial's last level can stop it
            for i, record in enumerate(records):
                row = {**head, "trial_key": member["key"], **record.flat()}
                row.update(summarise(records[: i + 1], sweep.tolerance))
                row.update({STOPPED: stopped and i == len(records) - 1, NODE_ID: nodes.get(str(record.level))})
                rows.append(row)
    return rows


def write_csv(sweep, rows: list[dict]) -> str:
    path = sweep_path(sweep.storage, sweep.name) + "/" + TRIALS_CSV
    buf = io.StringIO()
    columns = ["trial_id", "status", "error", *sweep.varied, "seed", "trial_key", *FIELDS,
               *SUMMARY_FIELDS]
    pd.DataFrame(rows, columns=columns).to_csv(buf, index=False)
    write_text(path, buf.getvalue())
    return path


def per_trial(rows: list[dict]) -> list[dict]:
    """The last row of each trial: its status and final summaries."""
    last = {}
    for r in rows:
        last[r["trial_id"]] = r
    return list(last.values())


def pareto_front(trials: list[dict], metrics, modes) -> list[dict]:
    """Trials no other trial beats on every objective (and strictly on one)."""
    def better_or_equal(a, b, m, mode):
        return a[m] >= b[m] if mode == "max" else a[m] <= b[m]

    def strictly(a, b, m, mode):
        return a[m] > b[m] if mode == "max" else a[m] < b[m]

    scored = [t for t in trials if all(t.get(m) is not None for m in metrics)]
    front = []
    for t in scored:
        dominated = any(all(better_or_equal(o, t, m, md) for m, md in zip(metrics, modes))
                        and any(strictly(o, t, m, md) for m, md in zip(metrics, modes))
                        for o in scored if o is not t)
        if not dominated:
            front.append(t)
    return front


def configurations(sweep, trials: list[dict]) -> list[dict]:
    """Finished trials grouped by their varied values (each shown as its first trial holds
    it): seed-means of the objectives, n seeds."""
    groups: dict = {}
    for t in trials:
        if t["status"] == "TERMINATED" and t.get(sweep.search.metric[0]) is not None:
            groups.setdefault(tuple(str(t.get(p)) for p in sweep.varied), []).append(t)
    out = []
    for key, members in groups.items():
        row = {**{p: members[0].get(p) for p in sweep.varied}, "n": len(members), "seeds": [m["seed"] for m in members]}
        for m in sweep.search.metric:
            values = pd.Series([t[m] for t in members], dtype=float)
            row[m], row[f"{m}_std"] = values.mean(), (values.std() if len(values) > 1 else 0.0)
        out.append(row)
    return out


def status_report(sweep, rows: list[dict], top: int = 5) -> str:
    """Trials per state, counted as the live line counts them (progress.py), failures, a
    mixed-machines warning, and the best configurations so far."""
    from orchestrator.sweeps import progress

    trials = per_trial(rows)
    counts = progress.tally(progress.row_states(rows), sweep.trial_count)
    lines = [f"sweep {sweep.name} ({sweep.search.algorithm}): {progress.trials_field(counts, sweep.trial_count)}"]
    lines += [f"  failed {t['trial_id']}: {t['error']}" for t in trials if t["status"] == "ERROR"]
    warning = mixed(r.get("environment") for r in rows if r.get("level") is not None)
    if warning:
        lines.append(warning)
    metrics, modes = list(sweep.search.metric), list(sweep.search.mode)
    configs = configurations(sweep, trials)
    if not configs:
        return "\n".join(lines)
    if len(metrics) == 1:
        ranked = sorted(configs, key=lambda c: c[metrics[0]], reverse=modes[0] == "max")[:top]
        lines.append(f"best configurations so far by {metrics[0]} ({modes[0]}), mean±std over seeds:")
    else:
        ranked = sorted(pareto_front(configs, metrics, modes), key=lambda c: c[metrics[0]])
        lines.append(f"Pareto front of {metrics[0]} ({modes[0]}) x {metrics[1]} ({modes[1]}), seed means:")
    for c in ranked:
        varied = " ".join(f"{p}={labels.short(c[p])}" for p in sweep.varied) or "base"
        spread = (lambda m: f"±{c[m + '_std']:.4f}") if c["n"] > 1 else (lambda m: "")  # one seed: no spread
        scores = "  ".join(f"{m} {c[m]:.4f}{spread(m)}" for m in metrics)
        lines.append(f"  {varied}  {scores}  (n={c['n']})")
    return "\n".join(lines)


def summary_table(sweep, rows: list[dict], width: int | None = None) -> str:
    """Mean over seeds of each configuration's per-level test accuracy (early stop), by
    level: rows in value order (trials/folder/labels.py), a level's density in its header when
    every row reached the same, columns wrapped at `width` (default: the terminal's)."""
    import shutil

    from trials.folder.labels import labels

    df = pd.DataFrame([r for r in rows if r.get("level") is not None])
    if df.empty:
        return "no finished levels"
    keys = [p for p in sweep.varied] or ["trial_key"]
    order = {}
    for key in keys:
        df[key], order[key] = labels(df[key])
    table = df.groupby(keys + ["level"]).agg(density=("density", "mean"), acc=("test_acc_at_early_stop", "mean"),
                                             std=("test_acc_at_early_stop", "std"), n=("seed", "count"))
    shared = (100 * table["density"]).round(1).groupby("level").nunique() == 1

    def cell(r) -> str:
        text = f"{100 * r['acc']:.2f}" + (f"±{100 * r['std']:.2f}" if r["n"] > 1 else "") + f" ({int(r['n'])})"
        return text if shared[r.name[-1]] else f"{text} @{100 * r['density']:.1f}%"
    wide = table.apply(cell, axis=1).unstack("level")
    density = table["density"].groupby("level").mean()
    wide.columns = [f"L{lv} {100 * density[lv]:.1f}%" if shared[lv] else f"L{lv}" for lv in wide.columns]
    wide = wide.reindex(pd.MultiIndex.from_product([order[k] for k in keys], names=keys) if len(keys) > 1
                        else pd.Index(order[keys[0]], name=keys[0])).dropna(how="all").fillna("—")
    width = width or shutil.get_terminal_size((80, 24)).columns
    return ("test accuracy at early stop (%): mean±std over seeds (n), by level (density)\n"
            + wide.to_string(line_width=width))
