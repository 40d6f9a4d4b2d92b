"""Packs (trials/runner/levels.py run_pack): K IMP trials trained together match the same trials run alone
with trials.runner.levels.run_lottery (weights within 1e-5 after level 0, accuracies within half
a point at every level, masks and densities exact), each in its own normal trial folder; a
diverging member fails alone; what cannot be packed is refused with the reason. BatchNorm
models (ResNet-20, VGG) pack with per-member batch statistics and running averages: the
packed norm layer is the members' own arithmetic, and whole trials match alone where the
activation and pooling are smooth (fixture `smooth` says why). On shared
work units a pack trains each unit once, in the pack, and takes the rest from the store
(even one another process holds); a member's numbers do not depend on its co-members."""
import dataclasses
import json
import shutil
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.conftest import quick_spec
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trials.nets import datasets, masks, models
from trials.core.errors import ConfigError
from trials.runner.levels import run_lottery
from trials.runner.levels import PackFailed, run_pack, train_pack
from trials.loop.stacked import PackedBatchNorm, PackedNet, Stacked
from trials.nets.models import why_not_packable
from trials.loop.training import Job
from trials.folder.record import STABILITY, read_lines
from trials.spec import DatasetSpec, ModelSpec, PruneSpec, StabilitySpec, TrainSpec
from trials.folder.store import TrialDir, load_tensors, state_of
from trials.loop.training import TrainingDiverged

ACCURACIES = ("test_acc", "test_acc_at_early_stop", "val_acc")
EXACT = ("level", "density", "layer_density", "remaining_params", "start_iteration", "iterations")


def lenet(**changes):
    changes.setdefault("train", TrainSpec(optimizer="adam", lr=1e-3, batch_size=60, iterations=100, eval_interval=20))
    return quick_spec(**changes)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_close_to_alone(packed_out, alone_out, packed_records, alone_records):
    assert len(packed_records) == len(alone_records)
    for p, a in zip(packed_records, alone_records):
        for f in EXACT:
            assert getattr(p, f) == getattr(a, f), f
        for f in ACCURACIES:
            assert abs(getattr(p, f) - getattr(a, f)) <= 0.005, (p.level, f, getattr(p, f), getattr(a, f))
    for name in ("rewind.safetensors", "level_00/final.safetensors"):
        got, want = load_tensors(packed_out / name), load_tensors(alone_out / name)
        assert set(got) == set(want)
        for k in want:
            assert relative(got[k], want[k]) <= 1e-5, (name, k, relative(got[k], want[k]))


def assert_masks_exact(out, records):
    for r in records:
        d = out / f"level_{r.level:02d}"
        mask, final = load_tensors(d / "mask.safetensors"), load_tensors(d / "final.safetensors")
        for k, m in mask.items():
            assert float((final[k] * ~m).abs().sum()) == 0.0  # pruned weights exactly zero
        kept = {n: int(mask[f"{n}.weight"].sum()) for n in r.layer_density}
        assert r.layer_density == {n: kept[n] / mask[f"{n}.weight"].numel() for n in kept}
        assert r.remaining_params == sum(kept.values())


def run_alone_and_packed(tmp_path, specs, data):
    alone = [run_lottery(s, tmp_path / f"alone{i}", data=data) for i, s in enumerate(specs)]
    outs = [tmp_path / f"packed{i}" for i in range(len(specs))]
    reported = []
    packed = run_pack(specs, outs, report=lambda r, o: reported.append((o, r.level)), data=data)
    return alone, outs, packed, reported


def test_lenet_pack_matches_each_trial_alone(tmp_path, digits_cpu):
    """Members differ in seed, prune kind and rate, lr, weight decay and rewind iteration
    (so they start their levels at different iterations)."""
    specs = [
        lenet(seed=0),
        lenet(seed=1, prune=PruneSpec(kind="structured", rate=0.3, levels=2), rewind_iteration=20),
        lenet(seed=2, train=TrainSpec(optimizer="adam", lr=2e-3, weight_decay=1e-4, batch_size=60, iterations=100,
                                      eval_interval=20, warmup_iterations=10), rewind_iteration=40),
    ]
    alone, outs, packed, reported = run_alone_and_packed(tmp_path, specs, digits_cpu)
    for i, spec in enumerate(specs):
        assert_close_to_alone(outs[i], tmp_path / f"alone{i}", packed[i], alone[i])
        assert_masks_exact(outs[i], packed[i])
        # a normal trial folder: the spec, one record line per level, DONE markers
        meta = json.loads((outs[i] / "spec.json").read_text())
        assert meta["key"] == spec.key
        assert read_lines((outs[i] / "levels.jsonl").read_text()) == packed[i]
        assert [r.level for r in packed[i]] == [0, 1, 2]
        assert all((outs[i] / f"level_{lv:02d}" / "DONE").exists() for lv in range(3))
    assert sorted(reported) == sorted((o, lv) for o in outs for lv in range(3))
    assert packed[1][1].start_iteration == 20 and packed[2][2].start_iteration == 40


