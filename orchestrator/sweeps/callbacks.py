"""Driver-side Tune callbacks (part of the sweep runner): progress lines and MLflow.

Both run in the `lth sweep` process, on results the trials hand over; trials themselves
never write to MLflow (ARCHITECTURE.md, "Tracking", says why).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from ray import tune
from ray.tune.logger.tensorboardx import TBXLoggerCallback

from orchestrator.objectives import STOPPED
from orchestrator.plan import level_iterations
from orchestrator.sweeps import folders, packs, progress, results
from orchestrator.tracking import store
from orchestrator.sweeps.storage import checkpoint_dirs
from trials.folder import labels, layout
from trials.folder.record import LevelRecord
from trials.spec import validated
from trials.folder.version import code_version

RUN_STATUS = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}  # Tune trial status -> MLflow run status


def trial_meta(member: dict) -> dict:
    """What a trial's spec.json holds, from the member's part of its Tune config (packs.py)."""
    return {"key": member["key"], "spec": member["spec"], **code_version()}


class NoTensorBoard(TBXLoggerCallback):
    """Stands in for Tune's TensorBoard logger, which Tune adds to every run that has none:
    it imports and writes nothing. The real one imports tensorboardX, and through it torch,
    into the driver (a second on 2 cores; ARCHITECTURE.md, "The sweep runner") for event
    files no lth command reads. Tune's CSV and JSON loggers stay (result.json,
    progress.csv); a sweep started before this class resumes with Tune's own loggers."""

    def __init__(self):  # noqa: D107 - TBXLoggerCallback's would import tensorboardX
        pass

    def log_trial_start(self, trial) -> None:
        pass

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        pass

    def log_trial_end(self, trial, failed: bool = False) -> None:
        pass


class LevelProgress(tune.Callback):
    """Where the sweep is, on the driver's stderr (orchestrator/sweeps/progress.py). At a
    terminal: one live status line that fits the terminal's width, redrawn at most once a
    second, with failures printed above it. Otherwise (a log): one line per finished level,
    per failed trial and per finished trial, the last with the status line's counts.
    A resumed sweep starts from what storage holds (levels recorded, units published), so
    its counts are `lth sweep status`'s."""

    REDRAW_S, UNITS_S = 1.0, 5.0

    def __init__(self, sweep):
        self.sweep = sweep
        self.told: set = set()  # failed pack members already said
        self.live = sys.stderr.isatty()
        self.progress = None
        self.seen: set = set()  # (trial id, level) counted
        self.drawn = self.asked = 0.0

    def setup(self, **info):
        # a restored driver starts over from storage (its callbacks come back unpickled, maybe from an older lth)
        try:
            rows = results.collect(self.sweep)
        except Exception:  # noqa: BLE001 - a progress line never fails the sweep: count from zero
            rows = []
        self.progress = progress.of_rows(self.sweep, rows)
        self.progress.units_before = self.progress.units_now  # reused by this run
        self.progress.iterations_before = self.progress.iterations_done
        self.seen = {(r["trial_id"], r["level"]) for r in rows if r.get("level") is not None}
        self.ended = {r["trial_id"] for r in rows if r.get(STOPPED) is True}  # counted as stopped (progress.stopped)
        self.live, self.drawn, self.asked = sys.stderr.isatty(), 0.0, 0.0

    def _say(self, text: str) -> None:
        print(("\r\x1b[K" if self.live else "") + text, file=sys.stderr, flush=True)
        self.drawn = 0.0  # redraw the live line below it

    def on_trial_result(self, iteration, trials, trial, result, **info):
        ids = packs.members(trial.trial_id, trial.config)
        for new in result.get("pack_new", ()):
            trial_id, member, _ = ids[new["member"]]
            self._level(trial_id, member["config"], LevelRecord.from_flat(new))
        for (trial_id, _, _), state in zip(ids, packs.statuses(result, len(ids))):
            if state.get("status") == packs.FAILED and trial_id not in self.told:
                self.told.add(trial_id)
                self._say(f"[{trial_id}] failed: {state['error']}")

    def _level(self, trial_id: str, config: dict, r: LevelRecord) -> None:
        if (trial_id, r.level) not in self.seen:
            self.seen.add((trial_id, r.level))
            self.progress.add_level(r.iterations)
        if self.live:
            return
        varied = " ".join(f"{p}={labels.short(config.get(p))}" for p in self.sweep.varied)
        self._say(f"[{trial_id}] {varied} seed={config.get('seed')} level {r.level}: "
                  f"density {r.density:.4f} test_acc {r.test_acc:.4f} "
                  f"(early stop {r.test_acc_at_early_stop:.4f})")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"[{trial.trial_id}] failed: {results.error_line(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Tune calls this before it marks `trial` TERMINATED: it counts as done here
        self.asked = 0.0  # and the units published, now
        self._count(trials, finished=trial)
        if not self.live:
            self._say(f"[{trial.trial_id}] finished ({self.progress.line()})")

    def on_step_end(self, iteration, trials, **info):
        if self.live and time.monotonic() - self.drawn >= self.REDRAW_S:
            self._count(trials)
            print(f"\r\x1b[K{self._live_line()}", end="", file=sys.stderr, flush=True)
            self.drawn = time.monotonic()

    def on_experiment_end(self, trials, **info):
        self.asked = 0.0
        self._count(trials)
        if self.live:
            print(f"\r\x1b[K{self._live_line()}", file=sys.stderr, flush=True)

    def _live_line(self) -> str:
        """The status line in the terminal's width less one column (a line that fills the
        last column wraps on some terminals, and \\r then redraws only the new row)."""
        width = progress.columns(sys.stderr) - 1
        return self.progress.line(width=width, prefix=f"{self.sweep.name}: ")

    def _count(self, trials, finished=None) -> None:
        states = []
        for t in trials:
            status = "TERMINATED" if t is finished else t.status
            ids = packs.members(t.trial_id, t.config)
            for (trial_id, member, _), state in zip(ids, packs.statuses(t.last_result, len(ids))):
                states.append(progress.state_of(packs.member_status(state, status)))
                if state.get("status") == packs.STOPPED and trial_id not in self.ended:
                    self.ended.add(trial_id)
                    planned = level_iterations(validated(member["spec"]))  # the driver validated it
                    self.progress.stopped(planned, sum(seen == trial_id for seen, _ in self.seen))
        self.progress.count(states)
        if self.progress.units and time.monotonic() - self.asked >= self.UNITS_S:
            self.asked = time.monotonic()
            self.progress.units_now = _published(self.sweep.name, self.progress.units_now)


