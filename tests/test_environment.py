"""Every level record names the environment that produced it (trials/folder/environment.py), and
the sweep tools warn when one sweep's numbers came from more than one kind of machine."""
import json

import torch

from tests.conftest import quick_spec
from trials.folder.environment import MACHINE, environment, listed, machine, mixed
from trials.runner.levels import run_lottery
from trials.folder.record import LevelRecord
from trials.spec import PruneSpec, TrainSpec


def test_a_trials_records_name_this_machine_and_the_code(tmp_path, digits_cpu):
    spec = quick_spec(prune=PruneSpec(rate=0.2, levels=1),
                      train=TrainSpec(optimizer="adam", lr=1e-3, batch_size=60, iterations=20, eval_interval=20))
    records = run_lottery(spec, tmp_path / "t", data=digits_cpu)
    env = records[0].environment
    assert env == environment("cpu") and env["threads"] == torch.get_num_threads()
    assert set(MACHINE) < set(env) and env["lth"] and env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["device"] == "cpu"
    saved = [json.loads(line) for line in (tmp_path / "t" / "levels.jsonl").read_text().splitlines()]
    assert all(line["environment"] == env for line in saved)
    assert LevelRecord.from_flat(records[1].flat()) == records[1]  # a flat row (Tune, trials.csv) carries it as JSON


def test_numbers_from_two_machines_get_a_warning_and_from_one_none():
    here = environment("cpu")
    there = {**here, "cpu": "Other CPU", "cpu_capability": "AVX2"}
    newer_code = {**here, "commit": "0" * 40}
    assert mixed([here, json.dumps(here), newer_code, None]) is None  # one machine (code versions aside)
    warning = mixed([here, here, there, None])
    assert warning.startswith("warning: these numbers came from 2 kinds of machine")
    assert f"2 on {machine(here)}" in warning and f"1 on {machine(there)}" in warning
    assert mixed([listed([here, there])]) == mixed([here, there])  # a run's tag: a JSON list
    assert listed([here, json.dumps(here, sort_keys=True), None]) == "[" + json.dumps(here, sort_keys=True) + "]"
    assert listed([None]) is None


def test_sweep_status_warns_of_mixed_machines():
    from orchestrator.sweeps.results import status_report

    class Sweep:
        name, varied, trial_count = "s", [], 2

        class search:
            algorithm, metric, mode = "grid", ("final_test_acc",), ("max",)

    here = environment("cpu")
    rows = [{"trial_id": f"t{i}", "status": "TERMINATED", "level": 0, "error": None,
             "environment": json.dumps(env)} for i, env in enumerate([here, {**here, "device": "NVIDIA H200"}])]
    report = status_report(Sweep, rows)
    assert "warning: these numbers came from 2 kinds of machine" in report
    assert "warning" not in status_report(Sweep, rows[:1])
    # a trial Tune had not created when its driver last saved is counted, not forgotten
    assert status_report(Sweep, rows[:1]).splitlines()[0] == "sweep s (grid): 1 done, 0 running, 1 pending of 2 trials"