def test_retraining_modes_pack(tmp_path, digits_cpu):
    """lr_rewind and finetune start level L from level L-1's final weights (finetune at the
    final rate): in a pack, beside a weight-rewinding member, as alone."""
    t = TrainSpec(optimizer="adam", lr=1e-3, batch_size=60, iterations=100, eval_interval=20, milestones=(60,))
    specs = [lenet(seed=0, retrain="lr_rewind", rewind_iteration=20, train=t),
             lenet(seed=1, retrain="finetune", rewind_iteration=40, train=t),
             lenet(seed=2, rewind_iteration=20, train=t)]
    alone, outs, packed, _ = run_alone_and_packed(tmp_path, specs, digits_cpu)
    for i in range(len(specs)):
        assert_close_to_alone(outs[i], tmp_path / f"alone{i}", packed[i], alone[i])
        assert_masks_exact(outs[i], packed[i])
    assert [r.start_iteration for r in packed[1]] == [0, 40, 40]
    # the modes differ where they should: level 1 of lr_rewind starts from level 0's final weights
    assert packed[0][1].test_acc != packed[2][1].test_acc


def test_stability_copies_pack(tmp_path, digits_cpu):
    """Members that measure instability (at level 0 from their rewind point, and at level 1)
    train their copies together after the level; the fields agree with the trial alone
    (the copies' accuracies within half a point, barriers within a point)."""
    stab = StabilitySpec(copies=2, points=5, levels=(0, 1))
    specs = [lenet(seed=0, stability=stab, rewind_iteration=20, prune=PruneSpec(rate=0.2, levels=1)),
             lenet(seed=1, stability=stab, retrain="lr_rewind", prune=PruneSpec(rate=0.2, levels=1)),
             lenet(seed=2, prune=PruneSpec(rate=0.2, levels=1))]
    alone, outs, packed, _ = run_alone_and_packed(tmp_path, specs, digits_cpu)
    for i in range(len(specs)):
        assert_close_to_alone(outs[i], tmp_path / f"alone{i}", packed[i], alone[i])
        for p, a in zip(packed[i], alone[i]):
            for f in STABILITY:
                if getattr(a, f) is None:
                    assert getattr(p, f) is None, (i, p.level, f)
                else:
                    tolerance = 0.005 if f.startswith("stability_acc") else 0.01
                    assert abs(getattr(p, f) - getattr(a, f)) <= tolerance, (i, p.level, f, getattr(p, f), getattr(a, f))
    assert all(r.stability_error_barrier is not None for r in packed[0] + packed[1])


def test_controls_pack(tmp_path, digits_cpu):
    """A reinit and a random_prune control pack beside a ticket: each control's IMP run
    trains in the pack (in its OUT/imp/, as alone), its level 0 is that run's, its masks
    follow it (reinit: the same masks; random_prune: IMP's per-layer counts), and its
    records agree with the control alone."""
    specs = [lenet(seed=0, rewind_iteration=20),
             lenet(seed=0, rewind_iteration=20, control="reinit"),
             lenet(seed=1, control="random_prune", prune=PruneSpec(kind="structured", rate=0.3, levels=2))]
    alone, outs, packed, reported = run_alone_and_packed(tmp_path, specs, digits_cpu)
    for i in range(len(specs)):
        assert_close_to_alone(outs[i], tmp_path / f"alone{i}", packed[i], alone[i])
        assert_masks_exact(outs[i], packed[i])
    assert sorted(reported) == sorted((o, lv) for o in outs for lv in range(3))  # controls' trunks not reported
    for i in (1, 2):
        imp = read_lines((outs[i] / "imp" / "levels.jsonl").read_text())
        assert numbers(packed[i][:1]) == numbers(imp[:1])  # level 0 is IMP's
        for lv in (1, 2):
            own, theirs = (load_tensors(o / f"level_{lv:02d}" / "mask.safetensors") for o in (outs[i], outs[i] / "imp"))
            if i == 1:
                assert all(own[n].equal(theirs[n]) for n in theirs)
            else:
                assert packed[i][lv].layer_density == imp[lv].layer_density and not all(
                    own[n].equal(theirs[n]) for n in theirs)
    # the reinit control's network starts from its own init, not the ticket's
    assert not load_tensors(outs[1] / "rewind.safetensors")["hidden.0.weight"].equal(
        load_tensors(outs[0] / "rewind.safetensors")["hidden.0.weight"])


def test_a_control_in_a_pack_on_units_takes_its_tickets_trunk(tmp_path, digits_cpu):
    """On units, a control's IMP run is its ticket's trunk: trained once in the pack (by the
    ticket member), the control's levels its own; the numbers are those without units."""
    from tests.test_shared import store

    specs = [lenet(seed=0), lenet(seed=0, control="reinit")]
    on_units = run_pack(specs, [tmp_path / "u0", tmp_path / "u1"], data=digits_cpu, units=store(tmp_path / "storage"))
    plain = run_pack(specs, [tmp_path / "p0", tmp_path / "p1"], data=digits_cpu)
    assert [numbers(r) for r in on_units] == [numbers(r) for r in plain]
    assert ledger(tmp_path / "u0")["trained"] == [0, 1, 2] and ledger(tmp_path / "u1")["reused"] == [0, 1, 2]


