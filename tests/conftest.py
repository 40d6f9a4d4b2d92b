import os

import pytest
import torch

from trials.spec import DatasetSpec, ModelSpec, PruneSpec, TrainSpec, TrialSpec

# Determinism tests compare runs in one process; fix the thread count for them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
    from trials import datasets

    return datasets.load(DatasetSpec(name="digits"), torch.device("cpu"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (never someone else's cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