def _published(sweep_name: str, last: int) -> int:
    """Units the sweep's broker knows as published (`last` when it does not answer soon)."""
    import ray

    from orchestrator.sweeps.units import find_broker

    broker = find_broker(sweep_name)
    try:
        return ray.get(broker.state.remote(), timeout=2)["published"] if broker else last
    except Exception:  # noqa: BLE001 - a progress line never fails the sweep
        return last


TRACKERS: dict = {}  # sweep name -> SweepTracker of this driver process (set by the runner)
WRITERS: dict = {}  # sweep name -> its Writer in this driver process (made by MlflowLogger)


class Writer:
    """The driver's MLflow writes, in order, on a thread of their own. Tune's loop hands a
    trial its next step only after the result's callbacks return, so a write done there
    (an SQLite commit waits on the disk; a server answers over the network) held the trial
    back; queued, the trials go on while the writes are made (ARCHITECTURE.md, "Tracking").
    One thread, one tracker: the writes keep their order and the tracker is never shared."""

    def __init__(self, logger: "MlflowLogger"):
        import queue
        import threading

        self.logger, self.queue = logger, queue.Queue()
        self.busy = 0.0  # seconds spent writing
        self.thread = threading.Thread(target=self._run, name="lth-mlflow-writer", daemon=True)
        self.thread.start()

    def put(self, what: str, fn) -> None:
        self.queue.put((what, fn))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                started = time.perf_counter()
                self.logger._try(*item)
                self.busy += time.perf_counter() - started
            finally:
                self.queue.task_done()

    def drain(self) -> None:
        """Wait until every queued write is made."""
        self.queue.join()

    def close(self) -> None:
        self.drain()
        self.queue.put(None)
        self.thread.join()


def drain(sweep_name: str) -> None:
    """Every queued MLflow write of the sweep made, its writer ended (before the end's replay)."""
    writer = WRITERS.pop(sweep_name, None)
    if writer is not None:
        writer.close()