def test_conv2_pack_matches_each_trial_alone(tmp_path):
    data = datasets.load(DatasetSpec(name="synthetic"), torch.device("cpu"))
    base = dict(model=ModelSpec(name="conv2", width=0.25), dataset=DatasetSpec(name="synthetic"),
                train=TrainSpec(optimizer="sgd", lr=0.02, momentum=0.9, batch_size=32, iterations=40, eval_interval=20))
    specs = [quick_spec(**base, seed=0, prune=PruneSpec(rate=0.3, levels=1)),
             quick_spec(**base, seed=1, prune=PruneSpec(rate=0.5, levels=1), rewind_iteration=20)]
    alone, outs, packed, _ = run_alone_and_packed(tmp_path, specs, data)
    for i in range(len(specs)):
        assert_close_to_alone(outs[i], tmp_path / f"alone{i}", packed[i], alone[i])
        assert_masks_exact(outs[i], packed[i])


def test_a_diverging_member_fails_alone(tmp_path, digits_cpu):
    sgd = dict(optimizer="sgd", momentum=0.9, batch_size=60, iterations=60, eval_interval=20)
    good = lenet(train=TrainSpec(lr=0.05, **sgd), prune=PruneSpec(rate=0.2, levels=1))
    bad = lenet(train=TrainSpec(lr=1e4, **sgd), prune=PruneSpec(rate=0.2, levels=1), seed=1)
    with pytest.raises(TrainingDiverged):
        run_lottery(bad, tmp_path / "bad_alone", data=digits_cpu)
    alone = run_lottery(good, tmp_path / "good_alone", data=digits_cpu)

    errors = {}
    outs = [tmp_path / "good", tmp_path / "bad"]
    packed = run_pack([good, bad], outs, data=digits_cpu, errors=errors)
    assert set(errors) == {1} and isinstance(errors[1], TrainingDiverged)
    assert packed[1] == [] and not (outs[1] / "level_00" / "DONE").exists()
    assert_close_to_alone(outs[0], tmp_path / "good_alone", packed[0], alone)

    with pytest.raises(PackFailed) as e:  # without an errors dict: raised after the others finished
        run_pack([good, bad], [tmp_path / "good2", tmp_path / "bad2"], data=digits_cpu)
    assert set(e.value.errors) == {1} and len(e.value.records[0]) == 2


def test_rerun_resumes_per_member(tmp_path, digits_cpu):
    specs = [lenet(prune=PruneSpec(rate=0.2, levels=1), train=TrainSpec(optimizer="adam", lr=1e-3, batch_size=60,
                                                                          iterations=40, eval_interval=20)),
             lenet(seed=1, prune=PruneSpec(rate=0.2, levels=2), train=TrainSpec(optimizer="adam", lr=1e-3,
                                                                                   batch_size=60, iterations=40,
                                                                                   eval_interval=20))]
    outs = [tmp_path / "a", tmp_path / "b"]
    first = run_pack(specs, outs, data=digits_cpu)
    assert [len(r) for r in first] == [2, 3]  # members may have different numbers of levels
    (outs[1] / "level_02" / "DONE").unlink()
    again = run_pack(specs, outs, data=digits_cpu)
    assert again[0] == first[0] and again[1][:2] == first[1][:2]  # done levels are read back, not retrained
    assert again[1][2].seconds != first[1][2].seconds and again[1][2].density == first[1][2].density


class LayerNormNet(nn.Module):
    def __init__(self, shape, num_classes):
        super().__init__()
        self.norm = nn.LayerNorm(shape[-1])
        self.fc = nn.Linear(shape[-1] * shape[-2] * shape[0], num_classes)

    def forward(self, x):
        return self.fc(self.norm(x).flatten(1))


@pytest.mark.parametrize("changes, key", [
    (dict(model=ModelSpec(name="layernorm_net")), "model.name"),
    (dict(method="edge_popup"), "method"),
])
def test_what_cannot_pack_is_refused_with_the_reason(tmp_path, changes, key):
    family = models.Family("LayerNorm net", f"{__name__}:LayerNormNet", None, no_ops="a test model")
    models.model("layernorm_net", family)(LayerNormNet)  # every registered model packs
    try:
        spec = lenet(**changes)
        other = lenet(seed=1) if key == "method" else spec.replace(seed=1)  # edge-popup packs with edge-popup only
        with pytest.raises(ConfigError, match=rf"^{key}") as e:
            run_pack([spec, other], [tmp_path / "a", tmp_path / "b"])
    finally:
        del models.MODELS["layernorm_net"], models.FAMILIES["layernorm_net"]
    if key == "model.name":
        assert "norm (LayerNorm) have no packed layer" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


@pytest.mark.parametrize("layer, reason", [
    (nn.GroupNorm(2, 4), "parameters in 1 (GroupNorm) have no packed layer"),
    (nn.InstanceNorm2d(4, track_running_stats=True), "buffers (running state) in 1 (InstanceNorm2d)"),
    (nn.BatchNorm2d(4, momentum=None), "momentum=None"),
    (nn.SyncBatchNorm(4), "parameters in 1 (SyncBatchNorm) have no packed layer"),
    (nn.BatchNorm2d(4), None),
    (nn.BatchNorm2d(4, affine=False), None),
    (nn.InstanceNorm2d(4), None),  # per example, no state: nothing to split
])
def test_norm_layers_pack_or_are_refused_with_the_reason(layer, reason):
    got = why_not_packable(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer))
    assert got is None if reason is None else reason in got


