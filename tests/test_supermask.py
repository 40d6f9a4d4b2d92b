"""Edge-popup supermasks (trials/methods/supermask.py) on bundled digits: the weights never change,
densities are exact, the scores learn, the same seed gives the same mask, the random-mask
control, the trial-folder contract and load_ticket, the spec's rules and the old keys."""
import json
import math
import shutil
import statistics

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import analysis
from lth.cli import main
from tests.conftest import quick_spec
from tests.test_spec_and_cli import QUICK, with_, write
from trials.nets import datasets, masks, models, paths
from trials import load_ticket
from trials.core.errors import ConfigError
from trials.runner.levels import run_lottery
from trials.folder.record import EARLY_BIRD, FIELDS, STABILITY
from trials.spec import DatasetSpec, ModelSpec, PruneSpec, SupermaskSpec, TrainSpec, TrialSpec, from_dict
from trials.folder.store import load_tensors
from trials.methods.supermask import Supermask, fixed_network, initial_scores
from trials.core.seeds import rng
from trials.loop.arithmetic import evaluate

LOOP = TrainSpec(batch_size=60, iterations=150, eval_interval=30)  # train's loop; the scores use supermask.*
SIZES = {"hidden.0": 64 * 300, "hidden.1": 300 * 100, "fc": 100 * 10}  # LeNet-300-100 on 8x8 digits
FP32 = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731 - evaluate()'s autocast argument


def ep_spec(**changes) -> TrialSpec:
    return quick_spec(**{"method": "edge_popup", "train": LOOP,
                         "supermask": SupermaskSpec(densities=(0.7, 0.3)), **changes})


