"""Pruning at initialization (trials/methods/at_init.py): each scorer against a hand computation on a
tiny network, the invariants (IMP's counts per level, controls keep per-layer counts,
pruned weights stay zero, same seed same numbers), bad input, and real trials on the
bundled digits, alone, packed and in a sweep."""
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import yaml

import analysis
from lth.cli import main
from orchestrator import plan
from orchestrator.sweep_spec import load_sweep
from tests.conftest import quick_spec
from trials.methods import at_init, pruning
from trials.nets import masks, paths
from trials import methods
from trials.runner import shared
from trials.runner.levels import run_lottery, run_pack
from trials.spec import AtInitSpec, PruneSpec, TrainSpec, TrialSpec, from_dict, non_default
from trials.folder.store import load_tensors

torch.set_default_dtype(torch.float32)
METHODS = methods.names(mask="scored")


def chain(*sizes, bias=False, relu=True):
    """Linear layers d -> h -> ... -> c, ReLU between (a LeNet without its flatten)."""
    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    net = nn.Sequential(*(layers[:-1] if relu else layers[::2])).double()
    return net, masks.Layers.of(net)


# ---------------------------------------------------------------- scorers by hand


def test_synflow_on_a_chain_of_linear_layers_is_its_closed_form():
    """R = 1ᵀ|W3||W2||W1|1; ∂R/∂|W2|_ij = (1ᵀ|W3|)_i (|W1|1)_j, and ReLU is the identity on
    positive inputs, so score(W2) = |W2| ⊙ (|W3|ᵀ1)(|W1|1)ᵀ."""
    net, layers = chain(5, 4, 3, 2)
    w1, w2, w3 = (net[i].weight.detach().abs() for i in (0, 2, 4))
    keep = {n: torch.ones(math.prod(layers.shapes[layers.weight(n)]), dtype=torch.bool) for n in layers.names}
    scores = at_init.synflow_scores(at_init.synflow_net(net), layers, (5,), keep)
    one = lambda n: torch.ones(n, dtype=torch.float64)  # noqa: E731
    expected = [w1 * torch.outer(w2.T @ w3.T @ one(2), one(5)),
                w2 * torch.outer(w3.T @ one(2), w1 @ one(5)),
                w3 * torch.outer(one(2), w2 @ w1 @ one(5))]
    for n, e in zip(layers.names, expected):
        assert torch.allclose(scores[n], e.flatten(), rtol=1e-12), n
    # the absolute values are in place of the weights: the net's own weights may be negative
    assert (net[0].weight >= 0).all()


