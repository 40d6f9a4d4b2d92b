"""MLflow tracking: the only module that imports mlflow.

Who writes: only the sweep driver (the `lth sweep` process). Trials hand their records
over through Tune results and keep their files in their trial folders in storage
(orchestrator/sweeps/folders.py); the driver logs each result's new levels as they
arrive (`SweepTracker.log_trial`) and reconciles everything from storage at the end
(`sync`). Why: SQLite takes one writer at a time, and on a cluster workers then need no
network path to the tracking server. A server that goes away mid-sweep costs nothing:
what failed to log is replayed by `sync`.

Layout: experiment = the sweep's `experiment`; one parent run per sweep (tag
lth.kind=sweep); one child run per trial (mlflow.parentRunId, run name and tag
lth.trial_key = the trial's content key; its name: what varies in the sweep and the seed);
params = the flattened spec fields its method reads (trials/methods); metrics per
level with step = level; tag lth.folder = the trial's folder in storage. Tensors only
when asked (a sweep's track_tensors, `lth tickets best --export`): spec.json,
levels.jsonl, ticket/rewind.safetensors, ticket/level_XX/{mask,final}.safetensors
(names from trials/folder/layout.py; metrics are the tracked fields of trials/folder/record.py).
Every write first checks what is there, so a
resumed or re-run sweep reuses its runs and never logs a step twice. Exactly once
through an outage too: a write that fails may still have reached the store (the server
stored it, then died before it answered), so after any failed write the tracker reads
each run's steps back from the store before it sends that run another level
(`SweepTracker.doubt`); and a level's metrics keep the timestamp of their first sending,
so that a batch sent twice all the same is the same rows (SQL stores keep one). The parent run also
holds the sweep's levels table (levels_table.py): readers take runs and levels from it
instead of asking MLflow run by run.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from orchestrator.tracking import levels_table
from trials.folder import labels, layout
from trials import methods
from trials.core.errors import ConfigError
from trials.folder.record import TRACKED, read_lines
from trials.folder.environment import listed
from trials.spec import flatten

UNIT_DENSE, UNIT_TRUNK, UNIT_REUSED = "lth.unit.dense", "lth.unit.trunk", "lth.unit.reused"
TAG_ENVIRONMENT = "lth.environment"  # JSON list: the environments its levels were trained in
TICKET = "ticket"  # artifact folder of a trial run that mirrors the trial folder's tensors
TAG_KIND, TAG_SWEEP, TAG_KEY, TAG_TRIAL, TAG_VARIED = (
    "lth.kind", "lth.sweep", "lth.trial_key", "lth.tune_trial_id", "lth.varied")
SPEC_TAGS = {"seed": "seed", "prune.kind": "prune_kind", "rewind_iteration": "rewind_iteration",
             "control": "control"}
TAG_FOLDER = "lth.folder"  # a trial run: its trial folder in the sweep's storage (path or URI)
BATCH_METRICS = 1000  # MLflow's most metrics in one log_batch
TABLE_UPLOAD_SECONDS = 30.0  # at most one levels-table upload per this while levels arrive


def resolve_uri(uri: Optional[str] = None, cwd: Optional[Path] = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here; sqlite made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(((cwd or Path.cwd()) / uri[len("sqlite:///"):]).resolve())
    return uri


def client(uri: str):
    # fail fast instead of MLflow's minutes of retries: what fails is replayed by sync()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def connect(uri: Optional[str] = None, key: str = "--tracking-uri"):
    """(absolute uri, client) of a store that answers, for the readers (analysis, tickets).
    A reader creates nothing: an SQLite store must exist already (MLflow would create an
    empty database at a mistyped path and then report the experiment missing)."""
    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(key, uri, "an existing MLflow store (no database at that path; a sweep creates it)")
    check_reachable(uri, key)
    return uri, client(uri)


def check_reachable(uri: str, key: str = "tracking_uri") -> None:
    """One clear line (ConfigError) when the store cannot be reached; nothing is created."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(key, uri, f"a running MLflow server; none answers there ({reason})") from None
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means "not usable"
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ConfigError(key, uri, f"an MLflow tracking store that answers ({reason})") from None


def experiment_id(c, name: str, uri: str, create: bool = True) -> Optional[str]:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in whatever cwd
        location = str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name)
    return c.create_experiment(name, artifact_location=location)


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def find_run(c, exp_id: str, tags: dict):
    runs = c.search_runs([exp_id], filter_string=tag_query(tags), max_results=2)
    return runs[0] if runs else None


def tag_query(tags: dict) -> str:
    """A search filter: every tag equal to its value (None: the tag is absent)."""
    return " and ".join(f"tags.`{k}` IS NULL" if v is None else f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())


