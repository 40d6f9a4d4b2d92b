import os

import pytest
import torch

from trials.spec import DatasetSpec, ModelSpec, PruneSpec, TrainSpec, TrialSpec

# Determinism tests compare runs in one process; fix the thread count for them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# `make test` runs the files on two pytest-xdist workers (-n 2 --dist loadfile
# --no-loadscope-reorder: each file on one worker, in this order). The files that take
# longest (--durations) go first, so that no worker is left with a long one at the end
# while the other idles.
FIRST = ("test_readme_run.py", "test_tracking.py", "test_s3_cluster.py", "test_autoscaler.py", "test_sweeps.py",
         "test_bookkeeping.py", "test_cluster.py", "test_packed.py", "test_progress.py", "test_pack_sweeps.py",
         "test_shared.py", "test_golden.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: a file's own order kept


def quick_spec(**changes) -> TrialSpec:
    """LeNet-300-100 on bundled digits: a real IMP trial in about a second per level."""
    base = dict(
        model=ModelSpec(name="lenet_300_100"),
        dataset=DatasetSpec(name="digits"),
        train=TrainSpec(optimizer="adam", lr=1e-3, batch_size=60, iterations=200, eval_interval=20),
        prune=PruneSpec(kind="unstructured", scope="layerwise", rate=0.2, output_rate=0.1, levels=2),
        device="cpu",
    )
    base.update(changes)
    return TrialSpec(**base)


@pytest.fixture
def spec_factory():
    return quick_spec


@pytest.fixture(scope="session")
def digits_cpu():
    from trials.nets import datasets

    return datasets.load(DatasetSpec(name="digits"), torch.device("cpu"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (never someone else's cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


LTH = str(__import__("pathlib").Path(__import__("sys").executable).parent / "lth")  # the installed CLI


def digits_base(levels: int = 2, **train) -> dict:
    """A sweep's `base`: LeNet-300-100 on bundled digits, about a second per level."""
    return {
        "model": "lenet_300_100",
        "dataset": {"name": "digits"},
        "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 60, "iterations": 60, "eval_interval": 20,
                  **train},
        "prune": {"rate": 0.3, "output_rate": 0.1, "levels": levels},
        "device": "cpu",
    }


def assert_each_level_trained_once(trial_dir, levels: int, members: int = 1) -> None:
    """Levels 0..levels of each of the Tune trial's `members` are all in its trial folder in
    storage (STORAGE/NAME/trials/<member id>/, orchestrator/sweeps/folders.py), and each was
    trained exactly once: every report of a member's level carries the stored record's
    wall-clock seconds (a level trained again would differ at least there). Tune's result
    log of a trial that failed over may miss rows or repeat one; the trial folder is the
    record (and trials.csv is built from it)."""
    import json

    reported = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    for member in range(members):
        member_id = trial_dir.name if members == 1 else f"{trial_dir.name}_{member:02d}"
        path = trial_dir.parent / "trials" / member_id / "levels.jsonl"
        seen = {r["level"]: r for r in map(json.loads, path.read_text().splitlines() if path.exists() else ())}
        assert sorted(seen) == list(range(levels + 1)), (member, sorted(seen))
        for r in (new for result in reported for new in result["pack_new"] if new["member"] == member):
            assert r["seconds"] == seen[r["level"]]["seconds"], f"level {r['level']} reported from two trainings"
