"""Whole IMP trials on real data (bundled digits): file contract, accuracy, determinism,
resumption, rewinding and the controls."""
import json

import pytest
import torch

from tests.conftest import quick_spec
from trials.nets import datasets, masks, models, paths
from trials.core.errors import ConfigError
from trials.runner.levels import run_lottery
from trials.spec import PruneSpec, TrainSpec
from trials.folder.record import EARLY_BIRD, FIELDS, STABILITY, read_lines
from trials.folder.store import load_tensors


def numbers(out):
    """levels.jsonl without the wall-clock field."""
    rows = [json.loads(line) for line in (out / "levels.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    """One 3-level LeNet-300-100 trial on digits, shared by the contract tests."""
    spec = quick_spec(prune=PruneSpec(rate=0.2, output_rate=0.1, levels=3))
    out = tmp_path_factory.mktemp("trial")
    reported = []
    records = run_lottery(spec, out, report=lambda r, o: reported.append((r.level, o)))
    return spec, out, records, reported


def test_dense_lenet_on_digits_is_accurate(trial):
    spec, out, records, reported = trial
    assert records[0].density == 1.0 and records[0].test_acc > 0.9
    assert [lv for lv, _ in reported] == [0, 1, 2, 3] and all(o == out for _, o in reported)


def test_files_follow_the_contract(trial):
    spec, out, records, _ = trial
    meta = json.loads((out / "spec.json").read_text())
    assert meta["key"] == spec.key and meta["spec"] == spec.to_dict() and "git_sha" in meta
    assert numbers(out) == [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in records]
    lines = [json.loads(line) for line in (out / "levels.jsonl").read_text().splitlines()]
    # the schema: no instability measured, and IMP without early-bird levels writes no early-bird fields
    assert all(set(line) == set(FIELDS) - set(STABILITY) - set(EARLY_BIRD) for line in lines)
    net = models.build(spec.model, datasets.info(spec.dataset), seed=0)
    names = set(net.state_dict())
    assert set(load_tensors(out / "rewind.safetensors")) == names
    for r in records:
        d = out / f"level_{r.level:02d}"
        assert (d / "DONE").exists()
        mask, final = load_tensors(d / "mask.safetensors"), load_tensors(d / "final.safetensors")
        assert set(final) == names and set(mask) <= names and all(m.dtype == torch.bool for m in mask.values())
        assert all(float((final[k] * ~m).abs().sum()) == 0.0 for k, m in mask.items())


def test_density_follows_the_rates_exactly(trial):
    """Each level keeps exactly n - round(rate * n) of each layer's survivors."""
    _, out, records, _ = trial
    sizes = {"hidden.0": 64 * 300, "hidden.1": 300 * 100, "fc": 100 * 10}  # digits: 8x8 inputs
    rates = {"hidden.0": 0.2, "hidden.1": 0.2, "fc": 0.1}
    expected = dict(sizes)
    for r in records:
        mask = load_tensors(out / f"level_{r.level:02d}" / "mask.safetensors")
        counts = {n: int(mask[f"{n}.weight"].sum()) for n in sizes}
        assert counts == expected
        assert r.layer_density == {n: counts[n] / sizes[n] for n in sizes}
        assert r.remaining_params == sum(counts.values())
        assert r.density == sum(counts.values()) / sum(sizes.values())
        expected = {n: c - round(rates[n] * c) for n, c in counts.items()}


def test_masks_are_nested_and_survivors_restart_from_the_rewind_point(trial):
    spec, out, records, _ = trial
    levels = [load_tensors(out / f"level_{lv:02d}" / "mask.safetensors") for lv in range(4)]
    for outer, inner in zip(levels, levels[1:]):
        assert masks.is_nested(inner, outer)
    # restart level 3 from its files and capture the weights it starts from
    from trials.nets.datasets import load

    from trials.runner.levels import Member, PackTrainer
    from trials.loop.arithmetic import Alone

    data = load(spec.dataset, torch.device("cpu"))
    member = Member(spec, out, data, torch.device("cpu"))
    rewind, captured = load_tensors(out / "rewind.safetensors"), {}
    job = member.job(3)  # level 3 again, from the folder's level 2
    assert all(job.mask[n].equal(levels[3][n]) for n in levels[3])
    job.hooks = {spec.rewind_iteration: captured.update}
    PackTrainer(models.build(spec.model, data.info, seed=0), data, Alone).run([job])
    for k, v in rewind.items():
        m = levels[3].get(k)
        assert torch.equal(captured[k], v * m if m is not None else v)


def test_same_spec_same_numbers(tmp_path, trial):
    spec, out, _, _ = trial
    run_lottery(spec, tmp_path / "again")
    assert numbers(tmp_path / "again") == numbers(out)
    a, b = (load_tensors(d / "level_03" / "final.safetensors") for d in (out, tmp_path / "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_skips_done_levels_and_redoes_from_a_missing_one(tmp_path):
    spec = quick_spec()
    run_lottery(spec, tmp_path)
    before = numbers(tmp_path)
    level0 = (tmp_path / "level_00" / "final.safetensors").stat().st_mtime_ns
    (tmp_path / "level_01" / "DONE").unlink()
    trained = []
    run_lottery(spec, tmp_path, progress=lambda level, *a: trained.append(level))
    assert set(trained) == {1, 2}  # level 0 skipped; 1 and 2 (which derives from 1) redone
    assert (tmp_path / "level_00" / "final.safetensors").stat().st_mtime_ns == level0
    assert numbers(tmp_path) == before
    trained.clear()
    run_lottery(spec, tmp_path, progress=lambda level, *a: trained.append(level))
    assert trained == []


def test_rewinding_to_k_trains_k_to_the_end(tmp_path):
    t = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=60, iterations=120, eval_interval=20,
                  milestones=(60,))
    records = run_lottery(quick_spec(train=t, rewind_iteration=40), tmp_path)
    assert records[0].start_iteration == 0 and records[0].iterations == 120
    assert all(r.start_iteration == 40 and r.iterations == 80 for r in records[1:])
    assert all(r.early_stop_iteration > 40 for r in records[1:])


@pytest.mark.parametrize("control", ["reinit", "random_prune"])
def test_controls_keep_imp_density(tmp_path, control):
    spec = quick_spec(control=control)
    records = run_lottery(spec, tmp_path)
    imp = read_lines((tmp_path / "imp" / "levels.jsonl").read_text())
    assert [r.layer_density for r in records] == [r.layer_density for r in imp]
    assert records[0] == imp[0]  # the dense level is shared
    own = [load_tensors(tmp_path / f"level_{lv:02d}" / "mask.safetensors") for lv in range(3)]
    ticket = [load_tensors(tmp_path / "imp" / f"level_{lv:02d}" / "mask.safetensors") for lv in range(3)]
    start, ticket_start = (load_tensors(d / "rewind.safetensors") for d in (tmp_path, tmp_path / "imp"))
    same_masks = all(torch.equal(own[2][k], ticket[2][k]) for k in own[2])
    same_start = all(torch.equal(start[k], ticket_start[k]) for k in start)
    if control == "reinit":
        assert same_masks and not same_start
    else:
        assert not same_masks and same_start
        assert masks.is_nested(own[2], own[1])
    assert records[2].test_acc != imp[2].test_acc or records[2].val_loss != imp[2].val_loss
    ops = masks.Layers.of(models.build(spec.model, datasets.info(spec.dataset), 0)).ops
    for r, mask in zip(records, own):  # the control's own masks' paths (trials/nets/paths.py)
        assert r.effective_density == paths.effective_density(ops, mask) <= r.density


def test_structured_trial_removes_units(tmp_path):
    records = run_lottery(quick_spec(prune=PruneSpec(kind="structured", rate=0.25, levels=2)), tmp_path)
    mask = load_tensors(tmp_path / "level_02" / "mask.safetensors")
    rows = mask["hidden.0.weight"].flatten(1)
    assert int(rows.any(1).sum()) == 300 - 75 - round(0.25 * 225)  # 169 neurons remain
    assert torch.equal(mask["hidden.0.bias"], rows.any(1))
    assert mask["fc.weight"].all()
    assert records[2].layer_density["hidden.0"] == pytest.approx(169 / 300)


def test_folder_of_another_trial_is_refused(tmp_path, trial):
    _, out, _, _ = trial
    other = quick_spec(seed=7)
    with pytest.raises(ConfigError, match="--out"):
        run_lottery(other, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_trial(tmp_path, precision):
    """The same code path on the GPU: data on the device, masks hold, accuracy is real."""
    t = TrainSpec(optimizer="adam", lr=1e-3, batch_size=60, iterations=200, eval_interval=20,
                  precision=precision)
    records = run_lottery(quick_spec(train=t, device="cuda"), tmp_path)
    assert records[0].test_acc > 0.9
    final = load_tensors(tmp_path / "level_02" / "final.safetensors")
    mask = load_tensors(tmp_path / "level_02" / "mask.safetensors")
    assert all(float((final[k] * ~m).abs().sum()) == 0.0 for k, m in mask.items())
