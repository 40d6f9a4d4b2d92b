"""The CUDA paths of packs and trials (skipped on a machine without a GPU; CI has none, so
these run where a GPU is lent: see ARCHITECTURE.md, "Numerics"). On the GPU a pack's
members match the same trials alone as on CPU (cuBLAS batched matmuls, cuDNN grouped
convolutions, cuDNN batch norm over K*C channels), a trial and a pack give the same bits
when run again (cuDNN's deterministic algorithms, IEEE float32 rather than TF32), and bf16
packs train. The single-trial CUDA tests are in test_lottery.py and test_supermask.py."""
import dataclasses

import pytest
import torch

from tests.conftest import quick_spec
from tests.test_packed import (assert_bn_model_steps_as_alone, assert_bn_pack_matches_alone, assert_close_to_alone,
                               assert_masks_exact, bn_spec, lenet, run_alone_and_packed, smooth)  # noqa: F401
from trials.nets import datasets
from trials.runner.levels import run_lottery
from trials.runner.levels import run_pack
from trials.spec import DatasetSpec, ModelSpec, PruneSpec, TrainSpec
from trials.folder.store import load_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def lenets():
    """Members that differ in seed, prune kind and rate, lr, weight decay, warmup and rewind."""
    return [
        lenet(seed=0, device="cuda"),
        lenet(seed=1, device="cuda", prune=PruneSpec(kind="structured", rate=0.3, levels=2), rewind_iteration=20),
        lenet(seed=2, device="cuda", rewind_iteration=40,
              train=TrainSpec(optimizer="adam", lr=2e-3, weight_decay=1e-4, batch_size=60, iterations=100,
                              eval_interval=20, warmup_iterations=10)),
    ]


def conv2s():
    base = dict(model=ModelSpec(name="conv2"), dataset=DatasetSpec(name="synthetic"), device="cuda",
                train=TrainSpec(optimizer="sgd", lr=0.02, momentum=0.9, batch_size=32, iterations=40, eval_interval=20))
    return [quick_spec(**base, seed=0, prune=PruneSpec(rate=0.3, levels=1)),
            quick_spec(**base, seed=1, prune=PruneSpec(rate=0.5, levels=1), rewind_iteration=20)]


@pytest.mark.parametrize("make, dataset", [(lenets, "digits"), (conv2s, "synthetic")])
def test_a_pack_on_cuda_matches_each_trial_alone(tmp_path, make, dataset):
    specs = make()
    data = datasets.load(DatasetSpec(name=dataset), CUDA)
    alone, outs, packed, _ = run_alone_and_packed(tmp_path, specs, data)
    for i in range(len(specs)):
        assert_close_to_alone(outs[i], tmp_path / f"alone{i}", packed[i], alone[i])
        assert_masks_exact(outs[i], packed[i])


def timeless(runs):
    return [[dataclasses.replace(r, seconds=0.0) for r in records] for records in runs]


def finals(out, levels):
    return [load_tensors(out / f"level_{lv:02d}" / "final.safetensors") for lv in range(levels)]


@pytest.mark.parametrize("make, dataset", [(lenets, "digits"), (conv2s, "synthetic")])
def test_same_pack_and_trial_on_cuda_give_the_same_bits_again(tmp_path, make, dataset):
    specs = make()
    data = datasets.load(DatasetSpec(name=dataset), CUDA)
    runs = [run_pack(specs, [tmp_path / f"pack{r}_{i}" for i in range(len(specs))], data=data) for r in range(2)]
    assert timeless(runs[0]) == timeless(runs[1])
    lone = [run_lottery(specs[0], tmp_path / f"alone{r}", data=data) for r in range(2)]
    assert timeless([lone[0]]) == timeless([lone[1]])
    levels = specs[0].last_level + 1
    for a, b in [(tmp_path / "pack0_0", tmp_path / "pack1_0"), (tmp_path / "alone0", tmp_path / "alone1")]:
        for x, y in zip(finals(a, levels), finals(b, levels)):
            assert all(x[n].equal(y[n]) for n in x), (a, b)


@pytest.mark.parametrize("name, width", [("resnet20", 0.25), ("vgg11", 0.125)])
def test_a_packed_bn_model_steps_as_each_member_alone_on_cuda(name, width):
    assert_bn_model_steps_as_alone(name, width, CUDA)


def test_resnet20_pack_on_cuda_matches_each_trial_alone(tmp_path, smooth):  # noqa: F811
    assert_bn_pack_matches_alone(tmp_path, [
        bn_spec("resnet20", 0.25, seed=0, device="cuda"),
        bn_spec("resnet20", 0.25, seed=1, device="cuda", prune=PruneSpec(kind="structured", rate=0.3, levels=2),
                rewind_iteration=5),
    ], CUDA)


def test_a_bf16_pack_trains(tmp_path):
    t = TrainSpec(optimizer="adam", lr=1e-3, batch_size=60, iterations=200, eval_interval=20, precision="bf16")
    specs = [quick_spec(train=t, device="cuda", seed=s) for s in range(2)]
    outs = [tmp_path / f"m{i}" for i in range(2)]
    packed = run_pack(specs, outs, data=datasets.load(DatasetSpec(name="digits"), CUDA))
    for out, records in zip(outs, packed):
        assert records[0].test_acc > 0.9
        assert_masks_exact(out, records)


# ---------------------------------------------------------------- CUDA graphs (trials/loop/training.py StepGraph)

