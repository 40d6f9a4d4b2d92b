"""The sweep's one Tune trainable: a Tune trial runs a pack of one or more trials
(orchestrator/sweeps/packs.py), reporting their new levels as they go.

The driver built and validated each member's TrialSpec and decided how the members train
(which together, with which arithmetic, on which data, with which units) once, in the
trial's config (orchestrator/plan.py tune_config; its layout: packs.py); this worker runs
each group through the engine and decides nothing again: it imports no planner.
Each member trains in a local folder and, after every level, sends what changed to its
trial folder in storage (folders.py: each file once, masks as bits, the finals the sweep
keeps). The Tune checkpoint is the pack's state only (PACK_FILE: reports, statuses, the
levels Tune has). A trial restarted, on any node, takes its members' folders back from
storage and goes on at their next level; levels Tune already has are not reported again.
A checkpoint of the previous layout (the members' folders inside it) is restored as
before (see persisted_after for which checkpoints) and then sent to storage whole. A
member that diverges fails alone while the others go on; when every member failed, the
Tune trial fails (Tune retries it, up to the sweep's max_failures).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import ray
from ray import tune

from orchestrator.objectives import STOPPED, matches, summarise
from orchestrator.sweeps import folders, packs
from orchestrator.sweeps.storage import checkpoint_dirs
from orchestrator.sweeps.workers import quiet_exit
from trials.folder import layout
from trials.folder.record import LevelRecord, read_lines

_DATA: dict = {}  # per worker process: datasets already on the device (reused across trials)


def lottery(config: dict, tolerance: float, stop_when_not_matching: bool, share: dict | None = None,
            stored: dict | None = None) -> None:
    """Run the Tune trial's pack. `share`: {"storage", "sweep", "packed"} when the sweep
    shares work units (units.py), else None. `stored`: {"storage", "sweep", "keep_finals"},
    where the members' trial folders live (folders.py)."""
    quiet_exit()  # no "SystemExit: 1" traceback when Ray stops this worker (workers.py)
    # one "checkpoint created" line per checkpoint drowns the driver's progress lines
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    specs = packs.member_specs(config)  # validated by the driver: not again here
    work = Path(os.getcwd()) / "lottery"
    registered = tune.get_checkpoint()
    restore([registered] + persisted_after(_level(registered)) if registered else persisted_after(-1), work)
    mirrors = []
    if stored:
        from orchestrator.sweeps.units import units_root

        units = units_root(share["storage"], share["packed"]) if share else None
        trial_id = tune.get_context().get_trial_id()
        for (member_id, _, sub) in packs.members(trial_id, config):
            mirror = folders.Mirror(work / sub, folders.trial_folder(stored["storage"], stored["sweep"], member_id),
                                    stored.get("keep_finals", "last"), units)
            mirror.pull()  # storage's folder when there is one (never older than a checkpoint)
            mirrors.append(mirror)
    pack = _Pack(specs, work, registered, tolerance, stop_when_not_matching)
    pack.mirrors = mirrors
    errors: list = []
    for group in config[packs.PACK]["groups"]:
        todo = [i for i in group["members"] if pack.status[i]["status"] == packs.RUNNING]
        if not todo:
            continue
        key = packs.group_data(group, specs)
        data = _data(specs[todo[0]], key)
        pack.store = _unit_store(share, key, packs.registrations(config, group), data) if share else None
        pack.waited = pack.store.waited if pack.store and pack.waited is None else pack.waited
        for i, e in train(pack, todo, data, group["arithmetic"]).items():
            pack.fail(i, e)
            errors.append(e)
        pack.finish(todo)
    if errors and all(state["status"] == packs.FAILED for state in pack.status):
        raise errors[0]  # nothing of the pack went on: the Tune trial fails (its checkpoint: members running)
    pack.flush()


def train(pack: "_Pack", todo: list, data, arithmetic: str) -> dict:
    """Members `todo` of the pack trained together through the engine's one level runner
    (trials/runner/levels.py run_pack; a single trial is a pack of one); member -> the exception
    of each that failed. Each level's reports are flushed to Tune once it is written."""
    from trials.runner.levels import ARITHMETICS, run_pack

    errors: dict = {}
    run_pack([pack.specs[i] for i in todo], [pack.outs[i] for i in todo], data=data, errors=errors,
             units=pack.store, after_level=lambda level: pack.flush(),
             arithmetic=ARITHMETICS[arithmetic],
             report=lambda record, out: pack.report(pack.outs.index(Path(out)), record))
    return {todo[j]: e for j, e in errors.items()}