def test_members_must_share_the_loop(tmp_path):
    a = lenet()
    b = lenet(train=TrainSpec(optimizer="adam", lr=1e-3, batch_size=30, iterations=100, eval_interval=20))
    with pytest.raises(ConfigError, match=r"^train\.batch_size"):
        run_pack([a, b], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ConfigError, match=r"^pack"):
        run_pack([a, a.replace(seed=1)], [tmp_path / "a", tmp_path / "a"])


def test_pack_key_groups_what_can_train_together():
    from trials.spec.packing import pack_key

    a = lenet()
    assert pack_key(a) == pack_key(a.replace(seed=3, rewind_iteration=20, prune=PruneSpec(kind="structured")))
    assert pack_key(a) != pack_key(lenet(train=TrainSpec(optimizer="adam", lr=1e-3, batch_size=30, iterations=100,
                                                          eval_interval=20)))
    assert pack_key(a.replace(control="random_prune")) == pack_key(a.replace(retrain="lr_rewind")) == pack_key(a)
    ep = a.replace(method="edge_popup")
    assert pack_key(ep) is not None and pack_key(ep) != pack_key(a)  # scores pack with scores only
    assert pack_key(ep) == pack_key(ep.replace(train=dataclasses.replace(a.train, optimizer="adam", momentum=0.0)))
    resnet = lenet(model=ModelSpec(name="resnet20"), dataset=DatasetSpec(name="synthetic"))
    assert pack_key(resnet) is not None and pack_key(resnet) != pack_key(a)  # BatchNorm packs


# ---------------------------------------------------------------- packs on shared work units


def numbers(records):
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in records]


def ledger(out):
    return json.loads((out / "units.json").read_text())


SHARED = [lenet(seed=0, prune=PruneSpec(rate=0.2, levels=2)),
          lenet(seed=0, prune=PruneSpec(rate=0.5, levels=2), rewind_iteration=20),  # seed 0's dense run too
          lenet(seed=1, prune=PruneSpec(rate=0.2, levels=2))]


@pytest.fixture(scope="module")
def shared_pack(tmp_path_factory, digits_cpu):
    """SHARED packed once on a fresh unit store: (folder, outs, records, levels after_level saw)."""
    from tests.test_shared import store

    root = tmp_path_factory.mktemp("shared_pack")
    outs, levels = [root / f"packed{i}" for i in range(len(SHARED))], []
    records = run_pack(SHARED, outs, data=digits_cpu, units=store(root / "storage"), after_level=levels.append)
    return root, outs, records, levels


def test_a_pack_on_units_trains_each_unit_once_in_the_pack(shared_pack, digits_cpu):
    from orchestrator.sweeps.units import trained_log
    from trials.runner import shared

    root, outs, records, levels = shared_pack
    log = trained_log(str(root / "storage"))
    units = sorted(e["unit"] for e in log)
    assert units == sorted({shared.dense_name(s) for s in SHARED} |
                           {shared.level_name(s, lv) for s in SHARED for lv in (1, 2)})  # 2 dense runs, not 3
    assert not any(u.startswith("point/") for u in units)  # the dense run kept member 1's rewind point too
    assert {e["unit"]: e["pack"] for e in log if e["unit"].startswith("dense/")} == {
        shared.dense_name(SHARED[0]): 2, shared.dense_name(SHARED[2]): 2}
    assert {e["pack"] for e in log if e["unit"].startswith("trunk/")} == {3}
    assert levels == [0, 1, 2]
    for i, spec in enumerate(SHARED):
        alone = run_lottery(spec, root / f"alone{i}", data=digits_cpu)
        assert_close_to_alone(outs[i], root / f"alone{i}", records[i], alone)
        assert_masks_exact(outs[i], records[i])
        assert read_lines((outs[i] / "levels.jsonl").read_text()) == records[i]
    assert numbers(records[1][:1]) == numbers(records[0][:1])  # one dense run, copied
    assert [(ledger(o)["trained"], ledger(o)["reused"]) for o in outs] == [([0, 1, 2], []), ([1, 2], [0]),
                                                                            ([0, 1, 2], [])]
    assert ledger(outs[1])["dense"] == shared.dense_name(SHARED[1]) == shared.dense_name(SHARED[0])


def test_a_second_pack_on_the_same_units_trains_nothing(shared_pack, tmp_path, digits_cpu):
    from tests.test_shared import logged, store

    root, first_outs, first, _ = shared_pack
    before = logged(root / "storage")
    outs, levels = [tmp_path / f"again{i}" for i in range(len(SHARED))], []
    again = run_pack(SHARED, outs, data=digits_cpu, units=store(root / "storage"), after_level=levels.append)
    assert logged(root / "storage") == before and levels == [0, 1, 2]
    for i in range(len(SHARED)):
        assert numbers(again[i]) == numbers(first[i])
        assert ledger(outs[i])["reused"] == [0, 1, 2] and ledger(outs[i])["trained"] == []
        for lv in range(3):
            for name in ("mask.safetensors", "final.safetensors"):
                a, b = (load_tensors(o / f"level_{lv:02d}" / name) for o in (first_outs[i], outs[i]))
                assert all(a[n].equal(b[n]) for n in a)


