"""One Tune trial = one IMP run (trials.run_lottery), reporting once per level.

Each report carries the level's record, the trial's running summaries and a checkpoint
of the trial folder as it stands: spec, levels.jsonl, rewind weights and the newest
level's tensors (earlier levels keep only their record and DONE marker, their tensors
are in earlier checkpoints). A trial restarted from a checkpoint, on any node, copies it
back into its working folder and continues at the next level (see persisted_after for
which checkpoints); levels Tune already has are not reported again.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import ray
from ray import tune

from orchestrator.objectives import STOPPED, matches, summarise
from orchestrator.sweep_spec import config_spec
from orchestrator.sweeps import packs
from orchestrator.sweeps.storage import checkpoint_dirs
from trials import layout
from trials.record import LevelRecord, read_lines

_DATA: dict = {}  # per worker process: datasets already on the device (reused across trials)


def imp_trial(config: dict, base: dict, tolerance: float, stop_when_not_matching: bool,
              share: dict | None = None) -> None:
    """`share`: {"storage", "sweep", "packed"} when the sweep shares work units (units.py), else None."""
    from trials.lottery import run_lottery

    # one "checkpoint created" line per level per trial drowns the driver's progress lines
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)

    spec = config_spec(base, config)
    node = ray.get_runtime_context().get_node_id()  # which node trained each level (clusters)
    work = Path(os.getcwd()) / "lottery"
    registered = tune.get_checkpoint()
    done_before = _level(registered)  # levels after Tune's checkpoint are reported (again: never lost)
    restore([registered] + persisted_after(done_before) if registered else persisted_after(-1), work)
    data = _data(spec, work)
    store = _unit_store(share, [spec], data) if share else None
    waited = store.waited if store else 0.0
    records: list[LevelRecord] = []
    nodes_file = work / layout.NODES  # level -> Ray node id that trained it, kept in the checkpoints

    def report(record: LevelRecord, out) -> bool:
        records.append(record)
        summary = summarise(records, tolerance)
        stop = stop_when_not_matching and not matches(record, records[0], tolerance)
        trained_on = note_node(nodes_file, record.level, node)
        if record.level > done_before:
            metrics = {**record.flat(), **summary, "trial_key": spec.key, "seed": spec.seed,
                       STOPPED: stop, "node_id": trained_on,
                       "unit_wait_s": store.waited - waited if store else 0.0}
            with tempfile.TemporaryDirectory() as tmp:
                snapshot(work, Path(tmp), record.level)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        return stop

    run_lottery(spec, work, report=report, data=data, units=store,
                arithmetic=store.producer.arithmetic if store else "alone")


def imp_pack(config: dict, base: dict, tolerance: float, stop_when_not_matching: bool,
             share: dict | None = None) -> None:
    """One Tune trial = a pack of trials (orchestrator/sweeps/packs.py). Members sharing a
    packing.pack_key train together through trials.lottery.run_pack, the others alone through
    run_lottery, one group after the other, in this process."""
    from trials.lottery import run_lottery
    from trials.lottery import run_pack
    from trials.packing import pack_key
    from trials.training import TrainingDiverged

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    specs = [config_spec(base, c) for c in config[packs.PACK]]
    work = Path(os.getcwd()) / "lottery"
    registered = tune.get_checkpoint()
    restore([registered] + persisted_after(_level(registered)) if registered else persisted_after(-1), work)
    pack = _Pack(specs, work, registered, tolerance, stop_when_not_matching)
    groups: dict = {}
    for i, spec in enumerate(specs):
        if pack.status[i]["status"] == packs.RUNNING:
            key = pack_key(spec)
            groups.setdefault(i if key is None else key, []).append(i)  # an int: a trial that runs alone
    for key, group in groups.items():
        data = _data(specs[group[0]], work)
        pack.store = _unit_store(share, [specs[i] for i in group], data) if share else None
        if isinstance(key, int):
            i = group[0]
            try:
                run_lottery(specs[i], pack.outs[i], data=data, units=pack.store,
                            report=lambda record, out, i=i: pack.report(i, record, flush=True))
            except TrainingDiverged as e:
                pack.fail(i, e)
        else:
            errors: dict = {}
            run_pack([specs[i] for i in group], [pack.outs[i] for i in group], data=data, errors=errors,
                     units=pack.store, after_level=lambda level: pack.flush(),
                     report=lambda record, out: pack.report(pack.outs.index(Path(out)), record))
            for j, e in errors.items():
                pack.fail(group[j], e)
        pack.finish(group)
    pack.flush()


class _Pack:
    """imp_pack's bookkeeping: the members' records and statuses, and the reports to Tune."""

    def __init__(self, specs: list, work: Path, registered, tolerance: float, stop_when_not_matching: bool):
        self.specs, self.work, self.tolerance, self.stop_when = specs, work, tolerance, stop_when_not_matching
        self.outs = [work / packs.member_dir(i) for i in range(len(specs))]
        self.node = ray.get_runtime_context().get_node_id()
        saved = json.loads((work / packs.PACK_FILE).read_text()) if (work / packs.PACK_FILE).exists() else {}
        self.reports = saved.get("reports", 0)
        self.status = saved.get("members") or [{"status": packs.RUNNING, "error": ""} for _ in specs]
        for state in self.status:  # a pack restarted after a lost node: its members go on
            state["status"] = packs.RUNNING if state["status"] == packs.DONE else state["status"]
        # levels Tune has (reported again after them: never lost) and levels whose tensors are checkpointed
        self.reported = [_member_level(registered.filesystem, f"{registered.path}/{packs.member_dir(i)}")
                         if registered else -1 for i in range(len(specs))]
        self.snapped = list(self.reported)
        # members that ended keep their records; the others report theirs again as they run
        self.records: list = [[] if state["status"] == packs.RUNNING or not (out / layout.LEVELS).exists()
                              else read_lines((out / layout.LEVELS).read_text())
                              for state, out in zip(self.status, self.outs)]
        self.new: list = []
        self.changed = False
        self.store = None
        self.waited = 0.0

    def report(self, i: int, record: LevelRecord, flush: bool = False) -> bool:
        records = self.records[i]
        records.append(record)
        stop = self.stop_when and not matches(record, records[0], self.tolerance)
        if stop:
            self._set(i, packs.STOPPED)
        trained_on = note_node(self.outs[i] / layout.NODES, record.level, self.node)
        if record.level > self.reported[i]:
            self.new.append({**record.flat(), "member": i, "node_id": trained_on})
            self.reported[i] = record.level
        if flush:
            self.flush()
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
            members.append({"trial_key": spec.key, "seed": spec.seed, **self.status[i],
                            STOPPED: self.status[i]["status"] == packs.STOPPED, **summary})
        waited = self.store.waited if self.store else 0.0
        metrics = {"pack_members": members, "pack_new": self.new, "pack_reports": self.reports,
                   "node_id": self.node, "unit_wait_s": max(0.0, waited - self.waited)}
        self.waited = waited
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for i, out in enumerate(self.outs):
                if out.exists():
                    files += snapshot(out, Path(tmp) / packs.member_dir(i), self.snapped[i] + 1, Path(tmp))
                    self.snapped[i] = max(self.snapped[i], self.reported[i])
            state = {"reports": self.reports, "members": self.status, "files": files}
            (self.work / packs.PACK_FILE).write_text(json.dumps(state))
            shutil.copy2(self.work / packs.PACK_FILE, Path(tmp) / packs.PACK_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        self.new, self.changed = [], False


_STORES: dict = {}  # per worker process: (storage, sweep) -> UnitStore (one heartbeat, one cache)


def _unit_store(share: dict, specs: list, data):
    """This process's store of the sweep's units, set up to help with units on `data`."""
    from orchestrator.plan import data_key, registrations, work_units
    from orchestrator.sweeps.units import UnitStore, find_broker
    from trials.spec import from_dict

    key = (share["storage"], share["sweep"])
    if key not in _STORES:
        _STORES[key] = UnitStore(share["storage"], find_broker(share["sweep"]), packed=share["packed"])
    store = _STORES[key]
    store.data = data_key(specs[0])
    from trials.lottery import produce

    store.helper = lambda name, unit_spec: produce(name, from_dict(unit_spec), store, data,
                                                   data.train_x.device, store.scratch, store.producer)
    store.register(registrations(work_units(specs)))  # a searched configuration's units
    return store


def _data(spec, work):
    from orchestrator.plan import data_key
    from trials.datasets import load
    from trials.lottery import resolve_device

    device = resolve_device(spec.device)  # "auto": the GPU Ray assigned, else the CPU
    key = (data_key(spec), str(device))
    if key not in _DATA:
        _DATA.clear()  # one dataset per worker at a time: bounded memory
        _DATA[key] = load(spec.dataset, device, spec.train.batch_size)
    return _DATA[key]


def snapshot(work: Path, dest: Path, level: int, root: Optional[Path] = None) -> list[str]:
    """Copy the trial folder, leaving out tensors of levels before `level`; returns the
    copied files' paths relative to `root` (default `dest`)."""
    copied = []
    for src in work.rglob("*"):
        if src.is_dir() or src.name.startswith("."):
            continue
        src_level = layout.level_of(src.parent.name)
        if src_level is not None and src_level < level and src.name.endswith(layout.TENSOR_SUFFIX):
            continue
        target = dest / src.relative_to(work)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        copied.append(str(target.relative_to(root or dest)))
    return copied


def _level(checkpoint) -> int:
    """How far a checkpoint is (-1: no checkpoint): a trial's last level, a pack's count of
    reports (orchestrator/sweeps/packs.py)."""
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
    import pyarrow.fs

    pack = packs.read_pack_file(fs, path)
    if pack is not None:
        return pack["reports"], packs.complete(fs, path, pack)
    newest = _member_level(fs, path)
    done = fs.get_file_info(f"{path}/{layout.level_dir(newest)}/{layout.DONE}").type == pyarrow.fs.FileType.File
    return newest, done


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
