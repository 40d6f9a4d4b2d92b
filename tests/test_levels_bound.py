"""prune.levels is bounded by the last level that still removes something: the bound
validation computes matches what trials.methods.pruning.prune actually does, level by level."""
import pytest
import yaml

from lth.cli import main
from orchestrator.sweep_spec import load_sweep
from tests.conftest import digits_base, quick_spec
from trials.nets import datasets, masks, models
from trials.methods import pruning
from trials.core.errors import ConfigError
from trials.spec import DatasetSpec, ModelSpec, PruneSpec
from trials.spec.validate import useful_levels

UNBOUNDED = 10**6  # levels; far beyond any fixed point on LeNet-300-100

CASES = {
    "layerwise": PruneSpec(rate=0.2, output_rate=0.1),  # the output layer (1000 weights) decides
    "global": PruneSpec(scope="global", rate=0.2),  # one pool of every layer
    "global_own_output": PruneSpec(scope="global", rate=0.2, output_rate=0.5),  # pool + output alone
    "structured": PruneSpec(kind="structured", rate=0.2, output_rate=0.1),  # output_rate ignored
    "frozen_layer": PruneSpec(rate=0.3, layer_rates=(("hidden.0", 0.0),), output_rate=0.0),
    "structured_frozen": PruneSpec(kind="structured", rate=0.5, layer_rates=(("hidden.1", 0.0),)),
}


def lenet_digits():
    """A real LeNet-300-100 for digits with its random init (no training needed) and its Layers."""
    net = models.build(ModelSpec(name="lenet_300_100"), datasets.info(DatasetSpec(name="digits")), seed=0)
    return {k: v.detach() for k, v in net.state_dict().items()}, masks.Layers.of(net)


def bound(prune: PruneSpec) -> int:
    return useful_levels(prune, lenet_digits()[1], up_to=UNBOUNDED)


@pytest.mark.parametrize("case", CASES)
def test_bound_is_the_last_level_prune_changes(case):
    prune, (weights, layers) = CASES[case], lenet_digits()
    n, units = bound(prune), prune.kind == "structured"
    assert n >= 1
    mask, changed = masks.ones(layers), []
    for _ in range(n + 3):  # three levels past the bound: a stalled count stays stalled
        new = pruning.prune(prune, weights, mask, layers)
        changed.append(pruning.counts(new, layers, units) != pruning.counts(mask, layers, units))
        mask = new
    assert changed == [True] * n + [False] * 3, case


def test_trial_spec_accepts_the_bound_and_refuses_one_more():
    prune = CASES["layerwise"]
    n = bound(prune)
    assert quick_spec(prune=PruneSpec(rate=0.2, output_rate=0.1, levels=n)).prune.levels == n
    with pytest.raises(ConfigError) as e:
        quick_spec(prune=PruneSpec(rate=0.2, output_rate=0.1, levels=n + 1))
    assert e.value.key == "prune.levels" and e.value.value == n + 1
    assert f"at most {n};" in str(e.value)


def test_cli_refuses_endless_levels_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "trial"
    code = main(["trial", "run", "--preset", "lenet_digits_quick", "--set", "prune.levels=100000",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("lth: error: prune.levels: 100000"), err
    assert f"at most {bound(PruneSpec(rate=0.2, output_rate=0.1))};" in err  # the preset's prune spec
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where, key", [("base", "base.prune.levels"), ("space", "space.prune.levels")])
def test_sweep_with_too_many_levels_is_refused_before_ray(tmp_path, where, key):
    data = {"name": "s", "experiment": "e", "base": digits_base(levels=100000 if where == "base" else 1),
            "storage": str(tmp_path / "runs")}
    if where == "space":
        data["space"] = {"prune.levels": {"grid": [1, 100000]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_sweep(path, cwd=tmp_path)
    n = bound(PruneSpec(rate=0.3, output_rate=0.1))  # digits_base's prune spec
    assert e.value.key == key and f"at most {n};" in str(e.value), str(e.value)
    assert not (tmp_path / "runs").exists()
