"""Early-bird tickets (trials/methods/early_bird_watch.py): the distance and window by hand, the draws'
counts (IMP's exactly), nested masks of early-bird IMP levels, pruned weights staying zero,
a stop at t equal to the prefix of the full run with the same data order (alone and in a
pack, where the co-members are not disturbed), same seed same numbers, a mask that never
stabilises, the retraining modes, controls, bad input, and a real sweep on Ray."""
import json

import pandas as pd
import pytest
import torch
import torch.nn as nn
import yaml

from lth.cli import main
from orchestrator.sweep_spec import load_sweep
from tests.conftest import quick_spec
from trials.nets import datasets, masks, models
from trials.methods import counting, early_bird_watch as early_bird, pruning
from trials.runner import shared
from trials.runner.levels import run_lottery, run_pack
from trials.spec import DatasetSpec, EarlyBirdSpec, TrialSpec, from_dict, non_default
from trials.loop.stacked import Stacked
from trials.folder.store import load_tensors
from trials.loop.arithmetic import Alone
from trials.loop.training import Job, train_members


def tiny(method="early_bird", **changes):
    data = {"model": "lenet_300_100", "dataset": "digits", "device": "cpu", "method": method,
            "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 60, "iterations": 80, "eval_interval": 20},
            "prune": {"rate": 0.5, "output_rate": 0.1, "levels": 2},
            "early_bird": {"interval": 5, "window": 3, "epsilon": 0.2}}
    if method == "imp":
        data["early_bird"]["imp_levels"] = True
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def level(folder, lv, name):
    return load_tensors(folder / f"level_{lv:02d}" / f"{name}.safetensors")


# ---------------------------------------------------------------- the window by hand


def test_distance_and_window_by_hand():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    assert early_bird.distance(a, a) == 0 and early_bird.distance(a, b) == 0.5
    d = early_bird.Draws(window=3, epsilon=0.3)
    assert not d.add(10, a)  # nothing to compare with
    assert not d.add(20, a)  # distance 0, but the window holds 2 of 3 masks
    assert d.add(30, a)  # full, all 0
    d = early_bird.Draws(window=3, epsilon=0.3)
    for it, m in ((10, b), (20, a), (30, a)):
        stable = d.add(it, m)
    assert not stable and d.trace == [[20, 0.5], [30, 0.5]]  # the newest against both before it: b is still there
    assert d.add(40, a) and d.trace[-1] == [40, 0.0]  # b has left the window