def test_instability_in_a_pack_on_units_is_each_members_own(tmp_path, digits_cpu):
    """A dense unit never carries instability: the member that trained it measured its own
    copies (from its own rewind point) and the unit's record leaves them out, so a member
    that asks for none gets none, and the numbers are those of the same pack without units."""
    from tests.test_shared import store

    stab = StabilitySpec(copies=2, points=5, levels=(0, 1))
    specs = [lenet(seed=0, prune=PruneSpec(rate=0.2, levels=1), stability=stab, rewind_iteration=20),
             lenet(seed=0, prune=PruneSpec(rate=0.2, levels=1))]  # the same dense run
    on_units = run_pack(specs, [tmp_path / "u0", tmp_path / "u1"], data=digits_cpu, units=store(tmp_path / "storage"))
    plain = run_pack(specs, [tmp_path / "p0", tmp_path / "p1"], data=digits_cpu)
    assert [numbers(r) for r in on_units] == [numbers(r) for r in plain]
    assert on_units[0][0].stability_error_barrier is not None and on_units[0][1].stability_error_barrier is not None
    assert all(getattr(r, f) is None for r in on_units[1] for f in STABILITY)
    assert ledger(tmp_path / "u1")["reused"] == [0]
    dense = [json.loads(p.read_text()) for p in (tmp_path / "storage").rglob("record.json") if "dense" in str(p)]
    assert dense and not any(f in d for d in dense for f in STABILITY)


def test_a_unit_trained_alone_in_a_packed_sweep_is_the_packs_unit_bit_for_bit(shared_pack, tmp_path, digits_cpu):
    """Whoever trains a packed sweep's unit (a pack, a control's trunk, a helper: trials.runner.levels
    Producer(Stacked)), it holds the same numbers, so no race decides a sweep's results."""
    from tests.test_shared import store
    from trials.runner.levels import Producer

    root, first_outs, first, _ = shared_pack
    spec = SHARED[1]  # its dense run was trained in the pack by member 0, with this k kept too
    units = store(tmp_path / "storage")
    alone = run_lottery(spec, tmp_path / "trunk", data=digits_cpu, units=units, arithmetic=Stacked)
    assert numbers(alone) == numbers(first[1])
    for lv in range(3):
        for name in ("mask.safetensors", "final.safetensors"):
            a, b = (load_tensors(o / f"level_{lv:02d}" / name) for o in (first_outs[1], tmp_path / "trunk"))
            assert all(a[n].equal(b[n]) for n in a), (lv, name)
    k = spec.rewind_iteration  # a rewind point trained alone up to k: the dense run's weights at k
    Producer(Stacked).point(spec, k, tmp_path / "point", digits_cpu, "cpu")
    kept = load_tensors(tmp_path / "point" / f"{k}.safetensors")
    packed = load_tensors(first_outs[1] / "rewind.safetensors")
    assert all(kept[n].equal(packed[n]) for n in packed)


def test_a_pack_trains_its_other_members_before_taking_a_held_unit(tmp_path, digits_cpu, ray_local):
    """Member 1's dense unit is held by another process, which publishes it only once the
    pack has trained member 0's level 0; member 2's by one that died, so the pack takes its
    lease over and trains that member alone."""
    import threading

    import ray

    from orchestrator.sweeps.units import Broker, trained_log
    from tests.test_shared import logged, store
    from trials.runner import shared

    specs = [lenet(seed=s, prune=PruneSpec(rate=0.2, levels=2)) for s in range(3)]
    outs = [tmp_path / f"m{i}" for i in range(3)]
    held, dead = shared.dense_name(specs[1]), shared.dense_name(specs[2])
    broker = Broker.remote(3.0)
    other = store(tmp_path / "storage", broker)
    assert other.claim(held) == ("yours", None)
    assert ray.get(broker.claim.remote(dead, "ghost")) == "yours"  # and never renews
    seen = []

    def holder():
        deadline = time.monotonic() + 60
        while not (outs[0] / "level_00" / "DONE").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append((outs[0] / "level_00" / "DONE").exists())
        other.publish(held, dense_unit)

    def dense_unit(dest):  # what another process publishes: the dense run of a lone trial, its point 0 kept
        lone = specs[1].replace(prune=PruneSpec(levels=0))
        run_lottery(lone, tmp_path / "other", data=digits_cpu)
        shared.hand_over(TrialDir(tmp_path / "other", lone), 0, dest)
        (dest / shared.POINTS).mkdir()
        shutil.copyfile(tmp_path / "other" / "rewind.safetensors", dest / shared.POINTS / "0.safetensors")

    thread = threading.Thread(target=holder)
    thread.start()
    records = run_pack(specs, outs, data=digits_cpu, units=store(tmp_path / "storage", broker))
    thread.join()
    assert seen == [True]
    counts = logged(tmp_path / "storage")
    assert set(counts.values()) == {1} and len(counts) == 3 * 3
    log = {e["unit"]: e for e in trained_log(str(tmp_path / "storage"))}
    assert log[held]["owner"] == other.owner and log[dead]["pack"] == 1 and log[dead]["owner"] != other.owner
    assert (dead, "ghost") in ray.get(broker.state.remote())["takeovers"]
    assert numbers(records[1][:1]) == numbers(run_lottery(specs[1], tmp_path / "alone1", data=digits_cpu)[:1])
    assert [(ledger(o)["trained"], ledger(o)["reused"]) for o in outs] == [([0, 1, 2], []), ([1, 2], [0]),
                                                                            ([0, 1, 2], [])]


