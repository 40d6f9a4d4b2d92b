"""Instability analysis (trials/methods/stability.py), the retraining modes (spec.retrain), their
validation, the instability objectives, plots and tables, and `lth stability find`.
Tiny trials: LeNet-300-100 on bundled digits, tens of iterations."""
import json
import math

import pandas as pd
import pytest
import torch

import analysis
from lth.cli import main
from orchestrator.objectives import OBJECTIVES, summarise
from orchestrator.sweep_spec import parse_sweep
from tests.conftest import digits_base, quick_spec
from trials.runner import levels as lottery_module
from trials.nets import masks, models
from trials.methods import stability
from trials.core.errors import ConfigError
from trials.runner.levels import run_lottery
from trials.folder.record import EARLY_BIRD, FIELDS, OPTIONAL, STABILITY, LevelRecord, read_lines
from trials.spec import DatasetSpec, ModelSpec, PruneSpec, StabilitySpec, TrainSpec, from_dict
from trials.folder.store import load_tensors
from trials.loop.arithmetic import Alone
from trials.loop.training import learning_rate

CPU = torch.device("cpu")
TINY = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=60, iterations=60, eval_interval=20,
                 milestones=(40,))


def tiny(**changes):
    return quick_spec(**{"train": TINY, "prune": PruneSpec(rate=0.3, output_rate=0.1, levels=1), **changes})


def start_and_mask(spec, density=None):
    """Init weights of the spec's net and a mask (all ones, or random at `density`)."""
    net = models.build(spec.model, __import__("trials.nets.datasets", fromlist=["info"]).info(spec.dataset), seed=0)
    layers = masks.Layers.of(net)
    mask = masks.ones(layers)
    if density is not None:
        g = torch.Generator().manual_seed(1)
        mask = {k: torch.rand(m.shape, generator=g) < density for k, m in mask.items()}
    return {k: v.clone() for k, v in net.state_dict().items()}, mask


# ---------------------------------------------------------------- the measurement


def test_the_line_ends_are_the_copies_own_accuracies(digits_cpu):
    spec = tiny(stability=StabilitySpec(copies=2, points=5))
    start, mask = start_and_mask(spec)
    net = models.build(spec.model, digits_cpu.info, seed=0)
    seeds = [stability.noise_seed(spec, c) for c in range(2)]
    (a, ra), (b, rb) = (stability.train_copy(net, spec, 0, start, mask, digits_cpu, s) for s in seeds)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # other noise, other weights
    curve = stability.interpolate(net, a, b, mask, digits_cpu, spec)
    assert [p["alpha"] for p in curve] == [0, 0.25, 0.5, 0.75, 1]
    assert curve[0]["acc"] == ra["test_acc"] and curve[-1]["acc"] == rb["test_acc"]  # no BatchNorm: exact
    fields = stability.measure(spec, 0, start, mask, digits_cpu, CPU)
    assert set(fields) == set(STABILITY)
    assert fields["stability_acc_a"] == ra["test_acc"] and fields["stability_acc_b"] == rb["test_acc"]
    errors = [1 - p["acc"] for p in curve]
    assert fields["stability_error_barrier"] == max(errors) - (errors[0] + errors[-1]) / 2 >= 0
    assert fields["stability_loss_barrier"] == stability.barriers(curve)["loss_barrier"] >= 0


def test_two_copies_with_the_same_noise_seed_have_instability_zero(digits_cpu):
    spec = tiny(stability=StabilitySpec(copies=2, points=4))
    start, mask = start_and_mask(spec, density=0.5)
    fields = stability.measure(spec, 0, start, mask, digits_cpu, CPU, seeds=[7, 7])
    assert fields["stability_error_barrier"] == 0.0 and fields["stability_loss_barrier"] == 0.0
    assert fields["stability_acc_a"] == fields["stability_acc_b"]


def test_pruned_weights_stay_exactly_zero_at_every_point_of_the_line(digits_cpu, monkeypatch):
    spec = tiny(stability=StabilitySpec(copies=3, points=6))
    start, mask = start_and_mask(spec, density=0.3)
    seen = []
    real = stability.evaluate

    def checking(net, x, y, autocast):
        params = dict(net.named_parameters())
        seen.append(all(float(params[k][~m].abs().sum()) == 0.0 for k, m in mask.items()))
        return real(net, x, y, autocast)

    monkeypatch.setattr(stability, "evaluate", checking)
    stability.measure(spec, 1, start, mask, digits_cpu, CPU)
    assert len(seen) == 3 * 6 and all(seen)  # 3 pairs of copies x 6 points, every one masked


