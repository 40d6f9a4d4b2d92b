"""The ticket registry: rank (trial, level) pairs across an experiment, export one.

Reads MLflow through orchestrator.tracking.store's client (mlflow itself is imported there).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from orchestrator.tracking import store
from trials.errors import ConfigError

LEVEL_METRICS = ("density", "test_acc", "test_acc_at_early_stop", "early_stop_iteration", "remaining_params")
RANK_METRICS = ("test_acc_at_early_stop", "test_acc", "val_acc")


def trial_runs(c, experiment: str, uri: str) -> list:
    exp = store.experiment_id(c, experiment, uri, create=False)
    if exp is None:
        names = [e.name for e in c.search_experiments()]
        raise ConfigError("--experiment", experiment, f"known experiments: {', '.join(names) or 'none'}")
    return list(c.search_runs([exp], filter_string=f"tags.`{store.TAG_KIND}` = 'trial'", max_results=50000))


def level_rows(c, run, metrics=LEVEL_METRICS) -> list[dict]:
    """One dict per logged level of a trial run: its metrics, varied params and tags."""
    history = {m: {x.step: x.value for x in c.get_metric_history(run.info.run_id, m)} for m in metrics}
    varied = [p for p in run.data.tags.get(store.TAG_VARIED, "").split(",") if p]
    head = {"run_id": run.info.run_id, "trial_key": run.data.tags.get(store.TAG_KEY),
            "sweep": run.data.tags.get(store.TAG_SWEEP), "status": run.info.status,
            "seed": _number(run.data.params.get("seed")),
            **{p: _number(run.data.params.get(p)) for p in varied}}
    counts = ("early_stop_iteration", "remaining_params")  # MLflow stores every metric as a float
    return [{**head, "level": step, **{m: _count(history[m].get(step)) if m in counts else history[m].get(step)
                                       for m in metrics}}
            for step in sorted(history[metrics[0]])]


def _count(value):
    return None if value is None else int(value)


def _number(text):
    if text is None:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def best(experiment: str, uri: Optional[str] = None, metric: str = "test_acc_at_early_stop",
         max_density: Optional[float] = None, min_acc: Optional[float] = None, top: int = 10) -> list[dict]:
    """(trial, level) pairs ranked by `metric` (descending), filtered by density and accuracy."""
    if metric not in RANK_METRICS:
        raise ConfigError("--metric", metric, f"allowed: {', '.join(RANK_METRICS)}")
    uri = store.resolve_uri(uri)
    store.check_reachable(uri, "--tracking-uri")
    c = store.client(uri)
    metrics = tuple(dict.fromkeys(LEVEL_METRICS + (metric,)))
    rows = [r for run in trial_runs(c, experiment, uri) for r in level_rows(c, run, metrics)]
    rows = [r for r in rows if r.get(metric) is not None
            and (max_density is None or r["density"] <= max_density)
            and (min_acc is None or r[metric] >= min_acc)]
    rows.sort(key=lambda r: (-r[metric], r["density"], r["run_id"], r["level"]))
    return rows[:top]


def export(run_id: str, level: int, out, uri: Optional[str] = None) -> Path:
    """Write one level's ticket: spec.json, record.json, rewind/mask/final safetensors."""
    uri = store.resolve_uri(uri)
    store.check_reachable(uri, "--tracking-uri")
    c = store.client(uri)
    try:
        c.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing run
        raise ConfigError("RUN_ID", run_id, f"a run id of {uri}") from None
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", str(out), "a new or empty folder")
    wanted = {"spec.json": "spec.json", "levels.jsonl": "levels.jsonl",
              "ticket/rewind.safetensors": "rewind.safetensors",
              f"ticket/level_{level:02d}/mask.safetensors": "mask.safetensors",
              f"ticket/level_{level:02d}/final.safetensors": "final.safetensors"}
    with tempfile.TemporaryDirectory() as tmp:
        levels = [f.path for f in c.list_artifacts(run_id, "ticket") if f.is_dir]
        if f"ticket/level_{level:02d}" not in levels:
            logged = ", ".join(p.rsplit("_", 1)[1] for p in sorted(levels)) or "none"
            raise ConfigError("--level", level, f"levels logged for this run: {logged}")
        for remote, local in wanted.items():
            shutil.move(c.download_artifacts(run_id, remote, tmp), Path(tmp) / f"x_{local}")
        records = [json.loads(x) for x in (Path(tmp) / "x_levels.jsonl").read_text().splitlines()]
        out.mkdir(parents=True, exist_ok=True)
        for local in wanted.values():
            if local != "levels.jsonl":
                shutil.move(Path(tmp) / f"x_{local}", out / local)
    record = next(r for r in records if r["level"] == level)
    (out / "record.json").write_text(json.dumps({**record, "run_id": run_id, "tracking_uri": uri}, indent=1))
    return out