# ---------------------------------------------------------------- a member's bits are its own

# Ops that may see several members' examples or slices at once on CPU: they move or index
# data without arithmetic, or compute each element (or each example's row) alone with
# correctly rounded operations, so an element's result cannot depend on where it sits.
# Every other op (GEMMs, convolutions, norms, reductions, softmax, the optimizers' fused
# kernels) must be called only on tensors with the shapes and strides the member has alone.
PER_ELEMENT = {
    "view", "_unsafe_view", "reshape", "expand", "clone", "copy_", "detach", "select", "slice", "split", "unbind",
    "cat", "stack", "index", "lift_fresh", "zero_", "zeros_like", "fill_", "t", "transpose",
    "relu", "threshold_backward", "max_pool2d_with_indices", "max_pool2d_with_indices_backward",
    "add", "add_", "div", "eq", "argmax", "sum",  # sum: of the members' losses ([K], its gradient is 1 each),
    "mean",  # and of correct counts (integers); mean: global average pooling over each example's pixels
}


class Calls(TorchDispatchMode):
    """Every aten op's tensor arguments: op -> {(shape, stride)}."""

    def __init__(self):
        super().__init__()
        self.seen: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs or {})):
            if isinstance(t, torch.Tensor):
                self.seen.setdefault(func.overloadpacket.__name__, set()).add((tuple(t.shape), t.stride()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model, optimizer", [("lenet_300_100", "adam"), ("conv2", "sgd"), ("resnet20", "adam")])
def test_a_member_alone_and_in_a_pack_calls_the_same_kernels(model, optimizer):
    """Why a member's numbers cannot depend on its co-members on any CPU: in a pack its
    arithmetic runs the kernels it runs alone, on tensors of the same shapes and strides
    (per-member GEMMs, convolutions, norms, losses, optimizer steps: stacked.apart), and
    only per-element work sees the pack's stacked tensors. Checked on the ops themselves,
    not on this CPU's bits (a batched GEMM that happened to round alike here would pass a
    bit-for-bit test and fail on another CPU)."""
    dataset = DatasetSpec(name="digits" if model == "lenet_300_100" else "synthetic")
    data = datasets.load(dataset, torch.device("cpu"))

    def spec(seed, lr):
        return quick_spec(model=ModelSpec(name=model, width=1.0 if model == "lenet_300_100" else 0.25),
                          dataset=dataset, seed=seed,
                          train=TrainSpec(optimizer=optimizer, lr=lr, momentum=0.9 if optimizer == "sgd" else 0.0,
                                          batch_size=12, iterations=4, eval_interval=2))

    def calls(specs):
        template = models.build(specs[0].model, data.info, seed=0)
        jobs = []
        for s in specs:
            net = models.build(s.model, data.info, seed=s.seed)
            jobs.append(Job(s.train, s.seed, masks.ones(masks.Layers.of(net)), state_of(net), 0))
        with Calls() as seen:
            results = train_pack(template, jobs, data)
        assert not any(isinstance(r, BaseException) for r in results)
        return seen.seen

    alone = calls([spec(0, 1e-3)])
    pack = calls([spec(1, 2e-3), spec(0, 1e-3), spec(2, 1e-3)])  # two optimizer groups: one of two members
    kernels = {"addmm", "convolution", "convolution_backward", "native_batch_norm", "_log_softmax", "nll_loss_forward",
               "_fused_adam_" if optimizer == "adam" else "_fused_sgd_"}
    assert kernels & set(pack) == kernels - ({"convolution", "convolution_backward"} if model == "lenet_300_100" else
                                              set()) - ({"native_batch_norm"} if model != "resnet20" else set())
    stacked = {op: sorted(pack[op] - alone.get(op, set()))[:3] for op in pack if op not in PER_ELEMENT}
    assert {op: sigs for op, sigs in stacked.items() if sigs} == {}


@pytest.mark.parametrize("model, optimizer", [("lenet_300_100", "adam"), ("lenet_300_100", "sgd"), ("conv2", "adam")])
def test_a_members_numbers_do_not_depend_on_its_co_members(tmp_path, digits_cpu, model, optimizer):
    """What makes a unit trained by any pack the same unit, on this CPU's bits (the test
    above says why it holds on any CPU)."""
    dataset = DatasetSpec(name="digits" if model == "lenet_300_100" else "synthetic")
    data = digits_cpu if model == "lenet_300_100" else datasets.load(dataset, torch.device("cpu"))

    def spec(seed=0, lr=1e-3 if optimizer == "adam" else 0.05, **changes):
        return lenet(seed=seed, prune=changes.pop("prune", PruneSpec(rate=0.2, levels=2)), **changes,
                     model=ModelSpec(name=model, width=1.0 if model == "lenet_300_100" else 0.25),
                     dataset=dataset,
                     train=TrainSpec(optimizer=optimizer, lr=lr, momentum=0.9 if optimizer == "sgd" else 0.0,
                                     batch_size=60 if model == "lenet_300_100" else 20,
                                     iterations=60 if model == "lenet_300_100" else 40, eval_interval=20))

    a = spec()
    packs = {"alone": [a], "same_group": [a, spec(seed=1)],  # stepped by one optimizer call with a
             "other": [spec(seed=2, lr=2e-3, rewind_iteration=20, prune=PruneSpec(rate=0.5, levels=2)), a]}
    finals, records = {}, {}
    for name, specs in packs.items():
        outs = [tmp_path / name / str(i) for i in range(len(specs))]
        got = run_pack(specs, outs, data=data)
        m = specs.index(a)
        records[name] = numbers(got[m])
        finals[name] = [load_tensors(outs[m] / f"level_{lv:02d}" / "final.safetensors") for lv in range(3)]
    for name in packs:
        assert records[name] == records["alone"], name
        for lv in range(3):
            assert all(finals[name][lv][n].equal(finals["alone"][lv][n]) for n in finals["alone"][lv]), (name, lv)


# ---------------------------------------------------------------- BatchNorm models


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm2d, (6, 5, 4, 4)), (nn.BatchNorm1d, (6, 5, 7)),
                                        (nn.BatchNorm1d, (6, 5))])