def test_draws_have_imps_counts_and_bn_gamma_ranks_by_gamma():
    spec = from_dict(tiny())
    net = models.build(spec.model, datasets.info(spec.dataset), seed=0, device="cpu")
    layers, w = masks.Layers.of(net), net.state_dict()
    one, two = early_bird.draw(spec, w, masks.ones(layers), layers, 2)
    imp1 = pruning.prune(spec.prune, w, masks.ones(layers), layers)
    imp2 = pruning.prune(spec.prune, w, imp1, layers)
    assert all(torch.equal(one[k], imp1[k]) and torch.equal(two[k], imp2[k]) for k in one)
    # bn_gamma: a ResNet-20's units ranked by |gamma| of the BatchNorm after them
    vgg = from_dict({"model": "resnet20", "dataset": "digits", "device": "cpu", "method": "early_bird",
                     "prune": {"kind": "structured", "rate": 0.5, "levels": 1},
                     "early_bird": {"criterion": "bn_gamma"}})
    net = models.build(vgg.model, datasets.info(vgg.dataset), seed=0, device="cpu")
    layers = masks.Layers.of(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    first = counting.candidates(vgg.prune, layers)[0]
    gamma = next(c for c in layers.companions[first] if c.endswith(".weight"))
    state[gamma] = torch.arange(state[gamma].numel(), dtype=torch.float32)  # unit i: |gamma| = i
    mask, = early_bird.draw(vgg, state, masks.ones(layers), layers, 1)
    kept = pruning.alive(mask, layers, first, True)
    n = kept.numel()
    assert kept[n - counting.keep_count(n, 0.5):].all() and not kept[: n - counting.keep_count(n, 0.5)].any()


# ---------------------------------------------------------------- the stop is a prefix


class StopAt:
    """A watch that stops its member at iteration `at`."""

    def __init__(self, at, every=10):
        self.at, self.every = at, every

    def __call__(self, iteration, state):
        return iteration >= self.at


def test_a_stop_at_t_is_the_prefix_of_the_full_run(digits_cpu):
    spec = quick_spec()
    net = models.build(spec.model, digits_cpu.info, seed=0, device="cpu")
    init, layers = {k: v.clone() for k, v in net.state_dict().items()}, masks.Layers.of(net)
    seen = {}
    full = Job(spec.train, 0, masks.ones(layers), init, 0, {70: lambda s: seen.update(s)})
    stopped = Job(spec.train, 0, masks.ones(layers), init, 0, watch=StopAt(70))
    a, = train_members([full], digits_cpu, Alone(models.build(spec.model, digits_cpu.info, seed=0, device="cpu")))
    b, = train_members([stopped], digits_cpu, Alone(models.build(spec.model, digits_cpu.info, seed=0, device="cpu")))
    assert b["iterations"] == 70 and a["iterations"] == spec.train.iterations
    assert all(torch.equal(b["final"][k], seen[k]) for k in seen)  # bit for bit: the same data order
    # in a pack: the stopped member ends at its prefix, its co-member is not disturbed
    other = Job(spec.train, 1, masks.ones(layers), init, 0)
    seen.clear()
    p = train_members([Job(spec.train, 0, masks.ones(layers), init, 0, {70: lambda s: seen.update(s)}), other],
                      digits_cpu, Stacked(net, 2, torch.device("cpu")))
    q = train_members([Job(spec.train, 0, masks.ones(layers), init, 0, watch=StopAt(70)), other],
                      digits_cpu, Stacked(net, 2, torch.device("cpu")))
    assert q[0]["iterations"] == 70 and q[1]["iterations"] == spec.train.iterations
    assert all(torch.equal(q[0]["final"][k], seen[k]) for k in seen)  # running statistics included
    assert all(torch.equal(q[1]["final"][k], p[1]["final"][k]) for k in p[1]["final"])


# ---------------------------------------------------------------- whole trials


def test_early_bird_trial(tmp_path):
    spec = from_dict(tiny())
    records = run_lottery(spec, tmp_path / "a")
    dense, *tickets = records
    t = {r.level: r.early_bird_iteration for r in tickets}
    assert dense.iterations == max(t.values()) < spec.train.iterations  # stopped once both had stabilised
    assert dense.schedule_iterations == spec.train.iterations and dense.early_bird_stable is True
    assert dense.cost_iterations == dense.iterations
    imp = run_lottery(from_dict(tiny("imp", early_bird={"imp_levels": False, "interval": 100, "window": 5,
                                                         "epsilon": 0.1})), tmp_path / "imp")
    ones = masks.ones(masks.Layers.of(models.build(spec.model, datasets.info(spec.dataset), 0, "cpu")))
    for r in tickets:
        # the mask drawn where its density stabilised, at IMP's counts of that level exactly
        assert r.layer_density == imp[r.level].layer_density and r.remaining_params == imp[r.level].remaining_params
        assert r.early_bird_stable and r.early_bird_distance < 0.2 and r.early_bird_trace[-1] == [t[r.level], r.early_bird_distance]
        assert r.start_iteration == 0 and r.iterations == r.schedule_iterations == spec.train.iterations
        assert r.cost_iterations == t[r.level] + r.iterations
        drawn = load_tensors(tmp_path / "a" / "level_00" / f"draw_{r.level:02d}.safetensors")
        again = early_bird.draw(spec, drawn, ones, masks.Layers.of(models.build(spec.model, datasets.info(spec.dataset), 0, "cpu")), r.level)[-1]
        mask, final = level(tmp_path / "a", r.level, "mask"), level(tmp_path / "a", r.level, "final")
        assert all(torch.equal(mask[k], again[k]) for k in mask)
        assert all((final[k][~m] == 0).all() for k, m in mask.items())  # pruned weights stay zero
        assert r.test_acc > 0.5
    # same seed, same numbers
    again = run_lottery(spec, tmp_path / "b")
    strip = lambda r: {k: v for k, v in r.to_dict().items() if k not in ("seconds", "environment")}
    assert [strip(r) for r in records] == [strip(r) for r in again]


def test_finetune_continues_from_the_early_bird_weights_and_reinit_is_scratch(tmp_path):
    spec = from_dict(tiny(retrain="finetune"))
    records = run_lottery(spec, tmp_path / "f")
    for r in records[1:]:
        assert r.start_iteration == r.early_bird_iteration and r.iterations == spec.train.iterations - r.start_iteration
        assert r.cost_iterations == spec.train.iterations  # t dense iterations, then T - t sparse ones
    ticket = run_lottery(from_dict(tiny()), tmp_path / "t")
    scratch = run_lottery(from_dict(tiny(control="reinit")), tmp_path / "r")
    for lv in (1, 2):
        a, b = level(tmp_path / "t", lv, "mask"), level(tmp_path / "r", lv, "mask")
        assert all(torch.equal(a[k], b[k]) for k in a)  # the same ticket, from a fresh init
        assert scratch[lv].early_bird_iteration == ticket[lv].early_bird_iteration
    fresh, rewound = (load_tensors(tmp_path / x / "rewind.safetensors") for x in "rt")
    assert not torch.equal(fresh["hidden.0.weight"], rewound["hidden.0.weight"])
    assert not torch.equal(level(tmp_path / "r", 1, "final")["hidden.0.weight"], level(tmp_path / "t", 1, "final")["hidden.0.weight"])


def test_a_mask_that_never_stabilises_trains_the_full_run_and_says_so(tmp_path):
    spec = from_dict(tiny(early_bird={"epsilon": 1e-9}))
    dense, *tickets = run_lottery(spec, tmp_path / "a")
    assert dense.iterations == spec.train.iterations and dense.early_bird_stable is False
    for r in tickets:
        assert r.early_bird_iteration == spec.train.iterations and r.early_bird_stable is False
    final = level(tmp_path / "a", 0, "final")
    layers = masks.Layers.of(models.build(spec.model, datasets.info(spec.dataset), 0, "cpu"))
    one, two = early_bird.draw(spec, final, masks.ones(layers), layers, 2)  # IMP's one-shot masks at T
    assert all(torch.equal(level(tmp_path / "a", 2, "mask")[k], two[k]) for k in two)


def test_early_bird_imp_levels(tmp_path):
    spec = from_dict(tiny("imp"))
    records = run_lottery(spec, tmp_path / "e")
    full = run_lottery(from_dict(tiny("imp", early_bird={"imp_levels": False, "interval": 100, "window": 5,
                                                          "epsilon": 0.1})), tmp_path / "i")
    for r, f in zip(records, full):
        assert r.remaining_params == f.remaining_params and r.layer_density == f.layer_density  # IMP's counts
    assert records[-1].iterations == records[-1].schedule_iterations  # the last level trains in full
    cost = 0
    for r in records:
        cost += r.iterations
        assert r.cost_iterations == cost
    assert records[0].iterations < spec.train.iterations and records[0].early_bird_iteration is None
    for lv in (1, 2):
        prev, r = records[lv - 1], records[lv]
        # level L prunes level L-1's weights where it stopped: the mask drawn there
        assert r.early_bird_iteration == prev.start_iteration + prev.iterations
        mask, before = level(tmp_path / "e", lv, "mask"), level(tmp_path / "e", lv - 1, "mask")
        assert masks.is_nested(mask, before)
        layers = masks.Layers.of(models.build(spec.model, datasets.info(spec.dataset), 0, "cpu"))
        drawn, = early_bird.draw(spec, level(tmp_path / "e", lv - 1, "final"), before, layers, 1)
        assert all(torch.equal(mask[k], drawn[k]) for k in mask)
        final = level(tmp_path / "e", lv, "final")
        assert all((final[k][~m] == 0).all() for k, m in mask.items())
    assert sum(r.iterations for r in records) < sum(f.iterations for f in full)


def test_a_pack_of_early_bird_trials_agrees_with_alone(tmp_path):
    specs = [from_dict(tiny()), from_dict(tiny("imp")), from_dict(tiny(control="reinit"))]
    packed = run_pack(specs, [tmp_path / f"p{i}" for i in range(len(specs))])
    for i, spec in enumerate(specs):
        alone = run_lottery(spec, tmp_path / f"a{i}")
        for p, a in zip(packed[i], alone):
            assert p.remaining_params == a.remaining_params
            assert abs(p.test_acc - a.test_acc) <= 0.02, (i, p.level)  # stop points may differ by an interval


def test_units_and_keys():
    old = TrialSpec()
    assert "early_bird" not in json.dumps(non_default(old))  # old keys stay valid
    imp = from_dict(tiny("imp", early_bird={"imp_levels": False, "interval": 100, "window": 5, "epsilon": 0.1}))
    eb_imp = from_dict(tiny("imp"))
    assert not shared.shareable(from_dict(tiny()))  # method=early_bird trains its own prefix
    assert shared.dense_name(eb_imp) != shared.dense_name(imp)  # a stopped dense run is its own unit
    assert shared.dense_name(eb_imp) != shared.dense_name(from_dict(tiny("imp", prune={"rate": 0.3})))
    assert shared.point_name(eb_imp, 0) == shared.point_name(imp, 0)  # a rewind point is the plain prefix
    assert shared.trunk_name(eb_imp) != shared.trunk_name(from_dict(tiny("imp", prune={"levels": 1})))


# ---------------------------------------------------------------- bad input


BAD = [
    ({"early_bird": {"window": 3}}, "snip", "early_bird.window"),
    ({"early_bird": {"interval": 10}}, "imp-plain", "early_bird.interval"),
    ({"early_bird": {"imp_levels": True}}, "early_bird", "early_bird.imp_levels"),
    ({"early_bird": {"window": 1}}, "early_bird", "early_bird.window"),
    ({"early_bird": {"epsilon": 0.0}}, "early_bird", "early_bird.epsilon"),
    ({"early_bird": {"epsilon": 1.0}}, "imp", "early_bird.epsilon"),
    ({"early_bird": {"interval": 81}}, "early_bird", "early_bird.interval"),
    ({"early_bird": {"interval": 60}, "rewind_iteration": 30}, "imp", "early_bird.interval"),
    ({"early_bird": {"criterion": "bn_gamma"}}, "early_bird", "early_bird.criterion"),
    ({"early_bird": {"criterion": "bn_gamma"}, "prune": {"kind": "structured"}}, "early_bird", "early_bird.criterion"),
    ({"retrain": "lr_rewind"}, "early_bird", "retrain"),
    ({"control": "invert"}, "early_bird", "control"),
]


@pytest.mark.parametrize("change,method,key", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, change, method, key):
    data = tiny("imp" if method == "imp-plain" else method, **change)
    if method == "imp-plain":
        data["early_bird"].pop("imp_levels")
        data["early_bird"] = {**change["early_bird"]}
    elif method not in ("imp", "early_bird"):
        data["early_bird"] = change["early_bird"]
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["trial", "run", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"lth: error: {key}: ") and " is not allowed; " in err, err
    assert not out.exists()


# ---------------------------------------------------------------- a sweep on Ray


def test_sweep_of_early_bird_tickets_and_controls(tmp_path, ray_local):
    import analysis

    sweep = {"name": "eb", "experiment": "eb", "base": tiny(), "resources": {"cpu": 1}, "max_concurrent": 2,
             "storage": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
             "space": {"control": {"grid": ["none", "reinit", "shuffle"]}}, "seeds": 1, "pack": 3}
    path = tmp_path / "eb.yaml"
    path.write_text(yaml.safe_dump(sweep))
    from orchestrator.sweeps import runner

    runner.run(load_sweep(path))
    df = pd.read_csv(tmp_path / "runs" / "eb" / "trials.csv")
    assert len(df) == 3 * 3 and set(df.status) == {"TERMINATED"}
    alone = run_lottery(from_dict(tiny()), tmp_path / "alone")
    for control, rows in df.groupby("control"):
        rows = rows.sort_values("level")
        assert list(rows.remaining_params) == [r.remaining_params for r in alone]
        # a control's levels: its ticket's masks, drawn where the ticket's stabilised
        assert list(rows.early_bird_iteration.iloc[1:]) == [r.early_bird_iteration for r in alone[1:]]
        assert rows.iterations.iloc[0] == alone[0].iterations < 80
        assert all(json.loads(t)[-1][0] == i for t, i in zip(rows.early_bird_trace.iloc[1:], rows.early_bird_iteration.iloc[1:]))
    runs = analysis.runs("eb", f"sqlite:///{tmp_path}/mlflow.db")
    assert set(runs.control) == {"none", "reinit", "shuffle"} and "early_bird_iteration" in runs.columns
    # a ticket exports, gives its recorded accuracy, and compacts
    from orchestrator.tracking import experiment_tickets
    from trials.export.ticket_folder import load_ticket

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = runs[(runs.control == "none") & (runs.level == 2)].run_id.iloc[0]
    folder = experiment_tickets.export(run_id, 2, tmp_path / "ticket", uri)
    ticket = load_ticket(folder)
    assert ticket.spec.method == "early_bird" and ticket.evaluate()[1] == ticket.record.test_acc
    assert ticket.record.early_bird_iteration == alone[2].early_bird_iteration
    assert main(["tickets", "compact", str(folder), "--out", str(tmp_path / "c")]) == 0


def test_sweep_shares_early_bird_imp_levels_as_units(tmp_path, ray_local):
    """A ticket and its controls on early-bird IMP levels: the stopped dense run and the trunk
    levels are units, trained once, and every trial's records carry the draws."""
    sweep = {"name": "ebu", "experiment": "ebu", "base": tiny("imp"), "resources": {"cpu": 1}, "max_concurrent": 2,
             "storage": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
             "space": {"control": {"grid": ["none", "reinit"]}}, "seeds": 1}
    path = tmp_path / "ebu.yaml"
    path.write_text(yaml.safe_dump(sweep))
    from orchestrator.sweeps import runner

    runner.run(load_sweep(path))
    df = pd.read_csv(tmp_path / "runs" / "ebu" / "trials.csv")
    assert len(df) == 2 * 3 and set(df.status) == {"TERMINATED"}
    alone = run_lottery(from_dict(tiny("imp")), tmp_path / "alone")
    ticket = df[df.control == "none"].sort_values("level")
    assert list(ticket.iterations) == [r.iterations for r in alone]  # the units are the trial's own levels
    assert list(ticket.early_bird_iteration.iloc[1:]) == [r.early_bird_iteration for r in alone[1:]]
    assert list(ticket.test_acc) == [r.test_acc for r in alone]
    dense = df[df.level == 0]
    assert dense.iterations.nunique() == 1 and dense.iterations.iloc[0] < 80  # one stopped dense run
    assert len(list((tmp_path / "runs" / "_units" / "dense").iterdir())) == 1