def numbers(out):
    rows = [json.loads(line) for line in (out / "levels.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def level_files(out, level):
    d = out / f"level_{level:02d}"
    return load_tensors(d / "mask.safetensors"), load_tensors(d / "final.safetensors")


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    spec, out = ep_spec(), tmp_path_factory.mktemp("edge_popup")
    return spec, out, run_lottery(spec, out)


def test_learned_supermask_is_far_above_chance(trial):
    _, out, records = trial
    assert [r.level for r in records] == [0, 1]
    assert all(r.test_acc_at_early_stop > 0.8 and r.iterations == 150 for r in records)
    ops = masks.Layers.of(models.build(ModelSpec(name="lenet_300_100"), datasets.info(trial[0].dataset), 0)).ops
    for r in records:  # each supermask's weights on an input-to-output path (trials/nets/paths.py)
        assert r.effective_density == paths.effective_density(ops, level_files(out, r.level)[0]) <= r.density


def test_weights_never_change(trial):
    """final = the fixed weights under the mask; the fixed weights are signed constants."""
    spec, out, _ = trial
    rewind = load_tensors(out / "rewind.safetensors")
    for name in (f"{n}.weight" for n in SIZES):
        fan_in = rewind[name][0].numel()
        assert torch.allclose(rewind[name].abs(), torch.full_like(rewind[name], math.sqrt(2 / fan_in)))
    assert all(float(rewind[f"{n}.bias"].abs().sum()) == 0.0 for n in SIZES)
    for level in (0, 1):
        mask, final = level_files(out, level)
        assert set(final) == set(rewind)
        assert all(torch.equal(final[k], rewind[k] * mask[k] if k in mask else rewind[k]) for k in final)


def test_kaiming_normal_weights_are_imps_init_and_scaled_by_one_over_root_k(tmp_path):
    spec = ep_spec(train=TrainSpec(batch_size=60, iterations=20, eval_interval=10),
                   supermask=SupermaskSpec(densities=(0.5,), weight_init="kaiming_normal", scaled=True))
    run_lottery(spec, tmp_path)
    drawn = models.build(ModelSpec(name="lenet_300_100"), datasets.info(spec.dataset), seed=0).state_dict()
    rewind = load_tensors(tmp_path / "rewind.safetensors")
    assert all(torch.equal(rewind[k], drawn[k]) for k in drawn)  # the draw an IMP trial of this seed starts from
    mask, final = level_files(tmp_path, 0)
    assert torch.allclose(final["fc.weight"], drawn["fc.weight"] * mask["fc.weight"] / math.sqrt(0.5))


def test_density_is_exact_per_layer(trial):
    _, out, records = trial
    for r, k in zip(records, (0.7, 0.3)):
        mask, _ = level_files(out, r.level)
        counts = {n: int(mask[f"{n}.weight"].sum()) for n in SIZES}
        assert counts == {n: round(k * size) for n, size in SIZES.items()}
        assert r.layer_density == {n: counts[n] / SIZES[n] for n in SIZES}
        assert r.density == sum(counts.values()) / sum(SIZES.values()) == pytest.approx(k, abs=1e-4)


def supermask_on_digits(k=0.5, scope="layerwise", seed=0):
    spec = ep_spec(seed=seed, supermask=SupermaskSpec(densities=(k,), scope=scope))
    net = fixed_network(spec, datasets.info(spec.dataset), "cpu")
    layers = masks.Layers.of(net)
    scores = initial_scores(layers, "kaiming_uniform", rng(seed, "scores"), "cpu")
    return Supermask(net, layers, k, scope, scores), layers


def test_global_scope_keeps_exactly_k_of_all_weights():
    model, layers = supermask_on_digits(k=0.3, scope="global")
    mask = model.mask()
    assert masks.remaining(mask, layers) == round(0.3 * sum(SIZES.values()))
    assert len({round(d, 3) for d in masks.layer_density(mask, layers).values()}) > 1  # one ranking, not k each


def test_scores_learn_on_a_fixed_batch_and_weights_stay(digits_cpu):
    model, _ = supermask_on_digits()
    before = {k: v.clone() for k, v in model.net.state_dict().items() if not k.endswith("running_mean")}
    x, y = digits_cpu.train_x[:120], digits_cpu.train_y[:120]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.net.parameters())


def test_same_seed_same_mask_other_seed_another(tmp_path, trial):
    spec, out, _ = trial
    run_lottery(spec, tmp_path / "again")
    assert numbers(tmp_path / "again") == numbers(out)
    assert all(torch.equal(a, b) for a, b in zip(level_files(out, 1)[0].values(),
                                                  level_files(tmp_path / "again", 1)[0].values()))
    other = supermask_on_digits(seed=1)[0].mask()
    assert any(not torch.equal(other[k], v) for k, v in supermask_on_digits(seed=0)[0].mask().items())


def test_random_mask_control_is_chance_at_the_same_densities(tmp_path, trial):
    _, out, learned = trial
    records = run_lottery(ep_spec(control="random_prune"), tmp_path)
    assert [r.layer_density for r in records] == [r.layer_density for r in learned]
    assert all(r.iterations == 0 and r.test_acc < 0.3 for r in records)  # 10 classes: chance ~0.1
    assert all(r.test_acc + 0.5 < lr.test_acc for r, lr in zip(records, learned))
    fixed, control_fixed = (load_tensors(d / "rewind.safetensors") for d in (out, tmp_path))
    assert all(torch.equal(fixed[k], control_fixed[k]) for k in fixed)  # the same fixed weights
    assert not torch.equal(level_files(tmp_path, 0)[0]["fc.weight"], level_files(out, 0)[0]["fc.weight"])


def export(out, level, dest):
    """The flat folder `lth tickets export` writes (trials/folder/layout.py)."""
    dest.mkdir()
    shutil.copyfile(out / "spec.json", dest / "spec.json")
    shutil.copyfile(out / "rewind.safetensors", dest / "rewind.safetensors")
    for name in ("mask.safetensors", "final.safetensors", "record.json"):
        shutil.copyfile(out / f"level_{level:02d}" / name, dest / name)
    return dest


def test_files_follow_the_contract_and_the_ticket_gives_the_recorded_accuracy(tmp_path, trial, digits_cpu):
    spec, out, records = trial
    meta = json.loads((out / "spec.json").read_text())
    assert meta["key"] == spec.key and meta["spec"]["method"] == "edge_popup"
    lines = (out / "levels.jsonl").read_text().splitlines()
    assert [set(json.loads(line)) for line in lines] == [set(FIELDS) - set(STABILITY) - set(EARLY_BIRD)] * 2
    for r in records:
        assert (out / f"level_{r.level:02d}" / "DONE").exists()
        ticket = load_ticket(export(out, r.level, tmp_path / f"ticket{r.level}"))
        assert ticket.record == r and not ticket.model.training and "tensor" not in repr(ticket)
        _, acc = evaluate(ticket.model, digits_cpu.test_x, digits_cpu.test_y, FP32)
        assert acc == r.test_acc  # exactly: the masked fixed weights as trained
        assert ticket.evaluate(digits_cpu)[1] == r.test_acc and not ticket.model.training
        with pytest.raises(ValueError, match="edge_popup ticket is not retrained"):
            ticket.train(digits_cpu)


def test_non_affine_batchnorm_and_its_ticket(tmp_path, digits_cpu):
    """ResNet-20: norm layers stay gamma 1, beta 0; their running statistics come with the ticket."""
    spec = ep_spec(model=ModelSpec(name="resnet20"), supermask=SupermaskSpec(densities=(0.5,)),
                   train=TrainSpec(batch_size=60, iterations=20, eval_interval=10))
    record, = run_lottery(spec, tmp_path / "t")
    _, final = level_files(tmp_path / "t", 0)
    assert torch.equal(final["bn.weight"], torch.ones(16)) and torch.equal(final["bn.bias"], torch.zeros(16))
    assert float(final["bn.running_mean"].abs().sum()) > 0
    ticket = load_ticket(export(tmp_path / "t", 0, tmp_path / "ticket"))
    _, acc = evaluate(ticket.model, digits_cpu.test_x, digits_cpu.test_y, FP32)
    assert acc == record.test_acc


def test_a_missing_level_is_redone_alone(tmp_path):
    spec = ep_spec(train=TrainSpec(batch_size=60, iterations=40, eval_interval=20))
    run_lottery(spec, tmp_path)
    before = numbers(tmp_path)
    (tmp_path / "level_00" / "DONE").unlink()
    trained = []
    run_lottery(spec, tmp_path, progress=lambda level, *a: trained.append(level))
    assert set(trained) == {0} and numbers(tmp_path) == before  # levels are independent searches


def test_a_pack_of_searches_matches_each_search_alone(tmp_path, digits_cpu):
    """Edge-popup trials pack (trials/methods/supermask.py StackedSearch): members differ in seed,
    densities (and so in their number of levels), scope, scaled weights, score init,
    rates and schedule, and one is the random_prune control. Each matches the same trial
    alone within the pack tolerance (accuracies within half a point, densities exact,
    masks differing in at most 0.1% of the weights: a top-k is discontinuous in the
    scores), in a normal trial folder of its own; each is reported at its own levels."""
    from trials.runner.levels import run_pack

    specs = [ep_spec(),
             ep_spec(seed=1, supermask=SupermaskSpec(densities=(0.5, 0.1, 0.05), scope="global", scaled=True)),
             ep_spec(seed=2, supermask=SupermaskSpec(densities=(0.3,), score_init="kaiming_normal", lr=0.05,
                                                     schedule="constant")),
             ep_spec(seed=3, control="random_prune")]
    alone = [run_lottery(s, tmp_path / f"alone{i}", data=digits_cpu) for i, s in enumerate(specs)]
    outs = [tmp_path / f"packed{i}" for i in range(len(specs))]
    reported = []
    packed = run_pack(specs, outs, report=lambda r, o: reported.append((o, r.level)), data=digits_cpu)
    assert sorted(reported) == sorted((outs[i], r.level) for i in range(len(specs)) for r in alone[i])
    for i, spec in enumerate(specs):
        assert [r.level for r in packed[i]] == list(range(len(spec.supermask.densities)))
        assert numbers(outs[i]) == [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in packed[i]]
        assert torch.equal(*(load_tensors(o / "rewind.safetensors")["fc.weight"] for o in (outs[i], tmp_path / f"alone{i}")))
        for p, a in zip(packed[i], alone[i]):
            assert (p.density, p.layer_density, p.remaining_params, p.iterations) == \
                   (a.density, a.layer_density, a.remaining_params, a.iterations)
            for f in ("test_acc", "test_acc_at_early_stop", "val_acc"):
                assert abs(getattr(p, f) - getattr(a, f)) <= 0.005, (i, p.level, f)
            got, want = level_files(outs[i], p.level)[0], level_files(tmp_path / f"alone{i}", p.level)[0]
            assert sum(int((got[k] != want[k]).sum()) for k in want) <= 1e-3 * sum(SIZES.values())
    assert all(r.iterations == 0 for r in packed[3])  # the control trains nothing, in a pack as alone


def test_a_pack_of_resnet_searches_keeps_each_members_norm_statistics(tmp_path, digits_cpu):
    """BatchNorm models pack too: each member's running statistics are its own (as alone)."""
    from trials.runner.levels import run_pack

    t = TrainSpec(batch_size=60, iterations=10, eval_interval=5)
    specs = [ep_spec(model=ModelSpec(name="resnet20", width=0.5), train=t, seed=s, supermask=SupermaskSpec(densities=(0.5,)))
             for s in (0, 1)]
    alone = [run_lottery(s, tmp_path / f"alone{i}", data=digits_cpu)[0] for i, s in enumerate(specs)]
    packed = run_pack(specs, [tmp_path / f"packed{i}" for i in (0, 1)], data=digits_cpu)
    for i in (0, 1):
        assert abs(packed[i][0].test_acc - alone[i].test_acc) <= 0.005
        got, want = (level_files(tmp_path / f"{kind}{i}", 0)[1]["bn.running_mean"] for kind in ("packed", "alone"))
        assert got.shape == (8,)
        assert float((got - want).norm() / want.norm()) <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("control", ["none", "random_prune"])
def test_cuda_trial(tmp_path, control):
    records = run_lottery(ep_spec(device="cuda", control=control), tmp_path)
    assert (records[0].test_acc > 0.8) == (control == "none")
    mask, final = level_files(tmp_path, 1)
    assert all(float((final[k] * ~m).abs().sum()) == 0.0 for k, m in mask.items())


# ---------------------------------------------------------------- the spec

EDGE = {**QUICK, "method": "edge_popup"}
BAD = [
    (with_(EDGE, "supermask.densities", [0.3, 0.7]), "supermask.densities"),
    (with_(EDGE, "supermask.densities", []), "supermask.densities"),
    (with_(EDGE, "supermask.densities", [1.0]), "supermask.densities"),
    (with_(EDGE, "supermask.lr", 0), "supermask.lr"),
    (with_(EDGE, "supermask.momentum", 1.0), "supermask.momentum"),
    (with_(EDGE, "supermask.weight_init", "xavier"), "supermask.weight_init"),
    ({**EDGE, "control": "reinit"}, "control"),
    (with_({**EDGE, "control": "random_prune"}, "supermask.scope", "global"), "control"),
    ({**QUICK, "method": "lottery"}, "method"),
    ({**QUICK, "model": {"name": "lenet_300_100", "width": 0}}, "model.width"),
    ({**QUICK, "model": {"name": "resnet18", "width": 2.0}}, "model.width"),
]


@pytest.mark.parametrize("data,key", BAD, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD)])
def test_bad_values_are_refused_in_one_line(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert e.value.key == key and "\n" not in str(e.value)


def test_cli_refuses_reinit_for_edge_popup(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["trial", "run", str(write(tmp_path, {**EDGE, "control": "reinit"})), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lth: error: control: 'reinit' is not allowed; allowed with method=edge_popup: none, "
                          "random_prune") and len(err.splitlines()) == 1 and not out.exists()


def test_old_keys_stay_and_defaults_reproduce_today():
    assert TrialSpec().key == "44136fa355b3" and from_dict(QUICK).key == "d489b672fb47"
    explicit = {**QUICK, "method": "imp", "supermask": {"densities": [0.5], "scope": "layerwise"},
                "model": {"name": "lenet_300_100", "width": 1.0}}
    assert from_dict(explicit).key == "d489b672fb47"
    assert from_dict(EDGE).key != from_dict(QUICK).key
    assert ep_spec().last_level == 1 and quick_spec().last_level == 2


def test_prune_levels_bound_is_imp_only():
    assert ep_spec(prune=PruneSpec(levels=10**6)).method == "edge_popup"  # prune.* is ignored there
    with pytest.raises(ConfigError, match="prune.levels"):
        quick_spec(prune=PruneSpec(levels=10**6))


@pytest.mark.parametrize("name,width,hidden", [
    ("lenet_300_100", 1.0, (300, 100)), ("lenet_300_100", 0.5, (150, 50)), ("conv2", 0.5, (128, 128))])
def test_width_multiplier(name, width, hidden):
    info = datasets.info(DatasetSpec(name="digits"))
    net = models.build(ModelSpec(name=name, width=width), info, seed=0)
    assert tuple(layer.out_features for layer in net.hidden) == hidden
    if width == 1.0:  # the same draw as before the field existed
        plain = models.MODELS[name]((1, 8, 8), 10)
        assert [p.shape for p in plain.parameters()] == [p.shape for p in net.parameters()]


# ---------------------------------------------------------------- tables and plots


def mixed_runs() -> pd.DataFrame:
    """IMP (levels at 100/80/64%) and edge-popup (70/50%) trials over two seeds, as analysis.runs gives."""
    rows = []
    for seed in (0, 1):
        for level, (density, acc) in enumerate([(1.0, 0.95), (0.8, 0.95), (0.64, 0.94)]):
            rows.append({"method": "imp", "level": level, "density": density,
                         "test_acc_at_early_stop": acc + seed / 100})
        for level, (density, acc) in enumerate([(0.7, 0.94), (0.5, 0.90)]):
            rows.append({"method": "edge_popup", "level": level, "density": density,
                         "test_acc_at_early_stop": acc + seed / 100})
        for row in rows[-5:]:
            row.update({"seed": seed, "control": "none", "model.name": "conv2", "train.lr": 0.1,
                        "prune.rate": 0.2, "early_stop_iteration": 100})
    return pd.DataFrame(rows)


def test_tables_keep_methods_apart_and_match_supermasks_against_imp_dense():
    df = mixed_runs()
    with pytest.raises(ConfigError, match="--density"):
        analysis.ablation(df, ["control"])  # levels are different densities per method
    table = analysis.ablation(df, ["control"], densities=[1.0, 0.7, 0.5])
    assert table.rows == ["method", "control"] and table.dense["n"] == 2  # IMP's level 0, once per seed
    cell = table.cell(("edge_popup", "none"), "0.7")
    assert cell["density"] == pytest.approx(0.7) and cell["mean"] == pytest.approx(0.945)
    s, s_dense = statistics.stdev([0.94, 0.95]), statistics.stdev([0.95, 0.96])
    assert bool(cell["matches"]) == (0.945 >= 0.955 - math.sqrt((s ** 2 + s_dense ** 2) / 2))
    assert table.cell(("edge_popup", "none"), "1") is None
    assert "| edge_popup | none |" in analysis.to_markdown(table)


def test_plot_draws_methods_apart(tmp_path, monkeypatch):
    """Only the method varies (every control is none): each method is a line of its own
    colour, labelled by the field that varies (analysis/plots.py: colour is the first row field
    that varies)."""
    from matplotlib.figure import Figure

    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k)))
    assert analysis.imp_curves(mixed_runs(), ["control"], tmp_path / "p.png").stat().st_size > 5000
    lines = {line.get_label(): line for line in drawn[0].axes[0].get_lines()}
    assert set(lines) == {"edge_popup", "imp"}
    assert lines["edge_popup"].get_color() != lines["imp"].get_color()