def test_packed_batchnorm_is_each_members_own_arithmetic(cls, shape):
    """K lone norm layers (their own affine parameters, running averages and counts) against
    one PackedBatchNorm, training and eval: outputs, running averages, counts and parameter
    gradients are the same bits; input gradients too, except BatchNorm1d on [N, C] (another
    CPU kernel path: ~1e-8 relative)."""
    torch.manual_seed(0)
    k = 3
    lone = [cls(shape[1]) for _ in range(k)]
    for i, bn in enumerate(lone):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_()
            bn.num_batches_tracked += 10 * i
    packed = PackedBatchNorm(lone[0], k)
    with torch.no_grad():
        for i, bn in enumerate(lone):
            for n, t in bn.state_dict().items():
                getattr(packed, n)[i].copy_(t)
    for training in (True, False):
        packed.train(training), [bn.train(training) for bn in lone]
        xs = [torch.randn(shape, requires_grad=True) for _ in range(k)]
        x = torch.cat([t.detach() for t in xs]).requires_grad_()
        want, got = [bn(t) for bn, t in zip(lone, xs)], packed(x)
        assert got.equal(torch.cat(want))
        g = torch.randn_like(got)
        (got * g).sum().backward()
        sum((w * gi).sum() for w, gi in zip(want, g.chunk(k))).backward()
        assert relative(x.grad, torch.cat([t.grad for t in xs])) <= (1e-7 if len(shape) == 2 and training else 0.0)
        for i, bn in enumerate(lone):
            assert all(getattr(packed, n)[i].equal(t) for n, t in bn.state_dict().items())
            assert packed.weight.grad[i].equal(bn.weight.grad) and packed.bias.grad[i].equal(bn.bias.grad)
            bn.zero_grad()
        packed.zero_grad()
    assert packed.num_batches_tracked.tolist() == [1, 11, 21]  # one training forward each


@pytest.mark.parametrize("name, width", [("resnet20", 0.25), ("vgg11", 0.125)])
def test_a_packed_bn_model_steps_as_each_member_alone(name, width):
    """The real models (ReLU, max-pooling): one training forward/backward of a pack of two
    against each member alone: logits, gradients, running averages and counts, then eval
    logits; a member's state has exactly the keys, shapes and dtypes of the model's."""
    assert_bn_model_steps_as_alone(name, width, torch.device("cpu"))


def assert_bn_model_steps_as_alone(name, width, device):
    data = datasets.load(DatasetSpec(name="synthetic"), device)
    spec = ModelSpec(name=name, width=width)
    nets = [models.build(spec, data.info, seed=s, device=device) for s in range(2)]
    pnet = PackedNet(models.build(spec, data.info, seed=5), 2, device)
    for m, net in enumerate(nets):
        pnet.load(m, state_of(net))
    x, y = data.train_x[:64], data.train_y[:64]
    for training in (True, False):
        pnet.net.train(training), [net.train(training) for net in nets]
        got = pnet.net(x)
        want = [net(part) for net, part in zip(nets, x.chunk(2))]
        assert relative(got.detach(), torch.cat(want).detach()) <= 1e-6
        if training:
            F.cross_entropy(got, y, reduction="none").view(2, -1).mean(1).sum().backward()
            for w, part in zip(want, y.chunk(2)):
                F.cross_entropy(w, part).backward()
    for m, net in enumerate(nets):
        member, alone = pnet.member(m), state_of(net)
        assert list(member) == list(alone)
        assert all(member[n].shape == alone[n].shape and member[n].dtype == alone[n].dtype for n in alone)
        assert member_relative(member, alone) <= 1e-6
        assert all(member[n].equal(alone[n]) for n in alone if not alone[n].is_floating_point())
        grads = {n: mod.unlayout(p, pnet.params[n].grad[m]) for n, (mod, p) in pnet.layers.items()}
        assert member_relative(grads, {n: p.grad for n, p in net.named_parameters()}) <= 1e-5


def member_differences(got: dict, want: dict) -> dict:
    """name -> relative difference of each float tensor of a member's state, measured against
    the larger of its own norm and its layer's weight's. A tensor that is tiny next to its
    layer (BatchNorm's shift early in training; a conv bias just before a BatchNorm, whose
    exact gradient is 0, so its values are rounding noise) measures nothing relative to itself."""
    out = {}
    for n, w in want.items():
        if w.is_floating_point():
            layer = want.get(n.rsplit(".", 1)[0] + ".weight", w)
            scale = max(float(w.double().norm()), float(layer.double().norm()), 1e-12)
            out[n] = float((got[n].double() - w.double()).norm()) / scale
    return out