def test_synflow_linearises_batchnorm_buffers_too_and_runs_in_eval_mode():
    """With BatchNorm in eval mode, y = γ(x - μ)/√(σ² + ε) + β: after |·| of every parameter
    and buffer, R on a chain Linear -> BN -> Linear is |W2| diag(|γ|/√(|σ²|+ε)) (|W1|1 - |μ|) + ... ."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False)).double()
    with torch.no_grad():
        net[1].running_mean.copy_(-torch.rand(4).double() * 0.1)
        net[1].running_var.copy_(torch.rand(4).double() + 0.5)
        net[1].weight.copy_(-torch.rand(4).double())
        net[1].bias.copy_(-torch.rand(4).double())
    layers = masks.Layers.of(net)
    w1, w2 = net[0].weight.detach().abs(), net[2].weight.detach().abs()
    mu, var = net[1].running_mean.abs(), net[1].running_var.abs()
    gamma, beta = net[1].weight.detach().abs(), net[1].bias.detach().abs()
    keep = {n: torch.ones(math.prod(layers.shapes[layers.weight(n)]), dtype=torch.bool) for n in layers.names}
    lin = at_init.synflow_net(net)
    assert not lin.training and all((b >= 0).all() for b in lin.buffers() if b.is_floating_point())
    scores = at_init.synflow_scores(lin, layers, (3,), keep)
    scale = gamma / torch.sqrt(var + net[1].eps)
    x = torch.ones(3, dtype=torch.float64)
    h = scale * (w1 @ x - mu) + beta
    assert torch.allclose(scores["2"], (w2 * torch.outer(torch.ones(2, dtype=torch.float64), h)).flatten())
    assert torch.allclose(scores["0"], (w1 * torch.outer(scale * (w2.T @ torch.ones(2, dtype=torch.float64)), x)).flatten())


def test_synflow_rounds_end_at_the_exact_count_and_one_round_is_the_top_k():
    net, layers = chain(6, 5, 4)
    alone, pool, count = {}, list(layers.names), 7
    keep, first = at_init.synflow(net, layers, (6,), 3, alone, pool, count)
    assert sum(int(k.sum()) for k in keep.values()) == count
    one_round, _ = at_init.synflow(chain(6, 5, 4)[0], layers, (6,), 1, alone, pool, count)
    total = 6 * 5 + 5 * 4
    chosen = pruning._top(torch.cat([first[n] for n in pool]), count)  # one round = top-k of its scores
    assert torch.equal(torch.cat([one_round[n] for n in pool]), chosen) and total > count


def test_snip_is_the_gradient_times_the_weight():
    """One linear layer, mean cross-entropy: ∂L/∂W = (softmax(Wx) - onehot(y))ᵀ x / N per batch."""
    net, layers = chain(4, 3, relu=False)
    torch.manual_seed(1)
    batches = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))) for _ in range(2)]
    scores = at_init.snip(net, layers, batches)
    w = net[0].weight.detach()
    g = sum((torch.softmax(x @ w.T, 1) - nn.functional.one_hot(y, 3)).T @ x / len(x) for x, y in batches)
    assert torch.allclose(scores["0"], (g * w).abs().flatten(), rtol=1e-10)


def test_grasp_is_theta_times_hessian_gradient_product_at_temperature():
    """One linear layer, logits Wx/T: g = Σ (p - y)xᵀ/(NT); the Hessian of the mean loss
    applied to g is Σ_n [(diag(p_n) - p_n p_nᵀ)(g x_n)] x_nᵀ / (N T²); the score kept
    highest is θ ⊙ Hg (the paper removes the largest -θ ⊙ Hg)."""
    net, layers = chain(4, 3, relu=False)
    torch.manual_seed(2)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    T = 3.0
    scores = at_init.grasp(net, layers, [(x, y)], T)
    w = net[0].weight.detach()
    p = torch.softmax(x @ w.T / T, 1)
    g = (p - nn.functional.one_hot(y, 3)).T @ x / (len(x) * T)
    hg = sum(torch.outer((torch.diag(p[n]) - torch.outer(p[n], p[n])) @ (g @ x[n]), x[n]) for n in range(len(x)))
    hg = hg / (len(x) * T * T)
    assert torch.allclose(scores["0"], (w * hg).flatten(), rtol=1e-8)


def test_magnitude_and_random_scores():
    net, layers = chain(4, 3, 2)
    mag = at_init.magnitude_init(net, layers)
    assert torch.equal(mag["2"], net[2].weight.detach().abs().flatten())
    spec = quick_spec(method="random_init")
    a, b = at_init.random_init(spec, layers), at_init.random_init(spec, layers)
    c = at_init.random_init(quick_spec(method="random_init", seed=1), layers)
    assert all(torch.equal(a[n], b[n]) for n in a) and not torch.equal(a["0"], c["0"])


# ---------------------------------------------------------------- counts and controls


def lenet_layers():
    from trials.nets import datasets, models

    spec = quick_spec()
    return masks.Layers.of(models.build(spec.model, datasets.info(spec.dataset), seed=0))


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_counts_are_imps_per_level(scope):
    layers = lenet_layers()
    spec = quick_spec(method="snip", prune=PruneSpec(rate=0.2, output_rate=0.1, levels=3),
                      at_init=AtInitSpec(scope=scope))
    imp = masks.ones(layers)
    weights = {layers.weight(n): torch.randn(s) for n, s in zip(layers.names, layers.shapes.values())}
    for level in range(1, 4):
        imp = pruning.prune(PruneSpec(rate=0.2, output_rate=0.1, scope=scope), weights, imp, layers)
        alone, pool, count = at_init.counts(spec, layers, level)
        per_layer = pruning.counts(imp, layers, False)
        assert alone["fc"] == per_layer["fc"]  # the output layer keeps output_rate's count either way
        assert sum(alone.values()) + count == sum(per_layer.values())
        if scope == "layerwise":
            assert alone == per_layer and not pool


@pytest.fixture(scope="module")
def snip_level(digits_cpu):
    from trials.nets import models

    spec = quick_spec(method="snip", prune=PruneSpec(rate=0.5, output_rate=0.1, levels=2))
    weights = models.build(spec.model, digits_cpu.info, seed=0).state_dict()
    layers = lenet_layers()
    return spec, weights, layers


def test_shuffle_and_invert_keep_per_layer_counts(snip_level, digits_cpu):
    spec, weights, layers = snip_level
    scores, keep = at_init.scores_and_keep(spec, weights, layers, digits_cpu, 2)
    mask = at_init.level_mask(spec, 2, weights, layers, digits_cpu)
    assert torch.equal(torch.cat([mask[layers.weight(n)].flatten() for n in layers.names]),
                       torch.cat([keep[n] for n in layers.names]))
    shuffled = at_init.level_mask(spec.replace(control="shuffle"), 2, weights, layers, digits_cpu)
    inverted = at_init.level_mask(spec.replace(control="invert"), 2, weights, layers, digits_cpu)
    assert pruning.counts(shuffled, layers, False) == pruning.counts(mask, layers, False)
    assert pruning.counts(inverted, layers, False) == pruning.counts(mask, layers, False)
    for n in layers.names:
        w = layers.weight(n)
        assert not torch.equal(shuffled[w], mask[w])
        kept, dropped = scores[n][inverted[w].flatten()], scores[n][~inverted[w].flatten()]
        assert kept.max() <= dropped.min()  # the lowest scores, at the method's count


def test_imp_controls_shuffle_and_invert(tmp_path):
    spec = quick_spec(prune=PruneSpec(rate=0.5, output_rate=0.1, levels=2),
                      train=TrainSpec(optimizer="adam", lr=1e-3, batch_size=60, iterations=60, eval_interval=20))
    for control in ("shuffle", "invert"):
        run_lottery(spec.replace(control=control), tmp_path / control)
    layers = lenet_layers()
    for level in (1, 2):
        imp = load_tensors(tmp_path / "shuffle" / "imp" / f"level_{level:02d}" / "mask.safetensors")
        for control in ("shuffle", "invert"):
            m = load_tensors(tmp_path / control / f"level_{level:02d}" / "mask.safetensors")
            assert pruning.counts(m, layers, False) == pruning.counts(imp, layers, False)
            assert any(not torch.equal(m[k], imp[k]) for k in imp)
        inv = load_tensors(tmp_path / "invert" / f"level_{level:02d}" / "mask.safetensors")
        final = load_tensors(tmp_path / "invert" / f"level_{level - 1:02d}" / "final.safetensors")
        prev = load_tensors(tmp_path / "invert" / f"level_{level - 1:02d}" / "mask.safetensors")
        for n in layers.names:
            w = layers.weight(n)
            alive = final[w].abs()[prev[w]]
            kept = final[w].abs()[inv[w]]
            assert masks.is_nested(inv, prev) and kept.max() <= alive.sort().values[int(inv[w].sum()) - 1] + 1e-12


# ---------------------------------------------------------------- real trials


def tiny(method, **changes):
    data = {"model": "lenet_300_100", "dataset": "digits", "device": "cpu", "method": method,
            "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 60, "iterations": 60, "eval_interval": 20},
            "prune": {"rate": 0.5, "output_rate": 0.1, "levels": 2}, "at_init": {"rounds": 10} if method == "synflow"
            else {}, **changes}
    return data


@pytest.mark.parametrize("method", METHODS)
def test_lth_trial_run_per_method(tmp_path, method):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump(tiny(method)))
    assert main(["trial", "run", str(cfg), "--out", str(tmp_path / "t")]) == 0
    records = [json.loads(line) for line in (tmp_path / "t" / "levels.jsonl").read_text().splitlines()]
    spec = from_dict(tiny(method))
    layers = lenet_layers()
    for r in records[1:]:
        alone, pool, count = at_init.counts(spec, layers, r["level"])
        assert r["remaining_params"] == sum(alone.values()) + count
        mask = load_tensors(tmp_path / "t" / f"level_{r['level']:02d}" / "mask.safetensors")
        final = load_tensors(tmp_path / "t" / f"level_{r['level']:02d}" / "final.safetensors")
        assert all((final[k][~m] == 0).all() for k, m in mask.items())  # pruned weights stay zero
        assert r["effective_density"] == paths.effective_density(layers.ops, mask) <= r["density"]
        assert r["test_acc"] > 0.3 or method == "random_init"
    assert [r["level"] for r in records] == [0, 1, 2] and records[0]["density"] == 1.0
    assert 0.25 < records[2]["density"] < records[1]["density"] < 0.55  # the output layer keeps more (output_rate)


def test_same_seed_same_numbers_and_reinit_differs(tmp_path):
    spec = from_dict(tiny("synflow"))
    a = run_lottery(spec, tmp_path / "a")
    b = run_lottery(spec, tmp_path / "b")
    assert [r.test_acc for r in a] == [r.test_acc for r in b]
    for lv in (1, 2):
        ma, mb = (load_tensors(p / f"level_{lv:02d}" / "mask.safetensors") for p in (tmp_path / "a", tmp_path / "b"))
        assert all(torch.equal(ma[k], mb[k]) for k in ma)
    r = run_lottery(spec.replace(control="reinit"), tmp_path / "r")
    assert not (tmp_path / "r" / "imp").exists()  # an at-init control needs no IMP run
    ma, mr = (load_tensors(p / "level_01" / "mask.safetensors") for p in (tmp_path / "a", tmp_path / "r"))
    assert all(torch.equal(ma[k], mr[k]) for k in ma) and r[1].test_acc != a[1].test_acc
    # its ticket starts from the fresh init (rewind.safetensors); its method scored the trial's init
    ra, rr, scored = (load_tensors(p) for p in (tmp_path / "a" / "rewind.safetensors",
                                                tmp_path / "r" / "rewind.safetensors", tmp_path / "r" / "scored.safetensors"))
    assert all(torch.equal(ra[k], scored[k]) for k in ra) and not torch.equal(ra["hidden.0.weight"], rr["hidden.0.weight"])


def test_a_pack_agrees_with_alone(tmp_path):
    specs = [from_dict(tiny(m, control=c)) for m, c in (("snip", "none"), ("grasp", "shuffle"), ("imp", "none"),
                                                       ("synflow", "invert"))]
    packed = run_pack(specs, [tmp_path / f"p{i}" for i in range(len(specs))])
    for i, spec in enumerate(specs):
        alone = run_lottery(spec, tmp_path / f"a{i}")
        for p, a in zip(packed[i], alone):
            assert abs(p.test_acc - a.test_acc) <= 0.005 and p.remaining_params == a.remaining_params
        for lv in range(3):
            fp, fa = (load_tensors(tmp_path / f"{x}{i}" / f"level_{lv:02d}" / "final.safetensors") for x in "pa")
            for k in fa:
                assert torch.allclose(fp[k], fa[k], rtol=1e-5, atol=1e-5 * float(fa[k].abs().max())), (spec.method, lv, k)


def test_only_the_dense_run_is_a_shared_unit():
    imp, snip = from_dict(tiny("imp")), from_dict(tiny("snip", control="shuffle"))
    assert shared.dense_name(imp) == shared.dense_name(snip)
    assert [u["name"] for u in shared.plan(snip)] == [shared.dense_name(snip)]
    assert plan.trial_cost(snip) == (60, 2 * 60) and plan.trial_cost(imp) == (60 + 2 * 60, 0)
    units = plan.work_units([imp, snip, from_dict(tiny("synflow"))])
    assert units[shared.dense_name(imp)].users == 3 and len(units) == 3  # dense + IMP's 2 levels
    old = TrialSpec()  # old keys stay valid: the new group's defaults are not in the key
    assert "at_init" not in json.dumps(non_default(old))


# ---------------------------------------------------------------- bad input


BAD = [
    ({"at_init": {"rounds": 5}}, "snip", "at_init.rounds"),
    ({"at_init": {"batches": 2}}, "imp", "at_init.batches"),
    ({"at_init": {"temperature": 1.0}}, "synflow", "at_init.temperature"),
    ({"supermask": {"lr": 0.3}}, "grasp", "supermask.lr"),
    ({"prune": {"scope": "global", "levels": 2}}, "snip", "prune.scope"),
    ({"prune": {"kind": "structured", "levels": 2}}, "magnitude_init", "prune.kind"),
    ({"control": "random_prune"}, "synflow", "control"),
    ({"retrain": "lr_rewind"}, "snip", "retrain"),
    ({"stability": {"copies": 2}}, "grasp", "stability.copies"),
    ({"prune": {"rate": 0.5, "levels": 40}}, "snip", "prune.levels"),
    ({"control": "shuffle"}, "edge_popup", "control"),
    ({"at_init": {"rounds": 0}}, "synflow", "at_init.rounds"),
]


@pytest.mark.parametrize("change,method,key", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, change, method, key):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump({**tiny(method), **change}))
    out = tmp_path / "out"
    assert main(["trial", "run", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"lth: error: {key}: ") and " is not allowed; " in err, err
    assert not out.exists()


# ---------------------------------------------------------------- a sweep, a table, a plot


def test_sweep_of_methods_and_controls_gives_one_table_and_plot(tmp_path, ray_local, monkeypatch):
    base = tiny("imp")
    sweep = {"name": "pai", "experiment": "pai", "base": base, "resources": {"cpu": 1}, "max_concurrent": 2,
             "storage": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
             "space": {"method": {"grid": ["imp", "snip", "synflow"]}, "control": {"grid": ["none", "shuffle", "reinit"]}},
             "seeds": 1, "pack": 3}
    path = tmp_path / "pai.yaml"
    path.write_text(yaml.safe_dump(sweep))
    from orchestrator.sweeps import runner

    runner.run(load_sweep(path))
    df = pd.read_csv(tmp_path / "runs" / "pai" / "trials.csv")
    assert len(df) == 9 * 3 and set(df.status) == {"TERMINATED"}
    dense = df[df.level == 0]
    assert dense.test_acc.nunique() == 1  # one dense run, shared by every method and control
    runs = analysis.runs("pai", f"sqlite:///{tmp_path}/mlflow.db")
    table = analysis.ablation(runs, ["method", "control"])
    assert table.rows == ["method", "control"] and len(table.groups()) == 9 and table.dense["n"] == 1
    text = analysis.to_markdown(table)
    assert "| synflow | shuffle |" in text and "| imp | none |" in text
    out = analysis.imp_curves(runs, ["method", "control"], tmp_path / "p.png")
    assert out.exists()
    # a ticket of each at-init trial exports and gives its recorded accuracy; reinit's starts fresh
    from orchestrator.tracking import experiment_tickets
    from trials.export.ticket_folder import load_ticket

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = experiment_tickets.best("pai", uri, top=100)
    chosen = {}
    for r in rows:
        run = runs[(runs.run_id == r["run_id"]) & (runs.level == r["level"])].iloc[0]
        if r["level"] == 2 and run["method"] != "imp":
            chosen.setdefault((run["method"], run["control"]), r)
    assert len(chosen) == 6
    for (method, control), r in chosen.items():
        folder = experiment_tickets.export(r["run_id"], 2, tmp_path / f"t_{method}_{control}", uri)
        ticket = load_ticket(folder)
        assert ticket.spec.method == method and ticket.evaluate()[1] == ticket.record.test_acc
        rewind = load_ticket(folder, weights="rewind")
        assert ticket.record.density == pytest.approx(masks.density(rewind.mask, masks.Layers.of(rewind.model)))


def test_example_sweep_is_valid():
    sweep = load_sweep(__import__("pathlib").Path(__file__).parent.parent / "sweeps" / "prune_at_init.yaml")
    assert {d.path for d in sweep.space} == {"method", "control"}