class MlflowLogger(tune.Callback):
    """Logs each trial's new levels into MLflow as the results arrive (metrics, the units
    it used, where its folder is in storage; tensors only where the sweep asks for them,
    at the end), through the sweep's Writer: off Tune's loop, in order. A failure (server
    away) is noted and left to the end-of-sweep `replay`, which copies everything from
    storage.

    Tune pickles its callbacks into the experiment (tuner.pkl) and a restored sweep gets
    them back: this one therefore holds only the sweep and looks its tracker (an open
    MLflow client) up in this process's TRACKERS, its writer in WRITERS."""

    def __init__(self, sweep):
        self.sweep, self.failed = sweep, False

    @property
    def tracker(self):
        return TRACKERS[self.sweep.name]

    def _write(self, what: str, fn) -> None:
        """`fn` (which must hold its own arguments: it runs later) queued for the writer."""
        writer = WRITERS.get(self.sweep.name)
        if writer is None:
            writer = WRITERS[self.sweep.name] = Writer(self)
        writer.put(what, fn)

    def _try(self, what, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - logging must never fail the sweep
            if self.sweep.name in TRACKERS:
                self.tracker.doubt()  # what failed may have reached the store: read it back first
            if not self.failed:
                print(f"lth: MLflow unavailable ({what}: {str(e).splitlines()[0][:160] if str(e) else e!r}); "
                      "the sweep goes on and replays the record at the end", file=sys.stderr, flush=True)
            self.failed = True

    def on_trial_start(self, iteration, trials, trial, **info):
        for trial_id, member, _ in packs.members(trial.trial_id, trial.config):
            self._write("trial start", lambda meta=trial_meta(member), trial_id=trial_id:
                        self.tracker.child(meta, trial_id))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        new = result.get("pack_new") or ()
        if not new:
            return
        ids = packs.members(trial.trial_id, trial.config)
        states = packs.statuses(result, len(ids))
        logs = []
        by_member: dict = {}
        for entry in new:
            by_member.setdefault(entry["member"], []).append(LevelRecord.from_flat(entry))
        for i, records in sorted(by_member.items()):
            trial_id, member, _ = ids[i]
            where = folders.trial_folder(self.sweep.storage, self.sweep.name, trial_id)
            logs.append((trial_meta(member), trial_id, records, states[i].get("units"), where))

        def log():
            for args in logs:
                self.tracker.log_trial(*args)

        self._write("levels", log)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._status(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._status(trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        drain(self.sweep.name)

    def _status(self, trial, status):
        ids = packs.members(trial.trial_id, trial.config)
        for (_, member, _), state in zip(ids, packs.statuses(trial.last_result, len(ids))):
            mine = RUN_STATUS.get(packs.member_status(state, ""))  # a member's own end, if any
            self._write("status", lambda key=member["key"], run_status=mine or status:
                        self.tracker.set_status(key, run_status))


def replay(sweep, tracker_factory, experiment_path: str) -> bool:
    """The end-of-sweep reconciliation: every trial's stored folder (folders.py), its
    status. A sweep of the previous layout: its checkpoints' member folders. Files are read
    in place on local/NFS storage, downloaded to a temporary folder from s3:// or gs://
    (only levels.jsonl and units.json, unless the sweep sends tensors to MLflow)."""
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        plan = []
        for trial in results.tune_trials(experiment_path):
            fs = trial.storage.storage_filesystem
            ids = packs.members(trial.trial_id, trial.config)
            old = None  # the previous layout's checkpoint folders, read when a member has no stored folder
            for (trial_id, member, sub), state in zip(ids, packs.statuses(trial.last_result, len(ids))):
                status = RUN_STATUS.get(packs.member_status(state, trial.status), "KILLED")
                where = folders.trial_folder(sweep.storage, sweep.name, trial_id)
                local = Path(tmp) / "trials" / trial_id
                if _fetch(where, local, sweep.track_tensors):
                    plan.append((trial_id, trial_meta(member), status, [local], where))
                    continue
                if old is None:
                    dirs = checkpoint_dirs(fs, trial.storage.trial_fs_path)
                    if isinstance(fs, pyarrow.fs.LocalFileSystem):
                        old = [Path(d) for d in dirs]
                    else:
                        old = [Path(tune.Checkpoint(d, filesystem=fs).to_directory(f"{tmp}/{trial.trial_id}/{i}"))
                               for i, d in enumerate(dirs)]
                mine = [f / sub for f in old if (f / sub / layout.SPEC).exists()]
                plan.append((trial_id, trial_meta(member), status, mine, None))
        return store.sync(tracker_factory, plan, tensors=sweep.track_tensors)


def _fetch(where: str, local: Path, tensors: bool) -> bool:
    """A stored trial folder's files that MLflow gets into `local` (all of them when
    `tensors`); whether storage holds the folder."""
    if folders.read_file(where, layout.SPEC) is None:
        return False
    if tensors:
        folders.Mirror(local, where).pull()
    else:
        local.mkdir(parents=True)
        folders.download(where, local, [layout.SPEC, layout.LEVELS, layout.UNITS])
    return True