def member_relative(got: dict, want: dict) -> float:
    return max(member_differences(got, want).values(), default=0.0)


@pytest.fixture
def smooth(monkeypatch):
    """ReLU -> GELU and max- -> average pooling, everywhere, for one test. With ReLU, BatchNorm
    centres every pre-activation on the kink: any rounding difference (a pack's grouped
    convolution; the fused optimizer) soon flips some ReLU, and the runs part. ResNet-20
    (width 0.5, SGD lr 0.01) alone, torch's default SGD against its fused one: the worst
    tensor goes from 3e-7 to 1e-3 relative in one step (iteration 12), 1e-1 by 20; pack
    against alone parts the same way. With GELU that pair stays within 5e-6 over 30
    iterations. Max-pooling's switches do the same to VGG."""
    gelu, avg = F.gelu, F.avg_pool2d
    monkeypatch.setattr(F, "relu", lambda x, inplace=False: gelu(x))
    monkeypatch.setattr(F, "max_pool2d", lambda x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                        return_indices=False: avg(x, kernel_size, stride, padding, ceil_mode))


# Whole BatchNorm-model trials, pack against alone (smooth activation and pooling), every
# saved state measured by member_differences: <= 1.03e-5 measured (ResNet-20 member 2, lr 0.1:
# a conv weight at level 0; the other members <= 6.4e-6, VGG <= 1.7e-6). Not BatchNorm's doing
# (its packed arithmetic is the member's own bits, test above): the grouped convolutions'
# rounding (~1e-6 of a gradient) grows with depth and learning rate, as in conv2 (module doc).
BN_WEIGHTS = 2e-5


def assert_bn_pack_matches_alone(tmp_path, specs, device=torch.device("cpu")):
    data = datasets.load(DatasetSpec(name="synthetic"), device)
    alone, outs, packed, _ = run_alone_and_packed(tmp_path, specs, data)
    assert any(r.early_stop_iteration < r.start_iteration + r.iterations for rs in alone for r in rs)  # a restore
    for i, spec in enumerate(specs):
        assert len(packed[i]) == len(alone[i]) == spec.last_level + 1
        for p, a in zip(packed[i], alone[i]):
            assert all(getattr(p, f) == getattr(a, f) for f in EXACT)
            for f in ACCURACIES:
                assert abs(getattr(p, f) - getattr(a, f)) <= 0.005, (i, p.level, f, getattr(p, f), getattr(a, f))
        files = ["rewind.safetensors", *(f"level_{lv:02d}/{f}.safetensors" for lv in range(len(alone[i]))
                                         for f in ("mask", "final"))]
        for name in files:
            got, want = load_tensors(outs[i] / name), load_tensors(tmp_path / f"alone{i}" / name)
            assert list(got) == list(want), name  # what state_of(net) of the lone model holds, buffers too
            assert all(got[n].shape == want[n].shape and got[n].dtype == want[n].dtype for n in want)
            assert all(got[n].equal(want[n]) for n in want if not want[n].is_floating_point()), name  # masks, counts
            worst = max(((d, n) for n, d in member_differences(got, want).items()), default=(0.0, None))
            assert worst[0] <= BN_WEIGHTS, (i, name, worst)
        assert_masks_exact(outs[i], packed[i])


def bn_spec(name, width, levels=2, lr=0.05, **changes):
    train = TrainSpec(optimizer="sgd", lr=lr, momentum=0.9, weight_decay=1e-4, batch_size=32, iterations=20,
                      eval_interval=10, warmup_iterations=changes.pop("warmup_iterations", 0))
    return quick_spec(model=ModelSpec(name=name, width=width), dataset=DatasetSpec(name="synthetic"), train=train,
                      prune=changes.pop("prune", PruneSpec(rate=0.3, levels=levels)), **changes)


def test_resnet20_pack_matches_each_trial_alone(tmp_path, smooth):
    """Three members (seeds, unstructured/structured pruning, rates, lr and warmup, rewind
    iterations 0 and 5): masks and densities exact, accuracies within half a point, every
    saved state (rewind point, each level's final: weights, running averages, counts) with
    the lone trial's keys and within BN_WEIGHTS (member_differences)."""
    assert_bn_pack_matches_alone(tmp_path, [
        bn_spec("resnet20", 0.25, seed=0),
        bn_spec("resnet20", 0.25, seed=1, prune=PruneSpec(kind="structured", rate=0.3, levels=2), rewind_iteration=5),
        bn_spec("resnet20", 0.25, seed=2, lr=0.1, warmup_iterations=5, prune=PruneSpec(rate=0.5, levels=2)),
    ])


def test_vgg_pack_matches_each_trial_alone(tmp_path, smooth):
    """VGG-11 (conv biases, BatchNorm companions of structured pruning): as above, one level."""
    assert_bn_pack_matches_alone(tmp_path, [
        bn_spec("vgg11", 0.125, levels=1, seed=0),
        bn_spec("vgg11", 0.125, seed=1, prune=PruneSpec(kind="structured", rate=0.3, levels=1), rewind_iteration=5),
    ])
