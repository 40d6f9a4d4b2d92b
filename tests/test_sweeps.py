"""Sweeps on a real local Ray instance: grid, Optuna, failures, a killed driver, bad files."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from orchestrator.sweeps import runner
from lth.cli import main
from orchestrator.sweeps.results import pareto_front
from orchestrator.sweep_spec import load_sweep
from tests.conftest import LTH, assert_each_level_trained_once, digits_base

BASE = digits_base(levels=1)


def sweep_file(tmp_path, **fields):
    data = {"name": "s", "experiment": "e", "base": BASE, "resources": {"cpu": 1}, "max_concurrent": 2,
            "storage": str(tmp_path / "runs"), **fields}
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def csv(tmp_path, name="s"):
    return pd.read_csv(tmp_path / "runs" / name / "trials.csv")


def test_grid_sweep_writes_one_row_per_trial_and_level(tmp_path, ray_local):
    path = sweep_file(tmp_path, space={"prune.kind": {"grid": ["unstructured", "structured"]}}, seeds=2)
    rows = runner.run(load_sweep(path))
    df = csv(tmp_path)
    assert len(rows) == len(df) == 4 * 2
    assert set(df.status) == {"TERMINATED"}
    per_trial = df.groupby("trial_id")
    assert sorted(per_trial["level"].apply(tuple)) == [(0, 1)] * 4
    configs = sorted(per_trial.first()[["prune.kind", "seed"]].itertuples(index=False, name=None))
    assert configs == [("structured", 0), ("structured", 1), ("unstructured", 0), ("unstructured", 1)]
    assert (df.groupby("trial_id").trial_key.nunique() == 1).all() and df.trial_key.nunique() == 4
    dense = df[df.level == 0]
    assert (dense.density == 1.0).all() and (dense.test_acc > 0.8).all()
    # the summaries of the last level are the objectives a search sees
    last = df[df.level == 1]
    assert (last.final_test_acc == last.test_acc).all() and (last.dense_test_acc == dense.test_acc.values).all()
    assert ((last.matching_density == 1.0) | (last.matching_density == last.density)).all()


def test_optuna_sweep_replicates_seeds_and_keeps_its_study(tmp_path, ray_local, capsys):
    import optuna

    space = {"prune.rate": {"uniform": [0.1, 0.5]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}
    search = {"algorithm": "optuna", "num_samples": 3, "metric": ["final_test_acc", "final_density"],
              "mode": ["max", "min"]}
    path = sweep_file(tmp_path, space=space, seeds=2, search=search)
    runner.run(load_sweep(path))
    df = csv(tmp_path)
    trials = df.groupby("trial_id").last()  # the last level carries the trial's objectives
    assert len(trials) == 6 and set(trials.status) == {"TERMINATED"}
    assert trials["prune.rate"].between(0.1, 0.5).all() and trials["train.lr"].between(1e-4, 1e-2).all()
    configs = trials.groupby(["prune.rate", "train.lr"]).seed.apply(sorted)
    assert len(configs) == 3 and all(s == [0, 1] for s in configs)  # 3 configurations x 2 seeds
    _, study_name = runner.load_saved(str(tmp_path / "runs"), "s")
    storage = f"sqlite:///{tmp_path / 'runs' / 's' / 'optuna.db'}"
    study = optuna.load_study(study_name=study_name, storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t in study.trials:  # Optuna was told the seed-mean of each objective
        group = trials[(trials["prune.rate"] == t.params["prune.rate"])]
        assert t.values[0] == pytest.approx(group.final_test_acc.mean())
    # running the same sweep again continues it: no new trial, the same study
    runner.run(load_sweep(path))
    assert len(csv(tmp_path).groupby("trial_id")) == 6
    assert len(optuna.load_study(study_name=study_name, storage=storage).trials) == 3
    # status refreshes trials.csv and shows the Pareto front of the two objectives
    (tmp_path / "runs" / "s" / "trials.csv").unlink()
    assert main(["sweep", "status", "s", "--storage", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "sweep s (optuna): 6 done, 0 running, 0 pending of 6 trials" in out
    assert "Pareto front of final_test_acc (max) x final_density (min)" in out
    front = [line for line in out.splitlines() if line.startswith("  prune.rate=")]
    assert front and all(re.fullmatch(r"  prune\.rate=0\.\d{1,4} train\.lr=[\d.e-]{1,10}  final_test_acc "
                                      r"\d\.\d{4}±\d\.\d{4}  final_density \d\.\d{4}±\d\.\d{4}  \(n=2\)", line)
                         for line in front), front  # a search's draws at 4 digits (trials/folder/labels.py short)
    assert "progress: levels 12/12 | units 12/12 | 100% of 720 iterations" in out  # 6 x (60 + 60)
    assert len(csv(tmp_path)) == len(df)


def test_a_failing_trial_is_recorded_retried_and_the_others_finish(tmp_path, ray_local, capsys):
    from mlflow.tracking import MlflowClient

    from lth.cli import main

    base = {**BASE, "train": {**BASE["train"], "optimizer": "sgd", "momentum": 0.9}}
    path = sweep_file(tmp_path, base=base, space={"train.lr": {"grid": [0.05, 1.0e6]}}, max_failures=1,
                      tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["sweep", "run", str(path)]) == 1  # a sweep with a failed trial does not exit 0
    err = capsys.readouterr()
    assert "lth: 1 of 2 trials failed" in err.err and "failed " in err.out  # the count, and the reason
    assert "finished (1 done, " in err.err  # the trial that finished counts itself
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = c.search_runs([c.get_experiment_by_name("e").experiment_id], "tags.`lth.kind` = 'sweep'")
    assert [r.info.status for r in parent] == ["FAILED"]
    df = csv(tmp_path)
    failed = df[df.status == "ERROR"]
    assert len(failed) == 1 and failed["train.lr"].iloc[0] == 1.0e6
    assert "training loss became nan" in failed.error.iloc[0] or "became inf" in failed.error.iloc[0]
    ok = df[df.status == "TERMINATED"]
    assert list(ok.level) == [0, 1]
    from ray.tune import ExperimentAnalysis

    trial = [t for t in ExperimentAnalysis(str(tmp_path / "runs" / "s")).trials if t.status == "ERROR"][0]
    assert trial.run_metadata.num_failures == 2  # first attempt + one retry (max_failures: 1)


def test_stop_when_not_matching_ends_a_trial_and_optuna_records_it_pruned(tmp_path, ray_local, capsys):
    import optuna

    base = {**BASE, "prune": {**BASE["prune"], "levels": 3, "rate": 0.9}}
    search = {"algorithm": "random", "num_samples": 2, "metric": "final_test_acc"}
    path = sweep_file(tmp_path, base=base, space={"train.lr": {"loguniform": [1e-3, 2e-3]}}, search=search,
                      tolerance=0.0, stop_when_not_matching=True)
    runner.run(load_sweep(path))
    df = csv(tmp_path)
    stopped = df[df.stopped_not_matching == True]  # noqa: E712
    assert len(stopped) >= 1  # 90% pruning per level at tolerance 0 stops early
    for trial_id, rows in df.groupby("trial_id"):
        levels = list(rows.level)
        assert levels == list(range(len(levels)))
        assert rows.stopped_not_matching.iloc[-1] or len(levels) == 4
    _, study_name = runner.load_saved(str(tmp_path / "runs"), "s")
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{tmp_path / 'runs/s/optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == len(stopped)
    # the levels a stopped trial never runs leave the totals: the live line and status end at 100%
    live = [ln for ln in capsys.readouterr().err.splitlines() if " finished (" in ln][-1]
    assert f"| levels {len(df)}/{len(df)} |" in live and "| 100% of " in live, live
    assert main(["sweep", "status", "s", "--storage", str(tmp_path / "runs")]) == 0
    assert f"progress: levels {len(df)}/{len(df)} | " in capsys.readouterr().out


def kill_mid_sweep_then_resume(tmp_path, path, levels: int) -> tuple[str, subprocess.CompletedProcess]:
    """SIGKILL `lth sweep run PATH` after 5 of its `levels` level lines; `lth sweep resume`
    it. Returns what the first run printed (stdout and stderr) and the resume."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([LTH, "sweep", "run", str(path)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, deadline = [], time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if sum(" level " in s and "density" in s for s in seen) >= 5:  # some levels done, not all
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sum(" level " in s and "density" in s for s in seen) < levels, "the sweep finished before the kill"
    time.sleep(3)  # Ray's reaper stops the killed driver's local cluster
    resumed = subprocess.run([LTH, "sweep", "resume", "s", "--storage", str(tmp_path / "runs")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return "".join(seen), resumed


def assert_quiet_and_counted_once(tmp_path, path, first: str, resumed) -> None:
    """A sweep that went well printed no traceback, no "failed", no colour codes (its
    output is no terminal) and, resumed, none of Tune's banners or warnings (issue 35); its
    live line (a log's last "finished" line), `lth sweep status` and `lth sweep plan`
    count the same trials, levels, units and iterations, levels from before the resume included."""
    for text in (first, resumed.stdout, resumed.stderr):
        for noise in ("Traceback", "failed", "\x1b[", "Configuration for experiment", "tensorboard",
                      "pack_members", "Failed to fetch", "Restoring the run"):
            assert noise not in text, (noise, text[-3000:])
    # from where it ran (the file's relative tracking_uri resolves there: the same sweep)
    planned = subprocess.run([LTH, "sweep", "plan", str(path)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    total = [ln for ln in planned.stdout.splitlines() if ln.startswith("plan: ")]
    assert len(total) == 1, planned.stdout + planned.stderr
    # "plan: 4 trials, 16 levels, 14 shared units, 6,000 iterations in the trials' levels"
    trials, levels, units, iterations = (total[0].split(" ")[i].rstrip(",") for i in (1, 3, 5, 8))
    status = subprocess.run([LTH, "sweep", "status", "s", "--storage", str(tmp_path / "runs")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "Failed to fetch" not in status.stderr, status.stderr
    assert f"sweep s (grid): {trials} done, 0 running, 0 pending of {trials} trials" in status.stdout
    assert f"progress: levels {levels}/{levels} | units {units}/{units} | 100% of {iterations} iterations" \
        in status.stdout, status.stdout
    live = [ln for ln in resumed.stderr.splitlines() if " finished (" in ln][-1]
    assert f"({trials} done, 0 running, 0 pending of {trials} trials | levels {levels}/{levels} | units {units}/{units}" \
        in live and f"| 100% of {iterations} iterations" in live, live


def test_killed_driver_then_resume_finishes_without_retraining(tmp_path):
    """SIGKILL the `lth sweep run` process mid-sweep; `lth sweep resume` finishes it: a pack
    of two and a Tune trial of one (as every trial of a sweep without packs is), each unit
    published once, no level of any member trained twice."""
    from orchestrator.sweeps.units import trained_log

    base = {**BASE, "train": {**BASE["train"], "iterations": 400, "eval_interval": 50},
            "prune": {**BASE["prune"], "levels": 3}}
    path = sweep_file(tmp_path, base=base, space={"prune.rate": {"grid": [0.2, 0.3, 0.4]}}, pack=2)
    first, resumed = kill_mid_sweep_then_resume(tmp_path, path, levels=12)
    df = csv(tmp_path)
    assert len(df) == 3 * 4 and set(df.status) == {"TERMINATED"}
    assert_quiet_and_counted_once(tmp_path, path, first, resumed)
    counts = Counter(e["unit"] for e in trained_log(str(tmp_path / "runs"), packed=True))
    assert len(counts) == 1 + 3 * 3 and set(counts.values()) == {1}  # one dense run, three trunks
    tune_trials = {d: len(json.loads((d / "result.json").read_text().splitlines()[0])["pack_members"])
                   for d in (tmp_path / "runs" / "s").iterdir() if list(d.glob("checkpoint_*"))}
    assert sorted(tune_trials.values()) == [1, 2]
    for trial_dir, members in tune_trials.items():
        assert_each_level_trained_once(trial_dir, levels=3, members=members)


def test_pareto_front_on_known_points():
    points = [{"id": i, "acc": a, "density": d} for i, (a, d) in
              enumerate([(0.98, 0.5), (0.97, 0.2), (0.96, 0.3), (0.98, 0.6), (0.90, 0.1), (0.97, 0.2)])]
    front = pareto_front(points, ["acc", "density"], ["max", "min"])
    assert sorted(p["id"] for p in front) == [0, 1, 4, 5]  # 2 and 3 are dominated; ties both stay


def test_every_example_sweep_file_is_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # their data_dir ~/data must exist (checked before Ray starts)
    (tmp_path / "data").mkdir()
    sweeps = sorted((Path(__file__).parent.parent / "sweeps").glob("*.yaml"))
    assert {p.stem for p in sweeps} >= {"demo_digits", "lenet_mnist_ablation", "conv2_cifar_optuna",
                                        "resnet20_rewind_cluster"}
    for path in sweeps:
        sweep = load_sweep(path)
        assert sweep.name and sweep.space, path


BAD_SWEEPS = [
    ({"colour": "red"}, "colour"),
    ({"base": {**BASE, "prune": {"rate": 1.5}}}, "base.prune.rate"),
    ({"space": {"prune.rate": {"grid": []}}}, "space.prune.rate.grid"),
    ({"space": {"model": {"grid": ["lenet_300_100", "alexnet"]}}}, "space.model.name"),
    ({"space": {"prune.speed": {"grid": [1]}}}, "space.prune.speed"),
    ({"resources": {"cpu": 1, "gpu": -1}}, "resources.gpu"),
    ({"space": {"prune.rate": {"uniform": [0.5, 0.1]}}, "search": {"algorithm": "random"}}, "space.prune.rate.uniform"),
    ({"space": {"prune.rate": {"grid": [0.2, 1.5]}}}, "space.prune.rate"),
    ({"space": {"prune.rate": {"uniform": [0.1, 0.5]}}}, "space.prune.rate"),  # grid search, continuous space
    ({"search": {"algorithm": "bayes"}}, "search.algorithm"),
    ({"search": {"algorithm": "optuna", "metric": "loss"}}, "search.metric"),
    ({"seeds": 0}, "seeds"),
    ({"name": "a b"}, "name"),
    ({"resources": {"cpu": 1, "tpu": 1}}, "resources.tpu"),
    ({"search": {"algo": "grid"}}, "search.algo"),
]


def test_a_sweeps_driver_never_imports_torch(tmp_path):
    """The driver validates, plans and tracks, and trains nothing: torch (a second of every
    sweep's start on 2 cores) stays out of it (ARCHITECTURE.md, "Models"). Tune's result
    files are written; TensorBoard's event files, which no lth command reads, are not."""
    path = sweep_file(tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = ("import sys, lth.cli\nmain = lth.cli.main\n"
            "def run(argv=None):\n    code = main(argv)\n    print('TORCH', 'torch' in sys.modules)\n    return code\n"
            "lth.cli.main = run; sys.argv = ['lth', 'sweep', 'run', sys.argv[1]]; lth.cli.entry()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH False" in proc.stdout.splitlines()
    assert len(csv(tmp_path)) == 2  # the trial's two levels
    assert list((tmp_path / "runs" / "s").glob("*/result.json"))
    assert not list((tmp_path / "runs").rglob("events.out.tfevents*"))


def test_bad_sweep_files_exit_2_with_one_line_before_ray(tmp_path):
    """All cases in one fresh interpreter: after each, Ray must not even be imported."""
    cases = []
    for i, (fields, key) in enumerate(BAD_SWEEPS):
        data = {"name": f"bad{i}", "experiment": "e", "base": BASE, "storage": str(tmp_path / "runs"), **fields}
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        cases.append((str(path), key))
    script = f"""
import contextlib, io, json, sys
from lth.cli import main
out = []
for path, key in {cases!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["sweep", "run", path])
    out.append([code, err.getvalue(), "ray" in sys.modules])
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for (code, err, ray_imported), (_, key) in zip(json.loads(proc.stdout), cases):
        assert code == 2, (key, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"lth: error: {key}"), (key, err)
        assert not ray_imported, key
    assert not (tmp_path / "runs").exists()


def test_a_local_ray_starts_lean_and_a_killed_driver_leaves_no_agent(tmp_path):
    """`lth sweep run` on a local Ray starts neither the dashboard's head process nor the
    autoscaler's monitor (no --dashboard); its trial trains on a worker Ray prestarted, so
    the raylet starts no worker beyond those (runner.idle_workers_serve; the units broker
    takes another); and when the driver is killed (SIGKILL) the raylet's agents go at
    once, not a minute later (orchestrator/sweeps/reaper.py)."""
    import psutil

    path = tmp_path / "lean.yaml"
    path.write_text(yaml.safe_dump({"name": "lean", "experiment": "lean", "base": digits_base(levels=20),
                                    "storage": str(tmp_path / "runs"),
                                    "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    proc = subprocess.Popen([LTH, "sweep", "run", str(path)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    driver = psutil.Process(proc.pid)

    def named(procs, *names):
        out = []
        for p in procs:
            try:
                if any(n in " ".join(p.cmdline()) for n in names):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (named(driver.children(), "orchestrator.sweeps.reaper") and len(
                named(driver.children(recursive=True), "ray::DashboardAgent", "ray::RuntimeEnvAgent")) == 2):
            assert proc.poll() is None, "the sweep ended before its Ray was seen"
            time.sleep(0.5)
        agents = named(driver.children(recursive=True), "ray::DashboardAgent", "ray::RuntimeEnvAgent")
        assert len(agents) == 2
        assert not named(driver.children(), "dashboard/dashboard.py", "autoscaler/_private/monitor.py")
        (raylet,) = named(driver.children(), "raylet/raylet")
        prestarted = int(re.search(r"--num_prestart_python_workers=(\d+)", " ".join(raylet.cmdline())).group(1))
        while time.time() < deadline and not named(raylet.children(), "ray::ImplicitFunc"):  # the trial trains
            assert proc.poll() is None, "the sweep ended before its trial was seen"
            time.sleep(0.5)
        workers = [p for p in raylet.children() if p not in agents]
        assert named(workers, "ray::ImplicitFunc") and named(workers, "ray::Broker")
        if prestarted >= 2:  # room for the broker and the trial
            assert len(workers) == prestarted, [" ".join(p.cmdline())[:40] for p in workers]
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(agents, timeout=20)
    assert not alive, [p.pid for p in alive]
