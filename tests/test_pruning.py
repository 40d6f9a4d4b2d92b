"""Invariants every pruning strategy must keep, on real model shapes, over several levels."""
import pytest
import torch

from trials.nets import masks, models
from trials.methods import counting, pruning
from trials.nets.datasets import DatasetInfo
from trials.spec import ModelSpec, PruneSpec

NETS = {  # small inputs keep these fast; the layer structure is the real one
    "lenet_300_100": (1, 8, 8),
    "conv2": (3, 8, 8),
    "resnet20": (3, 8, 8),
}


def net_and_layers(name):
    net = models.build(ModelSpec(name=name), DatasetInfo(NETS[name], 10), seed=0)
    return net, masks.Layers.of(net)


def trained_like(net, mask, seed):
    """Weights as training would leave them: new values, pruned entries exactly zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in net.state_dict().items():
        w = torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        out[k] = w * mask[k] if k in mask else w
    return out


def run_levels(name, spec, strategy, levels=3):
    net, layers = net_and_layers(name)
    mask, history = masks.ones(layers), []
    for level in range(1, levels + 1):
        weights = trained_like(net, mask, level)
        new = pruning.prune(spec, weights, mask, layers, strategy=strategy,
                            generator=torch.Generator().manual_seed(level))
        history.append((mask, weights, new))
        mask = new
    return layers, history


def alive(mask, layers, n, units):
    return pruning.alive(mask, layers, n, units)


CASES = [
    ("unstructured", "layerwise"),
    ("unstructured", "global"),
    ("structured", "layerwise"),
]


@pytest.mark.parametrize("strategy", sorted(pruning.STRATEGIES))
@pytest.mark.parametrize("kind,scope", CASES)
@pytest.mark.parametrize("name", sorted(NETS))
def test_exact_counts_and_nesting(name, kind, scope, strategy):
    spec = PruneSpec(kind=kind, scope=scope, rate=0.3)
    layers, history = run_levels(name, spec, strategy)
    units = kind == "structured"
    for old, _, new in history:
        assert masks.is_nested(new, old)
        candidates = [n for n in layers.names if not (units and n == layers.output)]
        before = {n: int(alive(old, layers, n, units).sum()) for n in candidates}
        after = {n: int(alive(new, layers, n, units).sum()) for n in candidates}
        if scope == "layerwise":
            assert after == {n: counting.keep_count(c, 0.3) for n, c in before.items()}
        else:
            assert sum(after.values()) == counting.keep_count(sum(before.values()), 0.3)
            assert all(after[n] >= 1 for n in candidates)


@pytest.mark.parametrize("name", sorted(NETS))
def test_magnitude_keeps_the_largest(name):
    for scope in ("layerwise", "global"):
        spec = PruneSpec(kind="unstructured", scope=scope, rate=0.4)
        layers, history = run_levels(name, spec, "magnitude", levels=2)
        for old, weights, new in history:
            groups = [[n] for n in layers.names] if scope == "layerwise" else [list(layers.names)]
            for group in groups:
                kept = torch.cat([weights[f"{n}.weight"][new[f"{n}.weight"]].abs() for n in group])
                cut = torch.cat([weights[f"{n}.weight"][old[f"{n}.weight"] & ~new[f"{n}.weight"]].abs()
                                 for n in group])
                assert kept.min() >= cut.max()


@pytest.mark.parametrize("strategy", sorted(pruning.STRATEGIES))
@pytest.mark.parametrize("name", sorted(NETS))
def test_structured_removes_whole_units_and_their_companions(name, strategy):
    spec = PruneSpec(kind="structured", scope="layerwise", rate=0.25)
    layers, history = run_levels(name, spec, strategy)
    for _, _, new in history:
        for n in layers.names:
            w = new[f"{n}.weight"].flatten(1)
            assert (w.all(1) | ~w.any(1)).all(), f"{n}: a unit is partly pruned"
            for companion in layers.companions[n] if n != layers.output else ():
                assert torch.equal(new[companion], w.any(1)), companion
        assert new[f"{layers.output}.weight"].all(), "classes must never be removed"
    if name == "resnet20":  # BN after a pruned conv is masked with it
        assert layers.companions["blocks.0.conv1"] == ("blocks.0.bn1.weight", "blocks.0.bn1.bias")


@pytest.mark.parametrize("name", sorted(NETS))
def test_unstructured_leaves_biases_and_norms_untouched(name):
    spec = PruneSpec(kind="unstructured", scope="global", rate=0.5)
    layers, history = run_levels(name, spec, "magnitude")
    weight_names = {f"{n}.weight" for n in layers.names}
    for _, _, new in history:
        assert set(new) == weight_names


def test_output_rate_and_layer_rates():
    spec = PruneSpec(kind="unstructured", scope="global", rate=0.5, output_rate=0.1,
                     layer_rates=(("hidden.1", 0.0),))
    layers, history = run_levels("lenet_300_100", spec, "magnitude")
    for old, _, new in history:
        out = layers.output
        assert int(new[f"{out}.weight"].sum()) == counting.keep_count(int(old[f"{out}.weight"].sum()), 0.1)
        assert new["hidden.1.weight"].all(), "rate 0 means the layer is never pruned"
        assert int(new["hidden.0.weight"].sum()) == counting.keep_count(int(old["hidden.0.weight"].sum()), 0.5)


@pytest.mark.parametrize("kind", ["unstructured", "structured"])
def test_random_control_matches_target_counts(kind):
    units = kind == "structured"
    imp_spec = PruneSpec(kind=kind, scope="layerwise" if units else "global", rate=0.3)
    layers, imp = run_levels("conv2", imp_spec, "magnitude")
    net, _ = net_and_layers("conv2")
    mask = masks.ones(layers)
    for level, (_, _, imp_mask) in enumerate(imp, start=1):
        targets = pruning.counts(imp_mask, layers, units)
        new = pruning.prune(imp_spec, trained_like(net, mask, level), mask, layers, strategy="random",
                            targets=targets, generator=torch.Generator().manual_seed(level))
        assert pruning.counts(new, layers, units) == targets
        assert masks.layer_density(new, layers) == masks.layer_density(imp_mask, layers)
        assert masks.is_nested(new, mask)
        assert not all(torch.equal(new[k], imp_mask[k]) for k in imp_mask), "random equals IMP's mask"
        mask = new


def test_same_weights_same_mask():
    spec = PruneSpec(kind="unstructured", scope="global", rate=0.2)
    a = run_levels("lenet_300_100", spec, "magnitude")[1][-1][2]
    b = run_levels("lenet_300_100", spec, "magnitude")[1][-1][2]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_unknown_scorer_is_a_programming_error_naming_the_known_ones():
    with pytest.raises(KeyError, match="known pruning scorers: magnitude, random"):
        pruning.STRATEGIES.get("snip")


@pytest.mark.parametrize("seed", range(4))
def test_selection_is_the_stable_sorts_first_k(seed):
    """pruning._top (selection) keeps exactly the first k of a stable descending sort: the
    largest scores, ties (many here: rounded values, dead -inf entries) to the lower index."""
    from trials.methods.pruning import _top

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 50, (3000,), generator=g).to(torch.float64)
    scores[torch.rand(3000, generator=g) < 0.3] = float("-inf")
    for k in (0, 1, 7, 500, 2100, 2999, 3000, 3500):
        want = torch.zeros(3000, dtype=torch.bool)
        want[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
        got = _top(scores, k)
        assert got.dtype == torch.bool and got.equal(want), k