def search(c, exp_id: str, tags: dict, view: str = "ACTIVE_ONLY", page: int = 10000) -> list:
    """Every run of the experiment with these tags (tag_query), page by page; `view`:
    ACTIVE_ONLY, DELETED_ONLY or ALL (MLflow's ViewType)."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        batch = c.search_runs([exp_id], filter_string=tag_query(tags), run_view_type=getattr(ViewType, view),
                              max_results=page, page_token=token)
        runs.extend(batch)
        token = batch.token
        if not token:
            return runs


def head(run, params: Optional[dict] = None) -> dict:
    """What readers show of a trial run (levels_table.head); `params` when just logged."""
    tags = run.data.tags
    return levels_table.head(run.info.run_id, tags.get(TAG_KEY), tags.get(TAG_SWEEP), run.info.status,
                             tags.get(TAG_VARIED), run.data.params if params is None else params)


def run_name(flat: dict, varied) -> str:
    """A trial run's name: what varies in its sweep, then its seed, e.g. "prune.rate=0.3
    control=shuffle seed=1" (a whole varied section, `model`, by its name; a search's
    floats at 4 significant digits). The trial key stays a tag (TAG_KEY)."""
    def value(path):
        if path in flat:
            return flat[path]
        inner = {k[len(path) + 1:]: v for k, v in flat.items() if k.startswith(path + ".")}
        return inner.get("name", inner)

    shown = [f"{p}={labels.short(value(p))}" for p in varied if p != "seed"]
    return " ".join([*shown, f"seed={flat.get('seed')}"])[:250]  # MLflow's limit on a run name


class SweepTracker:
    def __init__(self, sweep):
        self.sweep, self.uri = sweep, sweep.tracking_uri
        self.c = client(self.uri)
        self.exp = experiment_id(self.c, sweep.experiment, self.uri)
        self.parent = self._parent()
        self.known: dict = {}  # trial key -> {"run_id", "steps": set, "head", "read", "folder"}
        self.runs, self.runs_read = None, 0  # trial key -> the sweep's runs found in the store (_existing)
        self.doubts = 0  # failed writes so far; a run whose steps were read before the last one re-reads them
        self.table = self._table()
        self.uploaded = float("-inf")  # time.monotonic() of the last table upload

    def _table(self) -> levels_table.LevelsTable:
        """A resumed sweep starts from the table it uploaded before (replay completes it).
        Without a usable one, no run of the sweep may stay marked as held by a table."""
        frame = levels_table.download(self.c, self.parent)
        if frame is None:
            held = {TAG_KIND: "trial", "mlflow.parentRunId": self.parent, levels_table.STATE_TAG: levels_table.CURRENT}
            for run in search(self.c, self.exp, held):
                self.c.set_tag(run.info.run_id, levels_table.STATE_TAG, levels_table.STALE)
        return levels_table.LevelsTable(frame)

    def _parent(self) -> str:
        tags = {TAG_KIND: "sweep", TAG_SWEEP: self.sweep.name}
        run = find_run(self.c, self.exp, tags)
        if run is not None:
            self.c.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.c.create_run(self.exp, run_name=self.sweep.name,
                                tags={**tags, TAG_VARIED: ",".join(self.sweep.varied)})
        from mlflow.entities import Param

        d = self.sweep.to_dict()
        params = {"search": d["search"]["algorithm"], "seeds": json.dumps(d["seeds"]),
                  "space": json.dumps(d["space"])[:6000], "tolerance": d["tolerance"],
                  "resources": json.dumps(d["resources"])}
        self.c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def child(self, meta: dict, tune_trial_id: str) -> dict:
        """The trial's run (found by sweep + trial key, else created with params and tags)."""
        key = meta["key"]
        if key in self.known:
            return self.known[key]
        tags = {TAG_KIND: "trial", TAG_SWEEP: self.sweep.name, TAG_KEY: key}
        run = self._existing(key, tags)
        flat = flatten(meta["spec"])
        if run is None:
            extra = {SPEC_TAGS[p]: str(flat.get(p)) for p in SPEC_TAGS}
            run = self.c.create_run(self.exp, run_name=run_name(flat, self.sweep.varied), tags={
                **tags, **extra, "mlflow.parentRunId": self.parent, TAG_TRIAL: tune_trial_id,
                TAG_VARIED: ",".join(self.sweep.varied), "git_sha": str(meta.get("git_sha")),
                "lth.version": str(meta.get("version")), levels_table.STATE_TAG: levels_table.STALE})
            steps = set()
        else:
            steps = self._steps(run.info.run_id)
        params, pending = run.data.params, {}
        if not params:  # new, or created by a driver that died before the params: sent with its first batch
            params = pending = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v)
                                for k, v in methods.get(flat["method"]).params(flat).items()}
        self.known[key] = {"run_id": run.info.run_id, "steps": steps, "head": head(run, params),
                           "read": self.doubts, "folder": run.data.tags.get(TAG_FOLDER), "pending": pending}
        self.table.set_head(self.known[key]["head"])
        if run.data.tags.get(levels_table.STATE_TAG) != levels_table.CURRENT:
            self.table.mark(run.info.run_id, steps)  # current again once the table holds it
        return self.known[key]

    def _existing(self, key: str, tags: dict):
        """The sweep's run of a trial key, if any: every trial run of the sweep is read in one
        search when the first is asked for (not one search per trial); after a failed write
        (which may have created a run after all) the store is asked again."""
        if self.runs is None or self.runs_read != self.doubts:
            self.runs = {r.data.tags.get(TAG_KEY): r for r in search(self.c, self.exp, {
                TAG_KIND: "trial", TAG_SWEEP: self.sweep.name})}
            self.runs_read = self.doubts
        return self.runs.get(key)

    def _steps(self, run_id: str) -> set:
        """The levels the store holds for a run (a level's metrics go in one batch)."""
        return {m.step for m in self.c.get_metric_history(run_id, TRACKED[0])}

    def doubt(self) -> None:
        """A write failed: it may have reached the store all the same. Every run's steps
        are read back from the store before its next level is sent."""
        self.doubts += 1

    def _list(self, run_id, path):
        return [f for f in self.c.list_artifacts(run_id, path)]

    def log_checkpoint(self, folder: Path, tune_trial_id: str, refresh: bool = True, tensors: bool = False,
                       where: Optional[str] = None) -> str:
        """Log a trial folder as it stands (a local copy of a stored trial folder, or a
        checkpoint's member folder of the previous layout): its levels, units and, when
        `tensors`, its tensors (ticket/...). `refresh` is kept for callers of the previous
        layout (spec and levels go to MLflow as params and metrics now, not as files)."""
        meta = json.loads((folder / layout.SPEC).read_text())
        units = json.loads((folder / layout.UNITS).read_text()) if (folder / layout.UNITS).exists() else None
        levels = folder / layout.LEVELS  # absent: a pack member that failed before its first level
        records = read_lines(levels.read_text()) if levels.exists() else []
        run_id = self.log_trial(meta, tune_trial_id, records, units, where)
        if tensors:
            self.log_tensors(run_id, folder)
        return run_id

    def log_trial(self, meta: dict, tune_trial_id: str, records: list, units: Optional[dict] = None,
                  where: Optional[str] = None) -> str:
        """A trial's levels (new ones only), the work units it used and where its folder is
        in storage (tag lth.folder), in one batch per run where something is new."""
        run = self.child(meta, tune_trial_id)
        tags = self._unit_tags(run, units)
        if where and run.get("folder") != where:
            tags[TAG_FOLDER] = where
        self._log_levels(run, records, tags)
        if where:
            run["folder"] = where
        self.upload_table()
        return run["run_id"]

    def log_tensors(self, run_id: str, folder: Path) -> None:
        """The ticket's tensors of a local trial folder into the run (ticket/...), those
        not there yet: asked for (a sweep's track_tensors, `lth tickets best --export`)."""
        there = {f.path for f in self._list(run_id, TICKET)}
        there |= {f.path for d in list(there) for f in self._list(run_id, d)}
        for local, remote in self._artifacts(folder):
            if remote not in there:
                self.c.log_artifact(run_id, str(local), remote.rsplit("/", 1)[0] or None)

    def _unit_tags(self, run: dict, used: Optional[dict]) -> dict:
        """A shared sweep's trial run names the work units it used (trials/runner/shared.py):
        lth.unit.dense, lth.unit.trunk (IMP's; a trial that prunes at init has none), and
        lth.unit.reused = the levels another trial trained. The tags that changed."""
        if not used:
            return {}
        tags = {UNIT_DENSE: used["dense"], **({UNIT_TRUNK: used["trunk"]} if "trunk" in used else {}),
                UNIT_REUSED: ",".join(map(str, used["reused"])) or "none"}
        known = run.setdefault("unit_tags", {})
        changed = {tag: value for tag, value in tags.items() if known.get(tag) != value}
        known.update(changed)
        return changed

    def _log_levels(self, run: dict, records: list, tags: Optional[dict] = None) -> None:
        """New levels as metrics, the run marked stale in the same batch (readers then read
        it from MLflow until the table holds the level), with `tags`; then every logged
        level into the table."""
        from mlflow.entities import Metric, RunTag

        if run["read"] != self.doubts:  # a write failed since: what reached the store before it died?
            run["steps"] |= self._steps(run["run_id"])
            run["read"] = self.doubts
        tags = dict(tags or {})
        envs = listed(r.environment for r in records)
        if envs and run.get("environments") != envs:  # where its levels were trained (trials/folder/environment.py)
            tags[TAG_ENVIRONMENT] = envs
        stamps = run.setdefault("stamps", {})  # level -> its metrics' timestamp, kept for a resend
        metrics = []
        for r in records:
            if r.level not in run["steps"]:
                now = stamps.setdefault(r.level, int(time.time() * 1000))
                metrics += [Metric(k, float(getattr(r, k)), now, r.level) for k in TRACKED
                            if getattr(r, k) is not None]  # an optional field not measured: no metric
        if metrics:
            tags[levels_table.STATE_TAG] = levels_table.STALE
        self._send(run, metrics, [RunTag(k, v) for k, v in tags.items()])
        if envs:
            run["environments"] = envs
        new = {r.level for r in records} - run["steps"]
        if new:
            run["steps"] |= new
            self.table.mark(run["run_id"], run["steps"])
        for r in records:
            if r.level in run["steps"]:
                self.table.add(run["run_id"], r)

    def upload_table(self, now: bool = False) -> None:
        """Publish the sweep's table (levels_table.LevelsTable.publish): throttled while
        levels arrive (a big sweep would otherwise re-upload it per level), at once when `now`."""
        if now or time.monotonic() - self.uploaded >= TABLE_UPLOAD_SECONDS:
            self.table.publish(self.c, self.parent)
            self.uploaded = time.monotonic()

    @staticmethod
    def _artifacts(folder: Path):
        """(local file, artifact path) of the ticket files in a checkpoint: the rewind
        weights and every level folder that still holds tensors."""
        if (folder / layout.REWIND).exists():
            yield folder / layout.REWIND, f"{TICKET}/{layout.REWIND}"
        for level_dir in sorted(d for d in folder.iterdir() if layout.level_of(d.name) is not None):
            for f in sorted(level_dir.glob(f"*{layout.TENSOR_SUFFIX}")):
                yield f, f"{TICKET}/{level_dir.name}/{f.name}"

    def _send(self, run: dict, metrics: list, tags: list) -> None:
        """One log_batch of a run's metrics and tags, with its params while they are not
        sent yet (chunked only where MLflow's limits ask: 1,000 metrics, 100 params, 100
        tags a batch). The params count as sent once a batch that held them returned."""
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in (run.get("pending") or {}).items()]
        while metrics or tags or params:
            self.c.log_batch(run["run_id"], metrics=metrics[:BATCH_METRICS], params=params[:100], tags=tags[:100])
            metrics, params, tags = metrics[BATCH_METRICS:], params[100:], tags[100:]
        run["pending"] = {}

    def set_status(self, key: str, status: str) -> None:
        """The run's status, unless the tracker knows the store holds it already (the end's
        replay would otherwise write every run's status again: a commit per trial)."""
        if key not in self.known:
            return
        run = self.known[key]
        changed = run["head"]["status"] != status
        if not changed and not run.get("pending") and run.get("ended") == self.doubts:
            return
        if changed or run.get("pending"):  # stale first: readers never pair the new status with the table's old one
            from mlflow.entities import RunTag

            self._send(run, [], [RunTag(levels_table.STATE_TAG, levels_table.STALE)] if changed else [])
        self.c.set_terminated(run["run_id"], status=status)
        run["ended"] = self.doubts  # the store holds this status (unless a write failed since)
        if changed:
            run["head"] = {**run["head"], "status": status}
            self.table.set_head(run["head"])
            self.table.mark(run["run_id"], run["steps"])

    def finish(self, status: str = "FINISHED") -> None:
        """The parent run ends: FAILED when a trial failed (the sweep's exit status says so too)."""
        self.upload_table(now=True)
        self.c.set_terminated(self.parent, status=status)