class _Pack:
    """The trainable's bookkeeping: the members' records and statuses, and the reports to Tune."""

    def __init__(self, specs: list, work: Path, registered, tolerance: float, stop_when_not_matching: bool):
        self.specs, self.work, self.tolerance, self.stop_when = specs, work, tolerance, stop_when_not_matching
        self.outs = [work / packs.member_dir(i) for i in range(len(specs))]
        self.node = ray.get_runtime_context().get_node_id()
        saved = json.loads((work / packs.PACK_FILE).read_text()) if (work / packs.PACK_FILE).exists() else {}
        self.reports = saved.get("reports", 0)
        self.status = saved.get("members") or [{"status": packs.RUNNING, "error": ""} for _ in specs]
        for state in self.status:  # a pack restarted after a lost node: its members go on
            state["status"] = packs.RUNNING if state["status"] == packs.DONE else state["status"]
        # levels Tune has (reported again after them: never lost)
        self.reported = _reported(registered, len(specs))
        # members that ended keep their records; the others report theirs again as they run
        self.records: list = [[] if state["status"] == packs.RUNNING or not (out / layout.LEVELS).exists()
                              else read_lines((out / layout.LEVELS).read_text())
                              for state, out in zip(self.status, self.outs)]
        self.new: list = []
        self.changed = False
        self.store = None
        self.mirrors: list = []  # folders.Mirror per member: its folder in storage
        self.waited = None  # the process's store's seconds waited when this trial first used it

    def report(self, i: int, record: LevelRecord) -> bool:
        records = self.records[i]
        records.append(record)
        stop = self.stop_when and not matches(record, records[0], self.tolerance)
        if stop:
            self._set(i, packs.STOPPED)
        trained_on = note_node(self.outs[i] / layout.NODES, record.level, self.node)
        if record.level > self.reported[i]:
            self.new.append({**record.flat(), "member": i, "node_id": trained_on})
            self.reported[i] = record.level
        return stop

    def fail(self, i: int, error: BaseException) -> None:
        self._set(i, packs.FAILED, f"{type(error).__name__}: {error}")

    def finish(self, group: list) -> None:
        for i in group:
            if self.status[i]["status"] == packs.RUNNING:
                self._set(i, packs.DONE)

    def _set(self, i: int, status: str, error: str = "") -> None:
        self.status[i] = {"status": status, "error": error}
        self.changed = True

    def flush(self) -> None:
        """One report of what is new, with a checkpoint of every member's folder."""
        if not self.new and not self.changed:
            return
        self.reports += 1
        members = []
        for i, spec in enumerate(self.specs):
            summary = summarise(self.records[i], self.tolerance) if self.records[i] else {}
            ledger = self.outs[i] / layout.UNITS  # the work units it used (MLflow tags them)
            members.append({"trial_key": spec.key, "seed": spec.seed, **self.status[i],
                            STOPPED: self.status[i]["status"] == packs.STOPPED, **summary,
                            "units": json.loads(ledger.read_text()) if ledger.exists() else None})
        waited = self.store.waited - self.waited if self.store else 0.0  # in this trial so far
        metrics = {"pack_members": members, "pack_new": self.new, "pack_reports": self.reports,
                   "node_id": self.node, "unit_wait_s": waited}
        for mirror in self.mirrors:  # the levels are in storage before Tune hears of them
            mirror.push()
        with tempfile.TemporaryDirectory() as tmp:
            state = {"format": CHECKPOINT_FORMAT, "reports": self.reports, "members": self.status,
                     "reported": self.reported, "files": [packs.PACK_FILE]}
            (self.work / packs.PACK_FILE).write_text(json.dumps(state))
            shutil.copy2(self.work / packs.PACK_FILE, Path(tmp) / packs.PACK_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        self.new, self.changed = [], False


_STORES: dict = {}  # per worker process: (storage, sweep) -> UnitStore (one heartbeat, one cache)


def _unit_store(share: dict, data_key: str, units: list, data):
    """This process's store of the sweep's units, set up to help with units on `data`
    (`data_key`: packs.data_key), the group's `units` registered with the broker (as the
    driver listed them: a searched pack's units; a grid's broker has them all)."""
    from orchestrator.sweeps.units import UnitStore, find_broker
    from trials.spec import validated

    key = (share["storage"], share["sweep"])
    if key not in _STORES:
        _STORES[key] = UnitStore(share["storage"], find_broker(share["sweep"]), packed=share["packed"])
    store = _STORES[key]
    store.data = data_key
    from trials.runner.levels import produce

    # a unit the broker hands over: its spec is a trial's, validated by the driver
    store.helper = lambda name, unit_spec: produce(name, validated(unit_spec), store, data,
                                                   data.train_x.device, store.scratch, store.producer)
    if units:
        store.register(units)
    return store


def _data(spec, data_key: str):
    from trials.nets.datasets import load
    from trials.runner.levels import resolve_device

    device = resolve_device(spec.device)  # "auto": the GPU Ray assigned, else the CPU
    key = (data_key, str(device))
    if key not in _DATA:
        _DATA.clear()  # one dataset per worker at a time: bounded memory
        _DATA[key] = load(spec.dataset, device, spec.train.batch_size)
    return _DATA[key]


def _level(checkpoint) -> int:
    """How far a checkpoint is (-1: no checkpoint): its count of reports (packs.PACK_FILE)."""
    if checkpoint is None:
        return -1
    return _progress(checkpoint.filesystem, checkpoint.path)[0]


def note_node(nodes_file: Path, level: int, node: str) -> str:
    """The Ray node that trained `level`, kept in the trial folder's nodes file (a level
    restored from a checkpoint keeps the node that trained it)."""
    nodes = json.loads(nodes_file.read_text()) if nodes_file.exists() else {}
    nodes.setdefault(str(level), node)
    nodes_file.write_text(json.dumps(nodes))
    return nodes[str(level)]


def _progress(fs, path: str) -> tuple[int, bool]:
    """(_level of the checkpoint in storage at `path`, whether all its files are there)."""
    pack = packs.read_pack_file(fs, path)
    if pack is None:
        raise ValueError(f"no {packs.PACK_FILE} in {path}")
    return pack["reports"], packs.complete(fs, path, pack)


CHECKPOINT_FORMAT = 2  # the pack's state only; 1 (no "format"): the members' folders inside too


def _reported(registered, n: int) -> list:
    """Per member, the last level Tune has (-1: none): the registered checkpoint's record
    of them, or (a checkpoint of the previous layout) its members' levels files."""
    if registered is None:
        return [-1] * n
    saved = packs.read_pack_file(registered.filesystem, registered.path) or {}
    if saved.get("format") == CHECKPOINT_FORMAT:
        return list(saved["reported"])
    return [_member_level(registered.filesystem, f"{registered.path}/{packs.member_dir(i)}") for i in range(n)]


def _member_level(fs, path: str) -> int:
    """The last level of the trial folder at `path` in storage (-1: none)."""
    try:
        with fs.open_input_stream(f"{path}/{layout.LEVELS}") as f:
            return max((r.level for r in read_lines(f.readall().decode())), default=-1)
    except FileNotFoundError:
        return -1


def persisted_after(level: int) -> list:
    """Complete checkpoints this trial wrote to storage beyond `level`, oldest first.

    Tune registers a reported checkpoint a moment after the result; a node lost in that
    moment makes Tune restore the previous one although newer ones are safely in
    storage. Restoring those too keeps "a lost node costs at most the levels in flight"
    exact. Uses Ray's storage context (a private API): without it, Tune's checkpoint alone."""
    try:
        from ray.train._internal.session import get_storage

        storage = get_storage()
        fs, dirs = storage.storage_filesystem, checkpoint_dirs(storage.storage_filesystem, storage.trial_fs_path)
    except Exception:  # noqa: BLE001 - an optional improvement, never a reason to fail
        return []
    found = []
    for d in dirs:
        try:
            newest, whole = _progress(fs, d)
            if newest > level and whole:
                found.append(tune.Checkpoint(d, filesystem=fs))
        except (OSError, ValueError):
            continue  # a checkpoint cut short by the lost node
    return found


def restore(checkpoints: list, work: Path) -> None:
    """The working trial folder = the union of the checkpoints, oldest first (each holds the
    tensors of its own newest level; later ones carry every earlier record and marker)."""
    if work.exists():
        shutil.rmtree(work)
    for checkpoint in checkpoints:
        with checkpoint.as_directory() as ckpt:
            shutil.copytree(ckpt, work, dirs_exist_ok=True)
