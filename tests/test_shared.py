"""Shared work (trials/runner/shared.py, orchestrator/sweeps/units.py, orchestrator/plan.py):
a unit is trained once, by one holder; a dead holder is taken over; a waiting trial helps;
and a shared trial's records equal the same trial run alone, bit for bit."""
import json
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import yaml

from tests.conftest import LTH, digits_base, quick_spec
from trials.runner import shared
from trials.runner.levels import run_lottery
from trials.spec import PruneSpec, TrainSpec
from trials.folder.store import load_tensors

TRAIN = TrainSpec(optimizer="adam", lr=1e-3, batch_size=60, iterations=60, eval_interval=20)


def numbers(records):
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in records]


def store(root: Path, broker=None):
    from orchestrator.sweeps.units import UnitStore

    return UnitStore(str(root), broker, scratch=root.parent / f"scratch-{len(list(root.parent.iterdir()))}")


def logged(root: Path) -> Counter:
    from orchestrator.sweeps.units import trained_log

    return Counter(e["unit"] for e in trained_log(str(root)))


# ---------------------------------------------------------------- the engine on units


def test_shared_trials_equal_unshared_ones_and_each_unit_is_trained_once(tmp_path, digits_cpu):
    units = store(tmp_path / "storage")
    for k in (0, 30):
        for control in ("none", "reinit", "random_prune"):
            spec = quick_spec(train=TRAIN, rewind_iteration=k, control=control,
                              prune=PruneSpec(rate=0.2, output_rate=0.1, levels=2))
            alone = run_lottery(spec, tmp_path / f"alone-{k}-{control}", data=digits_cpu)
            out = tmp_path / f"shared-{k}-{control}"
            together = run_lottery(spec, out, data=digits_cpu, units=units)
            assert numbers(together) == numbers(alone), (k, control)
            for level in range(3):  # the files too: masks and weights, bit for bit
                for name in ("mask.safetensors", "final.safetensors"):
                    a = load_tensors(tmp_path / f"alone-{k}-{control}" / f"level_0{level}" / name)
                    b = load_tensors(out / f"level_0{level}" / name)
                    assert all(a[n].equal(b[n]) for n in a), (k, control, level, name)
            ledger = json.loads((out / "units.json").read_text())
            assert ledger["dense"] == shared.dense_name(spec) and ledger["trunk"] == shared.trunk_name(spec)
    counts = logged(tmp_path / "storage")
    # one dense run for both rewind points; one trunk per k; k=30 was not kept by the dense
    # run (this store knows no plan), so its point was trained: 30 iterations from init
    assert set(counts.values()) == {1}
    assert sorted(n.split("/")[0] for n in counts) == ["dense", "point", "trunk", "trunk", "trunk", "trunk"]
    assert any(n.endswith("-30") for n in counts)


def test_retraining_modes_and_instability_share_too(tmp_path, digits_cpu):
    from trials.spec import StabilitySpec

    units = store(tmp_path / "storage")
    for retrain, control in (("lr_rewind", "none"), ("finetune", "random_prune")):
        spec = quick_spec(train=TRAIN, rewind_iteration=20, retrain=retrain, control=control,
                          prune=PruneSpec(levels=1), stability=StabilitySpec(copies=2, points=3, levels=(0, 1)))
        alone = run_lottery(spec, tmp_path / f"alone-{retrain}", data=digits_cpu)
        together = run_lottery(spec, tmp_path / f"shared-{retrain}", data=digits_cpu, units=units)
        assert numbers(together) == numbers(alone), retrain
        assert together[0].stability_error_barrier is not None and together[1].stability_error_barrier is not None
    assert logged(tmp_path / "storage")[shared.dense_name(spec)] == 1  # one dense run for both modes