def test_batchnorm_statistics_are_recomputed_and_momentum_restored():
    from trials.nets import datasets

    spec = quick_spec(model=ModelSpec(name="resnet20"), dataset=DatasetSpec(name="synthetic"),
                      stability=StabilitySpec(copies=2, points=2, bn_batches=2))
    data = datasets.load(spec.dataset, CPU)
    net = models.build(spec.model, data.info, seed=0)
    norms = stability._norms(net)
    assert norms
    autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    stability.recompute_batchnorm(net, data, spec, autocast)
    once = [m.running_mean.clone() for m in norms]
    for m in norms:  # garbage statistics: recomputing must not depend on them
        m.running_mean.fill_(5.0)
        m.running_var.fill_(9.0)
    stability.recompute_batchnorm(net, data, spec, autocast)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(once, norms))
    assert all(m.momentum == 0.1 for m in norms)


# ---------------------------------------------------------------- inside a trial


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    spec = tiny(prune=PruneSpec(rate=0.3, output_rate=0.1, levels=2), rewind_iteration=20,
                stability=StabilitySpec(copies=2, points=4, levels=(0, 1)))
    out = tmp_path_factory.mktemp("measured")
    return spec, out, run_lottery(spec, out)


def test_the_trial_records_instability_at_the_asked_levels(measured):
    spec, out, records = measured
    for r in records[:2]:
        assert all(getattr(r, f) is not None for f in STABILITY) and 0 <= r.stability_error_barrier <= 1
    assert all(getattr(records[2], f) is None for f in STABILITY)
    lines = [json.loads(line) for line in (out / "levels.jsonl").read_text().splitlines()]
    assert set(lines[0]) == set(FIELDS) - set(EARLY_BIRD) and set(lines[2]) == set(FIELDS) - set(STABILITY) - set(EARLY_BIRD)
    # written once, complete: each level's record.json already holds its measurement
    for r in records:
        assert LevelRecord.from_dict(json.loads((out / f"level_{r.level:02d}" / "record.json").read_text())) == r
    assert read_lines((out / "levels.jsonl").read_text()) == records
    assert run_lottery(spec, out) == records  # a rerun finds every level done


def test_measure_stability_on_a_written_level_repeats_the_record(measured):
    """Another runner that copied a level (not trained it) measures it from the folder alone."""
    spec, out, records = measured
    from trials.nets.datasets import load

    data = load(spec.dataset, CPU)
    member = lottery_module.Member(spec, out, data, CPU)
    training = lottery_module.PackTrainer(models.build(spec.model, data.info, seed=0), data, Alone)
    fields = lottery_module.instability([member], training, [(0, 1, member.trial.mask(1))])
    assert records[1].replace(**{f: None for f in STABILITY}).replace(**fields[0]) == records[1]
    assert lottery_module.instability([member], training, [(0, 2, member.trial.mask(2))]) == {}  # not asked


def test_weight_rewind_and_stability_off_leave_the_content_key():
    assert tiny().key == tiny(retrain="weight_rewind", stability=StabilitySpec()).key
    assert tiny(retrain="lr_rewind").key != tiny().key


def _capture_levels(monkeypatch):
    """Wrap the training loop as the level runner calls it (trials/runner/levels.py): each job's
    start weights (after the mask), start iteration and learning rates."""
    calls = []
    real = lottery_module.train_members

    def spy(jobs, data, arithmetic, progress=None):
        for job in jobs:
            state = {k: v.clone() * (job.mask[k] if k in job.mask else 1) for k, v in job.start_weights.items()}
            lrs = [job.schedule(i) for i in range(job.start, job.train.iterations)]
            calls.append({"state": state, "start": job.start, "lrs": lrs, "mask": job.mask})
        return real(jobs, data, arithmetic, progress)

    monkeypatch.setattr(lottery_module, "train_members", spy)
    return calls