def sync(tracker_factory, trials: list, attempts: int = 36, wait_seconds: float = 5.0, tensors: bool = False) -> bool:
    """Replay a sweep into MLflow (idempotent), retrying while the store is unreachable:
    about 3 minutes (a server restarting on a busy 2-core machine took most of a minute).
    `trials`: (tune trial id, meta, run status, [local trial folders, oldest first], where
    the trial folder is in storage or None); `tensors`: their tensors go to MLflow too."""
    tracker = None
    for attempt in range(attempts):
        try:
            tracker = tracker_factory()
            for trial_id, meta, status, folders, where in trials:
                tracker.child(meta, trial_id)
                for i, folder in enumerate(folders):
                    tracker.log_checkpoint(folder, trial_id, tensors=tensors, where=where)
                tracker.set_status(meta["key"], status)
            tracker.finish("FAILED" if any(t[2] == "FAILED" for t in trials) else "FINISHED")
            return True
        except Exception as e:  # noqa: BLE001 - the store may be down; try again
            if tracker is not None:
                tracker.doubt()
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            print(f"lth: MLflow sync failed ({reason}); retrying in {wait_seconds:.0f} s "
                  f"({attempt + 1}/{attempts})", file=sys.stderr, flush=True)
            time.sleep(wait_seconds)
    return False
