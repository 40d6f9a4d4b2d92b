"""Sweeps with packs (`pack: K`; orchestrator/plan.py packs, orchestrator/sweeps/packs.py,
trainable.lottery): one Tune trial trains a pack, and everything downstream stays per
trial: trials.csv rows, MLflow runs, statuses, Optuna's told values. Packed members
record what the same trials record alone (masks and densities exact, accuracies within
half a point); a member that diverges fails alone. (A killed driver's packs resume at
their last checkpointed level: tests/test_sweeps.py, test_killed_driver_then_resume_...)"""
import json
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import LTH, digits_base
from tests.test_sweeps import csv
from tests.test_sweeps import sweep_file as sweeps_file

EXACT = ["level", "density", "remaining_params", "start_iteration", "iterations"]
ACCURACIES = ["test_acc", "test_acc_at_early_stop", "val_acc"]


def sweep_file(tmp_path, name="s", **fields):
    """tests/test_sweeps.py's sweep file, with 2 levels and MLflow in the test's folder."""
    fields = {"base": digits_base(levels=2), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **fields}
    return sweeps_file(tmp_path, name=name, experiment="packs", **fields)


# ---------------------------------------------------------------- planning


def test_packs_group_trials_that_can_train_together_and_balance_them(tmp_path, monkeypatch):
    from orchestrator import plan
    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps.packs import PACK, data_key
    from trials.runner import shared
    from trials.spec.packing import pack_key
    from trials.spec import from_dict

    space = {"prune.rate": {"grid": [0.2, 0.5, 0.8]}, "control": {"grid": ["none", "reinit"]}}
    sweep = load_sweep(sweep_file(tmp_path, pack=4, seeds=3, space=space))
    configs = plan.trial_configs(sweep)[0]
    made = [c[PACK] for c in plan.packs(sweep, configs)]
    members = [t["config"] for p in made for t in p["trials"]]
    assert sorted(map(json.dumps, members)) == sorted(map(json.dumps, configs))  # each trial once
    assert sorted(len(p["trials"]) for p in made) == [3, 3, 4, 4, 4]  # 18 trials at K=4: balanced, not 4+4+4+4+2
    for p in made:  # the driver's typed specs, their keys, and one group that trains stacked, on its data
        specs = [from_dict(t["spec"]) for t in p["trials"]]
        assert specs == [sweep.trial_spec({k: v for k, v in t["config"].items() if k != "seed"},
                                          t["config"]["seed"]) for t in p["trials"]]
        assert [t["key"] for t in p["trials"]] == [s.key for s in specs]
        assert len({pack_key(s) for s in specs}) == 1
        # a grid's units: all registered by the driver up front (runner._share), none in the config
        assert p["groups"] == [{"members": list(range(len(specs))), "arithmetic": "stacked",
                                "data": data_key(specs[0]), "units": []}]
    # a seed's trials sit together (its dense run is trained once per pack), and a control beside its
    # ticket (their IMP trunk is trained once, in their pack): 18 in 3-4s splits one trunk at least
    seeds = [{t["config"]["seed"] for t in p["trials"]} for p in made]
    assert sorted(map(len, seeds)) == [1, 1, 1, 1, 2]
    trunks = Counter(shared.trunk_name(from_dict(t["spec"])) for p in made
                     for t in {shared.trunk_name(from_dict(t["spec"])): t for t in p["trials"]}.values())
    assert len(trunks) == 9 and sorted(trunks.values()) == [1] * 8 + [2]

    # without packs: a Tune trial per trial, alone (a single trial's arithmetic: the golden records' bits)
    alone = load_sweep(sweep_file(tmp_path, seeds=3, space=space))
    made = [c[PACK] for c in plan.packs(alone, configs)]
    assert len(made) == 18 and all([{k: g[k] for k in ("members", "arithmetic")} for g in p["groups"]]
                                   == [{"members": [0], "arithmetic": "alone"}] for p in made)
    assert sorted(json.dumps(p["trials"][0]["config"]) for p in made) == sorted(map(json.dumps, configs))

    monkeypatch.setenv("LTH_PACK_MEMORY_GB", str(2.5 * plan.member_bytes(
        sweep.trial_spec({}, 0)) / 2**30))
    controls_first = {"control": space["control"], "prune.rate": space["prune.rate"]}  # grid order: no pairs
    auto = load_sweep(sweep_file(tmp_path, pack="auto", seeds=3, space=controls_first))
    assert plan.pack_size(auto, auto.trial_spec({}, 0)) == 2
    made = [c[PACK]["trials"] for c in plan.packs(auto, plan.trial_configs(auto)[0])]
    assert [len(p) for p in made] == [2] * 9  # each a control and its ticket, sharing their trunk
    assert all(len({shared.trunk_name(from_dict(t["spec"])) for t in p}) == 1 for p in made)
    monkeypatch.setenv("LTH_PACK_MEMORY_GB", "1000")  # then the limit sizes it: more members on a GPU
    assert plan.pack_size(auto, auto.trial_spec({}, 0)) == plan.PACK_LIMIT["cpu"] == 32
    assert plan.pack_size(auto, auto.trial_spec({}, 0).replace(device="cuda")) == plan.PACK_LIMIT["cuda"] == 128

    out = subprocess.run([LTH, "sweep", "plan", str(sweep_file(tmp_path, pack=4, seeds=3, space=space))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "packs: 18 trials in 5 Tune trials, 4 per pack at most\n" in out.stdout  # controls pack too
    bad = subprocess.run([LTH, "sweep", "plan", str(sweep_file(tmp_path, pack=0))], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "lth: error: pack: 0 is not allowed; an integer >= 1, or auto"


def validations(monkeypatch) -> Counter:
    """Every TrialSpec validated in this process from now on, counted by its key."""
    from trials.spec import trial_spec

    counts, real = Counter(), trial_spec.validate

    def counted(spec):
        counts[spec.key] += 1
        real(spec)

    monkeypatch.setattr(trial_spec, "validate", counted)
    return counts


def test_plan_builds_and_validates_each_trial_spec_once_and_a_worker_never(tmp_path, monkeypatch, capsys):
    """`lth sweep plan` builds and validates each trial's spec once, at load (Sweep.trials):
    the plan, its units, the packs and their Tune configs use those specs. A worker types
    the specs its config ships again without validating them (packs.member_specs); a
    config made by an lth before it (its groups without "data") is validated there."""
    from lth.cli import main
    from orchestrator import plan
    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps.packs import PACK, member_specs, registrations

    space = {"prune.rate": {"grid": [0.2, 0.5, 0.8]}, "control": {"grid": ["none", "reinit"]}}
    path = sweep_file(tmp_path, pack=4, seeds=3, space=space)
    counts = validations(monkeypatch)
    assert main(["sweep", "plan", str(path)]) == 0
    assert "plan: 18 trials" in capsys.readouterr().out
    planned = Counter(counts)
    sweep = load_sweep(path)
    trial_keys = Counter(spec.key for _, spec in sweep.trials)
    base_key = sweep.trial_spec({}, 0).key  # the base spec, validated once at load to name its own errors
    assert len(trial_keys) == 18 and set(trial_keys.values()) == {1}
    assert planned == trial_keys + Counter({base_key: 1})  # each trial's spec once, and nothing else

    counts.clear()
    sweep = load_sweep(path)
    assert sum(counts.values()) == 18 + 1
    made = plan.packs(sweep)
    plan.plan(sweep), plan.pack_line(sweep)
    assert sum(counts.values()) == 18 + 1  # all from the specs the load built
    built = {spec.key: spec for _, spec in sweep.trials}
    for config in made:  # a worker's specs: the driver's, typed again, not validated again
        assert member_specs(config) == [built[t["key"]] for t in config[PACK]["trials"]]
    assert sum(counts.values()) == 18 + 1
    old = {PACK: {"trials": made[0][PACK]["trials"],
                  "groups": [{k: g[k] for k in ("members", "arithmetic")} for g in made[0][PACK]["groups"]]}}
    assert member_specs(old) == member_specs(made[0])
    assert sum(counts.values()) == 18 + 1 + len(made[0][PACK]["trials"])  # an older lth's: validated

    # a searched pack's config carries the units its members use (its driver registers no search's units
    # ahead): what the worker registers is what the planner would, a control's unit as IMP's
    searched = load_sweep(sweep_file(tmp_path, pack=3, search={"algorithm": "random", "num_samples": 2},
                                     space={"prune.rate": {"uniform": [0.2, 0.8]}}))
    made = [{"prune.rate": 0.3, "control": "reinit", "seed": 0}, {"prune.rate": 0.3, "seed": 0},
            {"prune.rate": 0.6, "seed": 0, "rewind_iteration": 10}]
    config = plan.searched_pack(searched, made)
    (group,) = config[PACK]["groups"]
    # one dense run keeping both rewind points, then level 1 of each rate's trunk (the control's is its
    # ticket's), then level 2
    assert [(u["member"], u["points"]) for u in group["units"]] == [(0, [0, 10])] + [(0, []), (2, [])] * 2
    assert registrations(config, group) == plan.registrations(plan.work_units(member_specs(config)))


def test_a_trial_spec_is_built_by_path_from_typed_values_never_through_text(tmp_path, monkeypatch):
    """The driver sets each varied value at its path on the base spec (config.spec_at): the
    same spec the `--set PATH=TEXT` route gives, with no YAML on the way, for a grid's packs."""
    import yaml

    from orchestrator import plan
    from orchestrator.config import apply_overrides, spec_at
    from orchestrator.sweep_spec import load_sweep
    from trials.spec import from_dict

    base = digits_base(levels=2)
    values = {"train.lr": 1.0e6, "prune.rate": 0.25, "prune.layer_rates.hidden.0": 0.5, "model": "lenet_300_100",
              "control": "reinit", "stability.levels": [1, 2], "stability.copies": 2, "seed": 3}
    texts = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in values.items()]
    assert spec_at(base, values) == from_dict(apply_overrides(base, texts))

    space = {"prune.rate": {"grid": [0.2, 0.5]}, "control": {"grid": ["none", "reinit"]}}
    sweep = load_sweep(sweep_file(tmp_path, pack=4, seeds=2, space=space))

    def no_text(*args, **kwargs):
        raise AssertionError("a trial's values went through YAML text")

    monkeypatch.setattr(yaml, "safe_load", no_text)
    monkeypatch.setattr(yaml, "safe_dump", no_text)
    made = plan.packs(sweep, plan.trial_configs(sweep)[0])
    assert sum(len(c["pack"]["trials"]) for c in made) == 8


# ---------------------------------------------------------------- real packed sweeps


def test_a_packed_sweep_records_what_trials_alone_do_per_trial_everywhere(tmp_path, ray_local, monkeypatch):
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps import runner
    from orchestrator.sweeps.units import trained_log

    space = {"prune.rate": {"grid": [0.2, 0.5]}, "control": {"grid": ["none", "reinit"]}}
    counts = validations(monkeypatch)
    runner.run(load_sweep(sweep_file(tmp_path, "packed", pack=4, seeds=2, space=space)))
    # the driver built and validated each of the 8 trials' specs once, and the base spec (the
    # workers, other processes, validate none: test_plan_builds_and_validates_each_trial_spec_once...)
    assert sum(counts.values()) == 8 + 1 and len(counts) == 9
    monkeypatch.undo()
    runner.run(load_sweep(sweep_file(tmp_path, "alone", seeds=2, space=space)))  # same storage
    packed, alone = csv(tmp_path, "packed"), csv(tmp_path, "alone")

    assert list(packed.columns) == list(alone.columns)
    assert len(packed) == len(alone) == 8 * 3 and set(packed.status) == {"TERMINATED"}
    pairs = packed.merge(alone, on=["trial_key", "level"], suffixes=("", "_alone"))
    assert len(pairs) == 24
    for col in EXACT[1:]:
        assert (pairs[col] == pairs[f"{col}_alone"]).all(), col
    for col in ACCURACIES:
        assert (pairs[col] - pairs[f"{col}_alone"]).abs().max() <= 0.005, col
    packs = packed.trial_id.str.rsplit("_", n=1).str[0]
    assert packs.nunique() == 2 and (packed.groupby(packs).seed.nunique() == 1).all()  # a seed's 4 trials, controls too
    assert sorted(packed.trial_id.unique()) == sorted(f"{p}_{i:02d}" for p in packs.unique() for i in range(4))

    # every unit once: 2 dense runs (one per seed) + 2 rates x 2 seeds x 2 levels (a control's IMP run
    # is its ticket's trunk, trained by one of them in their pack)
    counts = Counter(e["unit"] for e in trained_log(str(tmp_path / "runs"), packed=True))
    assert len(counts) == 10 and set(counts.values()) == {1}
    # a packed sweep's units are its own: the unpacked sweep trained its own, bit-exact ones
    assert Counter(e["unit"] for e in trained_log(str(tmp_path / "runs"))) == counts
    trained_with = [e["pack"] for e in trained_log(str(tmp_path / "runs"), packed=True)]  # members training at once
    assert max(trained_with) >= 2 and set(trained_with) <= {1, 2, 3, 4}  # a control may train a level (PackOfOne)

    # the same packed sweep on fresh storage, one Tune trial at a time (the first ran two): the
    # same numbers, whichever process and pack trained each unit (a member's kernels are its own)
    runner.run(load_sweep(sweep_file(tmp_path, "repeat", pack=4, seeds=2, space=space, max_concurrent=1,
                                     storage=str(tmp_path / "fresh"))))
    repeat = pd.read_csv(tmp_path / "fresh" / "repeat" / "trials.csv")
    numbers = [c for c in packed.columns if c not in ("trial_id", "seconds", "node_id")]
    pd.testing.assert_frame_equal(packed[numbers].sort_values(["trial_key", "level"]).reset_index(drop=True),
                                  repeat[numbers].sort_values(["trial_key", "level"]).reset_index(drop=True))

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("packs")
    runs = c.search_runs([exp.experiment_id], "tags.`lth.kind` = 'trial' and tags.`lth.sweep` = 'packed'")
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["lth.trial_key"] for r in runs} == set(packed.trial_key)
    assert {r.data.tags["lth.tune_trial_id"] for r in runs} == set(packed.trial_id)  # the member's own id
    for r in runs:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "test_acc")] == [0, 1, 2]
        assert not c.list_artifacts(r.info.run_id)  # no tensors unless asked: the trial's folder in storage
        folder = Path(r.data.tags["lth.folder"])
        assert folder == tmp_path / "runs" / "packed" / "trials" / r.data.tags["lth.tune_trial_id"]
        assert [json.loads(line)["level"] for line in (folder / "levels.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_diverging_member_fails_alone_and_its_pack_goes_on(tmp_path, ray_local, capsys):
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps import runner

    base = digits_base(levels=1, optimizer="sgd", momentum=0.9)
    runner.run(load_sweep(sweep_file(tmp_path, base=base, pack=2, space={"train.lr": {"grid": [0.05, 1.0e6]}})))
    # the member that failed before its first level has a checkpoint folder without levels:
    # MLflow takes it at once (the end-of-sweep sync used to retry it for 3 minutes, then
    # call MLflow unreachable)
    assert "MLflow" not in capsys.readouterr().err
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("packs").experiment_id], "tags.`lth.kind` = 'trial'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    df = csv(tmp_path)
    failed, ok = df[df.status == "ERROR"], df[df.status == "TERMINATED"]
    assert len(failed) == 1 and failed["train.lr"].iloc[0] == 1.0e6
    assert "training loss became" in failed.error.iloc[0]
    assert list(ok.level) == [0, 1] and set(ok["train.lr"]) == {0.05}
    from ray.tune import ExperimentAnalysis

    (trial,) = ExperimentAnalysis(str(tmp_path / "runs" / "s")).trials
    assert trial.status == "TERMINATED" and trial.run_metadata.num_failures == 0  # not retried for one member


def test_imp_and_edge_popup_trials_pack_apart_in_one_sweep(tmp_path, ray_local):
    """A sweep over `method`: the edge-popup trials pack with each other and the IMP trials
    with each other (a pack trains weights or scores: packing.trains), each trial with the
    numbers of `lth trial run` within the pack tolerance (densities exact)."""
    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps import runner
    from trials.runner.levels import run_lottery

    base = {**digits_base(levels=1), "supermask": {"densities": [0.5, 0.3]}}
    sweep = load_sweep(sweep_file(tmp_path, base=base, pack=2, seeds=2, space={"method": {"grid": ["imp", "edge_popup"]}}))
    runner.run(sweep)
    df = csv(tmp_path)
    assert len(df) == 4 * 2 and set(df.status) == {"TERMINATED"}
    packs = df.trial_id.str.rsplit("_", n=1).str[0]
    popup, imp = df[df.method == "edge_popup"], df[df.method == "imp"]
    assert list(popup.density) == [0.5, 0.3] * 2
    assert packs[popup.index].nunique() == packs[imp.index].nunique() == 1  # one pack each
    assert set(packs[popup.index]).isdisjoint(packs[imp.index])
    for seed in (0, 1):
        alone = run_lottery(sweep.trial_spec({"method": "edge_popup"}, seed), tmp_path / f"alone{seed}")
        mine = popup[popup.seed == seed]
        for col in EXACT:
            assert [r.flat()[col] for r in alone] == list(mine[col]), col
        for col in ACCURACIES:
            assert max(abs(r.flat()[col] - v) for r, v in zip(alone, mine[col])) <= 0.005, col


def test_optuna_is_asked_for_a_pack_of_configurations_and_told_each_seed_mean(tmp_path, ray_local):
    import optuna

    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps import runner

    search = {"algorithm": "random", "num_samples": 3, "metric": "final_test_acc"}
    space = {"train.lr": {"loguniform": [5e-4, 2e-3]}, "train.batch_size": {"choice": [30, 60]},
             "control": {"choice": ["none", "reinit"]}}
    sweep = load_sweep(sweep_file(tmp_path, base=digits_base(levels=1), pack=4, seeds=2, search=search,
                                  space=space))
    runner.run(sweep)
    df = csv(tmp_path)
    assert df.trial_id.str.rsplit("_", n=1).str[0].nunique() == 2  # 3 configurations x 2 seeds in packs of 4
    assert len(df) == 6 * 2 and set(df.status) == {"TERMINATED"}
    # the search mixed what cannot train together in one pack: it ran as groups, each row its own trial's
    assert df["train.batch_size"].nunique() == 2 and df.control.nunique() == 2
    for _, row in df.iterrows():
        config = {p: row[p].item() if hasattr(row[p], "item") else row[p] for p in sweep.varied}
        assert sweep.trial_spec(config, int(row.seed)).key == row.trial_key
    last = df[df.level == 1]
    means = sorted(last.groupby("train.lr").final_test_acc.mean())
    _, study_name = runner.load_saved(str(tmp_path / "runs"), "s")
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{tmp_path / 'runs/s/optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert sorted(t.value for t in study.trials) == pytest.approx(means)


def test_edge_popup_trials_pack_in_a_sweep(tmp_path, ray_local):
    """Edge-popup trials (seeds and the random_prune control) pack with each other: `lth
    sweep plan` shows one pack, and the packed sweep records each trial with its own rows,
    levels and MLflow run, as the same sweep without packs (densities exact, accuracies
    within half a point)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep_spec import load_sweep
    from orchestrator.sweeps import runner

    base = {**digits_base(), "method": "edge_popup", "supermask": {"densities": [0.5, 0.1]}}
    base.pop("prune")
    space = {"control": {"grid": ["none", "random_prune"]}}
    path = sweep_file(tmp_path, "ep", base=base, pack=4, seeds=2, space=space)
    out = subprocess.run([LTH, "sweep", "plan", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "packs: 4 trials in 1 Tune trials, 4 per pack at most\n" in out.stdout
    runner.run(load_sweep(path))
    runner.run(load_sweep(sweep_file(tmp_path, "alone", base=base, seeds=2, space=space)))
    packed, alone = csv(tmp_path, "ep"), csv(tmp_path, "alone")
    assert len(packed) == 4 * 2 and set(packed.status) == {"TERMINATED"}
    assert packed.trial_id.str.rsplit("_", n=1).str[0].nunique() == 1  # one Tune trial
    pairs = packed.merge(alone, on=["trial_key", "level"], suffixes=("", "_alone"))
    assert len(pairs) == 8 and (pairs.density == pairs.density_alone).all()
    assert (pairs.test_acc - pairs.test_acc_alone).abs().max() <= 0.005
    controls = packed[packed.control == "random_prune"]
    assert len(controls) == 4 and (controls.iterations == 0).all()
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("packs").experiment_id],
                         "tags.`lth.kind` = 'trial' and tags.`lth.sweep` = 'ep'")
    assert len(runs) == 4 and {r.data.tags["lth.trial_key"] for r in runs} == set(packed.trial_key)