@pytest.mark.parametrize("control", ["none", "random_prune"])
def test_retraining_modes_differ_exactly_where_they_should(tmp_path, monkeypatch, control):
    k, T = 20, TINY.iterations
    runs, calls = {}, _capture_levels(monkeypatch)
    for mode in ("weight_rewind", "lr_rewind", "finetune"):
        out = tmp_path / mode
        records = run_lottery(tiny(retrain=mode, rewind_iteration=k, control=control), out)
        runs[mode] = {"records": records, "calls": list(calls), "out": out}
        calls.clear()
    rewind = load_tensors(runs["weight_rewind"]["out"] / "rewind.safetensors")
    base = {m: r["records"][0].to_dict() for m, r in runs.items()}
    assert all({**b, "seconds": 0} == {**base["weight_rewind"], "seconds": 0} for b in base.values())
    masks1 = {m: load_tensors(r["out"] / "level_01" / "mask.safetensors") for m, r in runs.items()}
    assert all(torch.equal(masks1[m][n], masks1["weight_rewind"][n]) for m in masks1 for n in masks1[m])
    for mode, run in runs.items():
        level1 = run["calls"][-1]  # the last training of the trial (a control's own level 1)
        mask = masks1[mode]
        final0 = load_tensors(run["out"] / "level_00" / "final.safetensors")
        expected = rewind if mode == "weight_rewind" else final0
        assert all(torch.equal(level1["state"][n], expected[n] * (mask[n] if n in mask else 1)) for n in expected)
        assert level1["start"] == k and run["records"][1].iterations == T - k
        if mode == "finetune":
            assert level1["lrs"] == [learning_rate(TINY, T - 1)] * (T - k)  # the final rate throughout
        else:
            assert level1["lrs"] == [learning_rate(TINY, i) for i in range(k, T)]  # the schedule from k
    assert len({r["records"][1].test_acc_at_early_stop for r in runs.values()}
               | {r["records"][1].val_loss for r in runs.values()}) > 1


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("data, key", [
    ({"control": "reinit", "retrain": "lr_rewind"}, "control"),
    ({"control": "reinit", "retrain": "finetune"}, "control"),
    ({"method": "edge_popup", "retrain": "finetune"}, "retrain"),
    ({"method": "edge_popup", "stability": {"copies": 2}}, "stability.copies"),
    ({"stability": {"copies": 1}}, "stability.copies"),
    ({"stability": {"copies": 2, "points": 1}}, "stability.points"),
    ({"stability": {"copies": 2, "levels": [3]}}, "stability.levels"),
    ({"stability": {"copies": 2, "levels": [0, 0]}}, "stability.levels"),
    ({"stability": {"levels": [0]}}, "stability.levels"),
    ({"stability": {"copies": 2, "bn_batches": 0}}, "stability.bn_batches"),
    ({"retrain": "rewind"}, "retrain"),
])
def test_bad_modes_and_stability_are_refused_by_key(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict({**digits_base(levels=2), **data})
    assert e.value.key == key and "allowed" in str(e.value)


def test_an_instability_objective_needs_trials_that_measure_it(tmp_path):
    sweep = {"name": "s", "experiment": "e", "base": digits_base(), "search": {"metric": "instability"}}
    with pytest.raises(ConfigError, match="stability.copies"):
        parse_sweep(sweep, tmp_path)
    sweep["base"] = {**digits_base(), "stability": {"copies": 2, "levels": [1]}}
    assert parse_sweep(sweep, tmp_path).search.mode == ("min",)
    with pytest.raises(ConfigError, match="at level 0"):
        parse_sweep({**sweep, "search": {"metric": "dense_instability"}}, tmp_path)


def test_objectives_take_the_sparsest_measured_level():
    def rec(level, barrier):
        return LevelRecord(level=level, density=0.5 ** level, layer_density={}, remaining_params=1, test_acc=0.9,
                           early_stop_iteration=1, test_acc_at_early_stop=0.9, val_loss=0.1, val_acc=0.9,
                           val_loss_at_early_stop=0.1, train_loss=0.1, start_iteration=0, iterations=1,
                           seconds=1.0, stability_error_barrier=barrier)
    s = summarise([rec(0, 0.03), rec(1, 0.01), rec(2, None)], 0.01)
    assert list(s) == list(OBJECTIVES) and s["instability"] == 0.01 and s["dense_instability"] == 0.03
    s = summarise([rec(0, None), rec(1, None)], 0.01)
    assert s["instability"] is None and s["dense_instability"] is None


# ---------------------------------------------------------------- record, plots, tables


def test_old_records_read_and_optional_fields_round_trip():
    old = {"level": 0, "density": 1.0, "layer_density": {"fc": 1.0}, "remaining_params": 9, "test_acc": 0.9,
           "early_stop_iteration": 10, "test_acc_at_early_stop": 0.9, "val_loss": 0.2, "val_acc": 0.9,
           "val_loss_at_early_stop": 0.2, "train_loss": 0.1, "start_iteration": 0, "iterations": 10, "seconds": 1.0}
    record = LevelRecord.from_dict(old)
    assert record.stability_error_barrier is None and record.to_dict() == old
    measured = record.replace(stability_error_barrier=0.01, stability_loss_barrier=0.1, stability_acc_a=0.9,
                              stability_acc_b=0.8)
    assert LevelRecord.from_dict(json.loads(measured.json_line())) == measured
    row = record.flat()
    assert set(row) == set(FIELDS) and row["stability_acc_a"] is None
    assert LevelRecord.from_flat({**row, "stability_acc_a": math.nan}) == record  # a table's empty cell
    assert LevelRecord.from_flat({k: v for k, v in row.items() if k not in OPTIONAL}) == record


def frame():
    rows = []
    for k in (0, 10, 100):
        for seed in (0, 1):
            for level, density in ((0, 1.0), (1, 0.5)):
                rows.append({"run_id": f"{k}-{seed}", "model.name": "conv2", "seed": seed, "prune.kind": "unstructured",
                             "prune.rate": 0.5, "control": "none", "rewind_iteration": k, "level": level,
                             "density": density, "test_acc_at_early_stop": 0.9 + 0.01 * seed,
                             "stability_error_barrier": 0.1 / (1 + k) + 0.01 * level if level == 0 or k else None,
                             "stability_loss_barrier": 0.5 / (1 + k)})
    return pd.DataFrame(rows)


def test_instability_plot_and_table_column(tmp_path):
    out = analysis.instability_curves(frame(), ["prune.kind", "rewind_iteration", "control"], tmp_path / "i.png")
    assert out.stat().st_size > 10_000
    table = analysis.ablation(frame()[frame()["rewind_iteration"] == 10], ["prune.kind"])
    cell = table.cell(("unstructured",), "L0")
    assert cell["instability"] == pytest.approx(0.1 / 11)
    assert "inst. 0.91%" in analysis.to_markdown(table) and "instability" in analysis.to_csv(table)
    plain = analysis.ablation(frame().drop(columns=["stability_error_barrier"]), ["prune.kind", "rewind_iteration"])
    assert "inst." not in analysis.to_markdown(plain) and "instability" not in analysis.to_csv(plain)
    with pytest.raises(ConfigError, match="--kind"):
        analysis.instability_curves(frame().assign(stability_error_barrier=None), [], tmp_path / "j.png")


# ---------------------------------------------------------------- lth stability find


def _config(tmp_path, **changes):
    import yaml

    data = {**digits_base(levels=1, iterations=40), **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_find_bisects_the_grid_and_prints_each_step(tmp_path, capsys, monkeypatch):
    """The bisection, on a fake instability 0.15 / (1 + k) (real trials: the next test)."""
    ran = []

    def fake(spec, out, data=None, **_):
        ran.append(spec.rewind_iteration)
        assert spec.prune.levels == 1 and spec.stability.levels == (1,) and spec.stability.copies == 2
        return [None, LevelRecord(level=1, density=0.7, layer_density={}, remaining_params=1, test_acc=0.9,
                                  early_stop_iteration=1, test_acc_at_early_stop=0.9, val_loss=0.1, val_acc=0.9,
                                  val_loss_at_early_stop=0.1, train_loss=0.1, start_iteration=0, iterations=1,
                                  seconds=0.0, stability_error_barrier=0.15 / (1 + spec.rewind_iteration),
                                  stability_loss_barrier=0.0, stability_acc_a=0.9, stability_acc_b=0.9)]

    monkeypatch.setattr(lottery_module, "run_lottery", fake)
    monkeypatch.setenv("COLUMNS", "80")
    code = main(["stability", "find", _config(tmp_path), "--level", "1", "--out", str(tmp_path / ("o" * 60))])
    said = capsys.readouterr()
    lines = said.out.splitlines()
    assert code == 0 and ran == [0, 32, 4, 8]  # grid 0,1,2,4,...,32 (T = 40): the ends, then halves
    assert [("unstable" in line) for line in lines[:-1]] == [True, False, True, False]
    assert lines[-1] == "earliest stable rewind iteration: k=8 (instability 1.67% < 2.00%; k=4: 3.00%)"
    assert lines[0] == "k=0      instability  15.00%  unstable density 70%, copies' acc 0.9000/0.9000"
    assert all(len(line) <= 80 for line in (said.out + said.err).splitlines()), said  # wrapped at COLUMNS
    monkeypatch.setattr(lottery_module, "run_lottery", lambda spec, out, **kw: fake(spec.replace(
        rewind_iteration=0), out, **kw))  # never stable
    assert main(["stability", "find", _config(tmp_path), "--level", "1", "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("no stable k in the grid: instability at k=32")


def test_find_runs_real_trials(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["stability", "find", _config(tmp_path), "--grid", "0,10", "--threshold", "0.5",
                 "--set", "stability.points=3", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "k=0 " in text and "earliest stable rewind iteration: k=0" in text
    record = read_lines((out / "k_0" / "levels.jsonl").read_text())[0]
    assert record.stability_error_barrier is not None and not (out / "k_10").exists()


@pytest.mark.parametrize("argv, key", [
    (["--grid", "5,2"], "--grid"), (["--grid", "0,40"], "--grid"), (["--grid", "a"], "--grid"),
    (["--threshold", "2"], "--threshold"), (["--level", "-1"], "--level"), (["--level", "x"], "--level"),
    (["--set", "stability.points=1"], "stability.points"), (["--level", "99"], "prune.levels"),
    (["--set", "method=edge_popup"], "method"),
])
def test_find_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, capsys, argv, key):
    out = tmp_path / "o"
    assert main(["stability", "find", _config(tmp_path), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lth: error: {key}:") and not out.exists()