def test_a_helper_produces_the_units_of_a_trial_measuring_instability_at_chosen_levels(tmp_path, digits_cpu):
    """A helper trains another trial's dense run and trunk level 1 from that trial's spec:
    stability.levels [0, 2] is no reason to fail (issue 35: the helper once cut the spec to
    prune.levels 0, which [0, 2] does not fit), and the trial then trains only level 2."""
    import torch

    from trials.runner.levels import Producer, produce
    from trials.loop.arithmetic import Alone
    from trials.spec import StabilitySpec

    spec = quick_spec(train=TRAIN, rewind_iteration=20, prune=PruneSpec(levels=2),
                      stability=StabilitySpec(copies=2, points=3, levels=(0, 2)))
    units = store(tmp_path / "storage")
    made = [shared.dense_name(spec), shared.level_name(spec, 1)]
    for name in made:
        produce(name, spec, units, digits_cpu, torch.device("cpu"), units.scratch, Producer(Alone))
        assert units.published(name), name
    assert logged(tmp_path / "storage") == Counter(made)  # nothing beyond the unit asked for
    alone = run_lottery(spec, tmp_path / "alone", data=digits_cpu)
    together = run_lottery(spec, tmp_path / "shared", data=digits_cpu, units=units)
    assert numbers(together) == numbers(alone)
    assert together[2].stability_error_barrier is not None and together[1].stability_error_barrier is None
    assert logged(tmp_path / "storage") == Counter(made + [shared.level_name(spec, 2)])


def test_a_rewind_point_the_dense_run_did_not_keep_is_trained_to_the_same_bits(tmp_path, digits_cpu):
    units = store(tmp_path / "storage")
    first = quick_spec(train=TRAIN, prune=PruneSpec(levels=1))
    run_lottery(first, tmp_path / "k0", data=digits_cpu, units=units)
    later = first.replace(rewind_iteration=40)  # a later sweep asks for another rewind point
    run_lottery(later, tmp_path / "k40", data=digits_cpu, units=units)
    alone = tmp_path / "alone"
    run_lottery(later, alone, data=digits_cpu)
    a, b = load_tensors(alone / "rewind.safetensors"), load_tensors(tmp_path / "k40" / "rewind.safetensors")
    assert all(a[n].equal(b[n]) for n in a)
    assert logged(tmp_path / "storage")[shared.point_name(later, 40)] == 1


def test_a_longer_trunk_serves_a_shorter_trial(tmp_path, digits_cpu):
    units = store(tmp_path / "storage")
    long = quick_spec(train=TRAIN, prune=PruneSpec(levels=2))
    run_lottery(long, tmp_path / "long", data=digits_cpu, units=units)
    before = logged(tmp_path / "storage")
    short = long.replace(prune=PruneSpec(levels=1))
    records = run_lottery(short, tmp_path / "short", data=digits_cpu, units=units)
    assert logged(tmp_path / "storage") == before and len(records) == 2
    assert shared.trunk_name(short) == shared.trunk_name(long) and short.key != long.key
    assert json.loads((tmp_path / "short" / "units.json").read_text())["reused"] == [0, 1]


def test_a_half_written_unit_is_never_read(tmp_path):
    units = store(tmp_path / "storage")
    half = tmp_path / "storage" / "_units" / "dense" / "x"
    half.mkdir(parents=True)
    (half / "final.safetensors").write_text("cut short")  # a holder died before DONE
    folder, mine = units.obtain("dense/x", lambda dest: (dest / "final.safetensors").write_text("whole"))
    assert mine and (folder / "final.safetensors").read_text() == "whole"
    assert (half / "DONE").exists() and (half / "final.safetensors").read_text() == "whole"