GRAPHED = {  # name -> spec: each optimizer path, rate changes (warmup ramp, milestones), bf16, BatchNorm
    "adam": lambda: lenet(device="cuda", rewind_iteration=30),
    "adam-fused": lambda: lenet(device="cuda", train=TrainSpec(optimizer="adam", lr=1e-3, batch_size=60,
                                                                iterations=100, eval_interval=20, fused=True)),
    "sgd-schedule": lambda: lenet(device="cuda", train=TrainSpec(
        optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=60, iterations=120, eval_interval=20,
        warmup_iterations=10, milestones=(50, 90), gamma=0.1)),
    "sgd-fused-bf16": lambda: lenet(device="cuda", train=TrainSpec(
        optimizer="sgd", lr=0.05, momentum=0.9, batch_size=60, iterations=100, eval_interval=20, fused=True,
        precision="bf16")),
    "resnet20": lambda: bn_spec("resnet20", 0.25, levels=1, device="cuda", rewind_iteration=5).replace(
        train=TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=32, iterations=60, eval_interval=20)),
}


@pytest.mark.parametrize("case", sorted(GRAPHED))
def test_cuda_graph_steps_give_the_eager_bits(tmp_path, monkeypatch, case):
    """A trial whose steps replay as CUDA graphs gives the records, weights and rewind point
    of the same trial stepped eagerly, bit for bit; and graphs did replay."""
    from trials.loop import training

    spec = GRAPHED[case]()
    data = datasets.load(spec.dataset, CUDA)
    replays = []

    class Counted(training.StepGraph):
        def __call__(self, x, y, run):
            replays.append(self.graph is not None)
            super().__call__(x, y, run)

    monkeypatch.setattr(training, "StepGraph", Counted)
    graphed = run_lottery(spec, tmp_path / "graphed", data=data)
    assert sum(replays) > len(replays) / 2, (sum(replays), len(replays))
    monkeypatch.setattr(training, "CUDA_GRAPHS", False)
    replays.clear()
    eager = run_lottery(spec, tmp_path / "eager", data=data)
    assert not replays
    assert timeless([graphed]) == timeless([eager])
    levels = spec.last_level + 1
    for a, b in zip(finals(tmp_path / "graphed", levels), finals(tmp_path / "eager", levels)):
        assert all(a[n].equal(b[n]) for n in b)
    if spec.rewind_iteration:
        a, b = (load_tensors(tmp_path / d / "rewind.safetensors") for d in ("graphed", "eager"))
        assert all(a[n].equal(b[n]) for n in b)


def diverging_sgd_pair():
    """Two SGD members, the second diverges (lr 1e4) and fails alone mid-level: the graph
    of the step is dropped when the members change."""
    sgd = dict(optimizer="sgd", momentum=0.9, batch_size=60, iterations=100, eval_interval=20)
    return [lenet(device="cuda", train=TrainSpec(lr=0.05, **sgd), prune=PruneSpec(rate=0.2, levels=1)),
            lenet(device="cuda", train=TrainSpec(lr=1e4, **sgd), prune=PruneSpec(rate=0.2, levels=1), seed=1)]


PACKS_GRAPHED = {  # members starting at different iterations (rewind points), a warmup ramp, BatchNorm
    "lenets": (lenets, "digits"),
    "conv2s": (conv2s, "synthetic"),
    "resnet20s": (lambda: [bn_spec("resnet20", 0.25, levels=1, seed=s, device="cuda", rewind_iteration=5 * s).replace(
        train=TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=32, iterations=60, eval_interval=20))
        for s in range(2)], "synthetic"),
    "diverging": (diverging_sgd_pair, "digits"),
}


@pytest.mark.parametrize("case", sorted(PACKS_GRAPHED))
def test_a_packs_graph_steps_give_the_eager_bits(tmp_path, monkeypatch, case):
    """A pack whose steps replay as CUDA graphs writes each member's records, weights and
    rewind point as the same pack stepped eagerly, bit for bit; graphs did replay."""
    from trials.loop import training

    make, dataset = PACKS_GRAPHED[case]
    specs = make()
    data = datasets.load(DatasetSpec(name=dataset), CUDA)
    replays = []

    class Counted(training.StepGraph):
        def __call__(self, x, y, run):
            replays.append(self.graph is not None)
            super().__call__(x, y, run)

    monkeypatch.setattr(training, "StepGraph", Counted)
    runs = {}
    for mode in ("graphed", "eager"):
        monkeypatch.setattr(training, "CUDA_GRAPHS", mode == "graphed")
        errors = {}
        runs[mode] = run_pack(specs, [tmp_path / f"{mode}{i}" for i in range(len(specs))], data=data, errors=errors)
        assert (set(errors) == {1}) == (case == "diverging"), errors
        if mode == "graphed":
            assert sum(replays) > len(replays) / 2, (sum(replays), len(replays))
    assert timeless(runs["graphed"]) == timeless(runs["eager"])
    for i, spec in enumerate(specs):
        if not runs["eager"][i]:
            continue  # the member that diverged wrote no level
        levels = spec.last_level + 1
        for a, b in zip(finals(tmp_path / f"graphed{i}", levels), finals(tmp_path / f"eager{i}", levels)):
            assert all(a[n].equal(b[n]) for n in b), (case, i)
        a, b = (load_tensors(tmp_path / f"{mode}{i}" / "rewind.safetensors") for mode in ("graphed", "eager"))
        assert all(a[n].equal(b[n]) for n in b), (case, i)
