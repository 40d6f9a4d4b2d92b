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

import ray
from ray import tune

from orchestrator.objectives import STOPPED, matches, summarise
from orchestrator.sweep_spec import config_spec
from orchestrator.sweeps.storage import checkpoint_dirs
from trials import layout, shared
from trials.record import LevelRecord, read_lines

_DATA: dict = {}  # per worker process: datasets already on the device (reused across trials)


def imp_trial(config: dict, base: dict, tolerance: float, stop_when_not_matching: bool,
              share: dict | None = None) -> None:
    """`share`: {"storage", "sweep"} when the sweep shares work units (units.py), else None."""
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
    store = _unit_store(share, spec, data) if share else None
    waited = store.waited if store else 0.0
    records: list[LevelRecord] = []
    nodes_file = work / layout.NODES  # level -> Ray node id that trained it, kept in the checkpoints

    def report(record: LevelRecord, out) -> bool:
        records.append(record)
        summary = summarise(records, tolerance)
        stop = stop_when_not_matching and not matches(record, records[0], tolerance)
        nodes = json.loads(nodes_file.read_text()) if nodes_file.exists() else {}
        nodes.setdefault(str(record.level), node)  # a restored level keeps the node that trained it
        nodes_file.write_text(json.dumps(nodes))
        if record.level > done_before:
            metrics = {**record.flat(), **summary, "trial_key": spec.key, "seed": spec.seed,
                       STOPPED: stop, "node_id": nodes[str(record.level)],
                       "unit_wait_s": store.waited - waited if store else 0.0}
            with tempfile.TemporaryDirectory() as tmp:
                snapshot(work, Path(tmp), record.level)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        return stop

    run_lottery(spec, work, report=report, data=data, runner=shared.runner(store) if store else None)


_STORES: dict = {}  # per worker process: (storage, sweep) -> UnitStore (one heartbeat, one cache)


def _unit_store(share: dict, spec, data):
    """This process's store of the sweep's units, set up to help with units on `data`."""
    from orchestrator.plan import data_key, registrations, work_units
    from orchestrator.sweeps.units import UnitStore, find_broker
    from trials.spec import from_dict

    key = (share["storage"], share["sweep"])
    if key not in _STORES:
        _STORES[key] = UnitStore(share["storage"], find_broker(share["sweep"]))
    store = _STORES[key]
    store.data = data_key(spec)
    store.helper = lambda name, unit_spec: shared.produce(name, from_dict(unit_spec), store, data,
                                                          data.train_x.device, store.scratch)
    store.register(registrations(work_units([spec])))  # a searched configuration's units
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


def snapshot(work: Path, dest: Path, level: int) -> None:
    """Copy the trial folder, leaving out tensors of levels before `level`."""
    for src in work.rglob("*"):
        if src.is_dir() or src.name.startswith("."):
            continue
        src_level = layout.level_of(src.parent.name)
        if src_level is not None and src_level < level and src.name.endswith(layout.TENSOR_SUFFIX):
            continue
        target = dest / src.relative_to(work)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _level(checkpoint) -> int:
    """The last level a checkpoint holds (-1: no checkpoint)."""
    if checkpoint is None:
        return -1
    fs, path = checkpoint.filesystem, checkpoint.path
    with fs.open_input_stream(f"{path}/{layout.LEVELS}") as f:
        return max((r.level for r in read_lines(f.readall().decode())), default=-1)


def persisted_after(level: int) -> list:
    """Complete checkpoints this trial wrote to storage beyond `level`, oldest first.

    Tune registers a reported checkpoint a moment after the result; a node lost in that
    moment makes Tune restore the previous one although newer ones are safely in
    storage. Restoring those too keeps "a lost node costs at most the levels in flight"
    exact. Uses Ray's storage context (a private API): without it, Tune's checkpoint alone."""
    import pyarrow.fs

    try:
        from ray.train._internal.session import get_storage

        storage = get_storage()
        fs, dirs = storage.storage_filesystem, checkpoint_dirs(storage.storage_filesystem, storage.trial_fs_path)
    except Exception:  # noqa: BLE001 - an optional improvement, never a reason to fail
        return []
    found = []
    for d in dirs:
        try:
            ckpt = tune.Checkpoint(d, filesystem=fs)
            newest = _level(ckpt)
            if newest > level and fs.get_file_info(f"{d}/{layout.level_dir(newest)}/{layout.DONE}").type == pyarrow.fs.FileType.File:
                found.append(ckpt)
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