def test_unit_keys_follow_what_decides_the_numbers():
    base = quick_spec(train=TRAIN)
    assert shared.dense_name(base) == shared.dense_name(base.replace(rewind_iteration=30, control="reinit"))
    assert shared.dense_name(base) != shared.dense_name(base.replace(seed=1))
    assert shared.dense_name(base) != shared.dense_name(base.replace(train=TrainSpec(lr=0.01, iterations=60,
                                                                                      eval_interval=20)))
    assert shared.trunk_name(base) == shared.trunk_name(base.replace(control="random_prune"))
    assert shared.trunk_name(base) != shared.trunk_name(base.replace(rewind_iteration=30))
    assert shared.trunk_name(base) != shared.trunk_name(base.replace(prune=PruneSpec(kind="structured")))
    assert shared.dense_name(base) == shared.dense_name(base.replace(device="cuda"))  # where, not what


# ---------------------------------------------------------------- leases on a real Ray actor


def test_two_trials_needing_one_unit_train_it_once(tmp_path, ray_local):
    from orchestrator.sweeps.units import Broker

    broker = Broker.remote(5.0)
    calls, results = [], []

    def produce(dest):
        calls.append(1)
        time.sleep(1.0)
        (dest / "weights").write_text("w")

    stores = [store(tmp_path / "storage", broker) for _ in range(2)]
    threads = [threading.Thread(target=lambda s=s: results.append(s.obtain("dense/x", produce))) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(mine for _, mine in results) == [False, True]
    assert all((folder / "weights").read_text() == "w" for folder, _ in results)
    assert logged(tmp_path / "storage") == Counter({"dense/x": 1})


def test_claim_answers_without_waiting_and_publish_logs_how_a_unit_was_trained(tmp_path, ray_local):
    from orchestrator.sweeps.units import Broker, trained_log

    local = store(tmp_path / "local")
    assert local.claim("dense/x") == local.claim("dense/x") == ("yours", None)  # no broker: ours until published
    folder = local.publish("dense/x", lambda dest: (dest / "f").write_text("x"), pack=3, seconds=1.5)
    assert local.claim("dense/x") == ("published", folder)
    assert [(e["pack"], e["seconds"]) for e in trained_log(str(tmp_path / "local"))] == [(3, 1.5)]

    broker = Broker.remote(5.0)
    a, b = store(tmp_path / "storage", broker), store(tmp_path / "storage", broker)
    assert a.claim("dense/y") == ("yours", None) and b.claim("dense/y") == ("held", None)
    a.publish("dense/y", lambda dest: (dest / "f").write_text("y"))
    verdict, folder = b.claim("dense/y")
    assert verdict == "published" and (folder / "f").read_text() == "y"
    assert [e["pack"] for e in trained_log(str(tmp_path / "storage"))] == [1]


def test_a_dead_holders_unit_is_taken_over_and_a_waiting_trial_helps_meanwhile(tmp_path, ray_local):
    import ray

    from orchestrator.sweeps.units import Broker

    broker = Broker.remote(2.0)
    ray.get(broker.register.remote([
        {"name": "dense/held", "deps": [], "spec": {}, "data": "d"},
        {"name": "dense/ready", "deps": [], "spec": {}, "data": "d"},
        {"name": "trunk/t/level_01", "deps": ["dense/held"], "spec": {}, "data": "d"},  # not ready
        {"name": "dense/other-data", "deps": [], "spec": {}, "data": "elsewhere"}]))
    assert ray.get(broker.claim.remote("dense/held", "ghost")) == "yours"  # then dies: never renews
    s = store(tmp_path / "storage", broker)
    s.data, helped = "d", []

    def helper(name, spec):
        helped.append(name)
        s.obtain(name, lambda dest: (dest / "f").write_text(name))

    s.helper = helper
    started = time.monotonic()
    folder, mine = s.obtain("dense/held", lambda dest: (dest / "f").write_text("taken over"))
    assert mine and (folder / "f").read_text() == "taken over"
    assert time.monotonic() - started >= 1.5  # it waited for the lease to expire...
    assert helped == ["dense/ready"]  # ...after doing the one unit that was ready
    state = ray.get(broker.state.remote())
    assert ("dense/held", "ghost") in state["takeovers"]
    assert ray.get(broker.claim.remote("dense/held", "ghost")) == "published"


def test_the_cache_keeps_the_newest_units_and_no_empty_folders(tmp_path, monkeypatch):
    """A process keeps CACHE_UNITS units fetched; older ones go with the folders they leave
    empty (a sweep of 10,000 trials left thousands of empty trunk folders that every
    publish walked), and an evicted unit is fetched again from storage."""
    from orchestrator.sweeps import units as units_module

    monkeypatch.setattr(units_module, "CACHE_UNITS", 2)
    s = store(tmp_path / "storage")
    names = ["trunk/a/level_01", "trunk/a/level_02", "trunk/b/level_01", "dense/c"]
    for name in names:
        s.publish(name, lambda dest, name=name: (dest / "f").write_text(name))
    kept = sorted(str(d.relative_to(s.cache)) for d in s.cache.rglob("*") if d.is_dir())
    assert kept == ["dense", "dense/c", "trunk", "trunk/b", "trunk/b/level_01"]  # trunk/a went whole
    verdict, folder = s.claim("trunk/a/level_01")
    assert verdict == "published" and (folder / "f").read_text() == "trunk/a/level_01"
    assert not (s.cache / "trunk" / "b").exists() and len(list(s.cache.rglob(units_module.DONE))) == 2


def test_the_heartbeat_ends_with_its_store(tmp_path, ray_local):
    """A store's heartbeat stops when the store is closed or collected (and once Ray is shut
    down): a thread left renewing leases after `ray.shutdown` made Ray start again at a
    process's exit."""
    import gc

    from orchestrator.sweeps.units import Broker

    broker = Broker.remote(0.2)  # a beat every 0.05 s
    closed, dropped = store(tmp_path / "storage", broker), store(tmp_path / "storage", broker)
    beats = [closed.heartbeat, dropped.heartbeat]
    assert all(b.is_alive() for b in beats)
    closed.close()
    del dropped
    gc.collect()
    for b in beats:
        b.join(timeout=5)
    assert not any(b.is_alive() for b in beats)
    assert ray_local.is_initialized()


# ---------------------------------------------------------------- the planner


def test_plan_counts_the_issue_grid(tmp_path):
    import subprocess

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "g", "experiment": "g", "base": digits_base(levels=4, iterations=300),
        "space": {"prune.kind": {"grid": ["unstructured", "structured"]}, "rewind_iteration": {"grid": [0, 30]},
                  "control": {"grid": ["none", "reinit", "random_prune"]}}, "seeds": 3,
        "storage": str(tmp_path / "runs")}))
    out = subprocess.run([LTH, "sweep", "plan", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # per seed, unshared: kind x [k=0: 1500 + 2 x 2700; k=30: 1380 + 2 x 2460] = 26,400
    # shared: one dense run 300 + 2 kinds x (4x300 + 4x270) trunk + 8 controls' own levels 9,120 = 13,980
    # the trials' own levels, as the live line and `lth sweep status` count them: per seed
    # kind x control x [k=0: 1500; k=30: 1380] = 17,280
    assert out.stdout.splitlines()[-2:] == [
        "plan: 36 trials, 180 levels, 51 shared units, 51,840 iterations in the trials' levels",
        "to train: 41,940 iterations, 79,200 without sharing (47% fewer)"]
    assert out.stdout.count("dense/") == 3 and out.stdout.count("trunk/") == 12
    assert "keeps rewind points 0, 30" in out.stdout
    off = subprocess.run([LTH, "sweep", "plan", str(path), "--set", "share=false"], capture_output=True,
                         text=True, timeout=120)
    assert off.stdout.splitlines()[-2:] == ["plan: 36 trials, 180 levels, 51,840 iterations in the trials' levels",
                                            "to train: 79,200 iterations, 79,200 without sharing (0% fewer)"]
    bad = subprocess.run([LTH, "sweep", "plan", str(path), "--set", "share=maybe"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "share" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- a real shared sweep


def test_a_shared_sweep_records_what_an_unshared_one_does_and_a_later_sweep_reuses_it(tmp_path, ray_local):
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps import runner

    def sweep(name, share):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "experiment": "sharing", "base": digits_base(levels=2), "share": share,
            "space": {"rewind_iteration": {"grid": [0, 30]}, "control": {"grid": ["none", "reinit", "random_prune"]}},
            "resources": {"cpu": 1}, "max_concurrent": 2, "storage": str(tmp_path / "runs"),
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
        runner.run(load_sweep(path))
        return pd.read_csv(tmp_path / "runs" / name / "trials.csv")

    def numbers(df):
        cols = [c for c in df.columns if c not in ("trial_id", "seconds", "node_id")]
        return df[cols].sort_values(["trial_key", "level"]).reset_index(drop=True)

    together, alone = sweep("together", True), sweep("alone", False)
    assert list(together.columns) == list(alone.columns)
    pd.testing.assert_frame_equal(numbers(together), numbers(alone))
    assert len(together) == 6 * 3 and set(together.status) == {"TERMINATED"}
    counts = logged(tmp_path / "runs")
    # one dense run keeping both rewind points, two trunks of 2 levels: 5 units, once each
    assert sum(counts.values()) == 5 and set(counts.values()) == {1}

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("sharing")
    runs = c.search_runs([exp.experiment_id], "tags.`lth.kind` = 'trial' and tags.`lth.sweep` = 'together'")
    assert len(runs) == 6
    assert len({r.data.tags["lth.unit.dense"] for r in runs}) == 1
    assert len({r.data.tags["lth.unit.trunk"] for r in runs}) == 2
    # lth.unit.reused: the levels another process trained. One dense run serves all 6 trials
    # and one trunk 3 of them: whoever trained a level, the others list it as reused
    reused = {r.info.run_id: r.data.tags["lth.unit.reused"].split(",") for r in runs}
    assert sum("0" in levels for levels in reused.values()) >= 5
    for trunk in {r.data.tags["lth.unit.trunk"] for r in runs}:
        users = [reused[r.info.run_id] for r in runs if r.data.tags["lth.unit.trunk"] == trunk]
        assert all(sum(str(level) in levels for levels in users) >= 2 for level in (1, 2)), users

    again = sweep("again", True)  # a later sweep on the same storage trains no unit again
    assert logged(tmp_path / "runs") == counts
    pd.testing.assert_frame_equal(numbers(again), numbers(alone))


def test_scratch_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    """Ray ends workers without atexit, so a UnitStore's scratch folder (its cached units)
    outlives its process; the next UnitStore on the node removes those whose pid is dead,
    and one with no pid file older than a day; it keeps a live process's, one being created
    (no pid file yet, recent), one whose pid file it cannot read, and anything else."""
    import os
    import subprocess
    import sys
    import tempfile

    from orchestrator.sweeps import units

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folders = {name: tmp_path / f"{units.SCRATCH_PREFIX}{name}" for name in ("dead", "live", "new", "old", "bad")}
    for name, folder in folders.items():
        (folder / "cache" / "unit").mkdir(parents=True)
    (folders["dead"] / "pid").write_text(gone.stdout.strip())
    (folders["live"] / "pid").write_text(str(os.getpid()))
    (folders["bad"] / "pid").write_text("not a pid")
    old = time.time() - units.STALE_SCRATCH_SECONDS - 60
    os.utime(folders["old"], (old, old))  # no pid file: from before pid files, a day old
    (tmp_path / "other").mkdir()

    store = units.UnitStore(str(tmp_path / "runs"))
    assert store.scratch.parent == tmp_path and (store.scratch / "pid").read_text() == str(os.getpid())
    left = {p.name for p in tmp_path.iterdir()}
    assert folders["dead"].name not in left and folders["old"].name not in left
    assert {folders[n].name for n in ("live", "new", "bad")} <= left and "other" in left
