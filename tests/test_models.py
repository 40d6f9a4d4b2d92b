"""Model registry: every model builds and runs on the shapes it accepts, init is a pure
function of the seed, incompatible inputs are refused, and the paper models have the
paper's sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trials.nets import masks, models, structure
from trials.nets.datasets import DatasetInfo
from trials.spec import ModelSpec

CIFAR, MNIST, DIGITS, MNIST1D = (3, 32, 32), (1, 28, 28), (1, 8, 8), (40,)

COMPATIBLE = {
    "lenet_300_100": [MNIST, MNIST1D, DIGITS, CIFAR],
    "conv2": [CIFAR, MNIST, DIGITS],
    "conv4": [CIFAR, MNIST, DIGITS],
    "conv6": [CIFAR, MNIST, DIGITS],
    "resnet20": [CIFAR, MNIST, DIGITS],
    "vgg11": [CIFAR, MNIST],
    "vgg16": [CIFAR, MNIST],
    "vgg19": [CIFAR, MNIST],
    "resnet18": [CIFAR, (1, 32, 32)],
}
CASES = [(name, shape) for name, shapes in COMPATIBLE.items() for shape in shapes]


def build(name: str, shape, seed: int | None = 0, num_classes: int = 10, **spec) -> nn.Module:
    return models.build(ModelSpec(name=name, **spec), DatasetInfo(shape, num_classes), seed=seed)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def prunable_weights(net: nn.Module) -> int:
    return sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def test_every_registered_model_is_covered():
    assert set(COMPATIBLE) == set(models.MODELS)


@pytest.mark.parametrize("name, shape", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_builds_and_runs(name, shape):
    net = build(name, shape)
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    classifier = dict(net.named_modules())[masks.output_layer(net)]
    assert isinstance(classifier, nn.Linear) and classifier.out_features == 10
    assert masks.output_layer(net) == masks.prunable_layers(net)[-1]  # and it comes last


@pytest.mark.parametrize("name, shape", [("lenet_300_100", DIGITS), ("conv2", DIGITS), ("resnet20", DIGITS),
                                         ("vgg11", (3, 16, 16))])
def test_output_layer_has_the_dataset_class_count(name, shape):
    net = build(name, shape, num_classes=7)
    assert dict(net.named_modules())[masks.output_layer(net)].out_features == 7
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("name, shape", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_validation_build_on_meta_allocates_nothing(name, shape):
    net = models.shell(name, shape, 10)
    assert all(p.is_meta for p in net.parameters())
    assert dict(net.named_modules())[masks.output_layer(net)].out_features == 10


@pytest.mark.parametrize("name, shape", [("lenet_300_100", MNIST), ("conv2", DIGITS), ("resnet20", CIFAR),
                                         ("vgg11", (3, 16, 16))])
def test_init_is_a_function_of_the_seed_only(name, shape):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a, b, c = build(name, shape, seed=0), build(name, shape, seed=0), build(name, shape, seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is not consumed

    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    weights = [k for k in sa if k.endswith("weight") and sa[k].dim() > 1]
    assert weights and all(not torch.equal(sa[k], sc[k]) for k in weights)

    torch.manual_seed(999)  # a different global state does not change the init
    d = build(name, shape, seed=0).state_dict()
    assert all(torch.equal(sa[k], d[k]) for k in sa)


def test_init_zero_biases_unit_batchnorm_and_init_choice():
    net = build("vgg11", (3, 16, 16))
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert not m.bias.any()
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    kaiming = build("lenet_300_100", MNIST).hidden[0].weight.detach()
    xavier = build("lenet_300_100", MNIST, init="xavier_normal").hidden[0].weight.detach()
    # kaiming_normal (fan_in 784): std sqrt(2/784) = 0.0505; xavier_normal: sqrt(2/1084) = 0.0430
    assert abs(float(kaiming.std()) - (2 / 784) ** 0.5) < 0.002
    assert abs(float(xavier.std()) - (2 / (784 + 300)) ** 0.5) < 0.002


@pytest.mark.parametrize("name, shape", [
    ("conv2", MNIST1D), ("resnet20", MNIST1D), ("vgg16", MNIST1D), ("resnet18", MNIST1D),
    ("vgg16", DIGITS), ("vgg11", (3, 15, 15)), ("conv6", (1, 4, 4)), ("conv2", (1, 1, 1)),
    ("resnet18", MNIST), ("resnet18", DIGITS),
])
def test_incompatible_input_is_refused(name, shape):
    with pytest.raises(models.IncompatibleInput, match=name):
        build(name, shape)
    with pytest.raises(models.IncompatibleInput):  # validation (meta build) refuses it as well
        models.shell(name, shape, 10)


# ---------------------------------------------------------------- pruning structure


def test_lenet_companions_are_the_biases():
    layers = masks.Layers.of(build("lenet_300_100", MNIST))
    assert layers.names == ("hidden.0", "hidden.1", "fc")
    assert layers.output == "fc"
    assert layers.companions == {n: (f"{n}.bias",) for n in layers.names}
    assert layers.shapes == {"hidden.0.weight": (300, 784), "hidden.1.weight": (100, 300), "fc.weight": (10, 100)}


def _check_companions_index_output_units(net: nn.Module, layers: masks.Layers) -> None:
    params = dict(net.named_parameters())
    modules = dict(net.named_modules())
    for name in layers.names:
        units = modules[name].weight.shape[0]
        for comp in layers.companions[name]:
            assert params[comp].shape == (units,), (name, comp)


def test_vgg16_conv_companions_include_batchnorm():
    net = build("vgg16", CIFAR)
    layers = masks.Layers.of(net)
    modules = dict(net.named_modules())
    assert layers.companions["features.0"] == ("features.0.bias", "features.1.weight", "features.1.bias")
    assert layers.companions["features.3"] == ("features.3.bias", "features.4.weight", "features.4.bias")
    convs = [n for n in layers.names if isinstance(modules[n], nn.Conv2d)]
    assert len(convs) == 13
    for conv in convs:
        norm = conv.rsplit(".", 1)[0] + "." + str(int(conv.rsplit(".", 1)[1]) + 1)
        assert isinstance(modules[norm], nn.BatchNorm2d)
        assert layers.companions[conv] == (f"{conv}.bias", f"{norm}.weight", f"{norm}.bias")
    assert layers.companions["fc"] == ("fc.bias",) and layers.output == "fc"
    _check_companions_index_output_units(net, layers)


def test_resnet20_conv_companions_are_their_batchnorms():
    net = build("resnet20", CIFAR)
    layers = masks.Layers.of(net)
    assert layers.companions["conv"] == ("bn.weight", "bn.bias")
    assert layers.companions["blocks.0.conv1"] == ("blocks.0.bn1.weight", "blocks.0.bn1.bias")
    assert layers.companions["blocks.8.conv2"] == ("blocks.8.bn2.weight", "blocks.8.bn2.bias")
    assert layers.companions["blocks.3.shortcut.0"] == ("blocks.3.shortcut.1.weight", "blocks.3.shortcut.1.bias")
    modules = dict(net.named_modules())
    convs = [n for n in layers.names if isinstance(modules[n], nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2  # stem, 9 blocks x 2, two downsampling shortcuts
    assert all(len(layers.companions[c]) == 2 for c in convs)  # bias-free convs: BN only
    assert layers.companions["fc"] == ("fc.bias",) and layers.output == "fc"
    _check_companions_index_output_units(net, layers)


# ---------------------------------------------------------------- paper sizes


def test_lenet_300_100_size():
    # Frankle & Carbin table 1: 266K; 784*300+300 + 300*100+100 + 100*10+10
    assert n_params(build("lenet_300_100", MNIST)) == 266_610


def test_resnet20_matches_open_lth_cifar_resnet_20():
    net = build("resnet20", CIFAR)
    # open_lth's cifar_resnet_20: 3 segments x 3 blocks, widths 16/32/64, 1x1 conv + BN
    # shortcuts on downsampling: 272,474 parameters (0.27M)
    assert n_params(net) == 272_474
    blocks = list(net.blocks)
    assert len(blocks) == 9
    assert [b.conv1.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert [len(b.shortcut) for b in blocks] == [0, 0, 0, 2, 0, 0, 2, 0, 0]
    assert [b.conv1.stride for b in blocks] == [(1, 1)] * 3 + [(2, 2), (1, 1), (1, 1)] * 2
    assert blocks[3].shortcut[0].kernel_size == (1, 1) and isinstance(blocks[3].shortcut[1], nn.BatchNorm2d)


def test_conv_nets_on_cifar_match_frankle_and_carbin():
    # Frankle & Carbin table 1 (weights): Conv-2 4.3M, Conv-4 2.4M
    conv2, conv4 = build("conv2", CIFAR), build("conv4", CIFAR)
    assert round(prunable_weights(conv2) / 1e6, 1) == 4.3
    assert prunable_weights(conv2) == 3 * 64 * 9 + 64 * 64 * 9 + 16 * 16 * 64 * 256 + 256 * 256 + 256 * 10
    assert n_params(conv2) == 4_301_642
    assert round(prunable_weights(conv4) / 1e6, 1) == 2.4


def test_vgg16_matches_open_lth_cifar_vgg_16():
    net = build("vgg16", CIFAR)
    assert n_params(net) == 14_728_266  # open_lth cifar_vgg_16 (conv bias + BN, one 512->10 FC)
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 13


# ---------------------------------------------------------------- model families


class Plain(nn.Module):
    """A network of a family of its own (test_a_family_without_ops_or_packs...)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.a, self.b = nn.Linear(n_in, 16), nn.Linear(16, n_out)

    def forward(self, x):
        return self.b(self.a(x.flatten(1)).relu())


def test_every_model_declares_its_family_and_each_net_is_of_it():
    assert set(models.FAMILIES) == set(models.MODELS)
    for name in models.MODELS:
        net = models.shell(name, CIFAR if name != "lenet_300_100" else MNIST, 10)
        assert models.family_of(net) is models.FAMILIES[name], name


def test_a_family_without_ops_or_packs_trains_and_is_refused_with_its_reason(tmp_path):
    """A family declares what effective density, compaction and packs need (trials/nets/models.py
    Family); one that has none of it still trains, and each refusal names its reason."""
    import math

    from tests.conftest import quick_spec
    from trials.nets import datasets, paths
    from trials.spec import packing
    from trials.runner.levels import run_lottery
    from trials.spec import PruneSpec

    family = models.Family("Plain", f"{__name__}:Plain", None, no_ops="a test family with no ops",
                           no_packs="a test family declared unpackable")
    models.model("plain_test", family)(lambda shape, num_classes: Plain(math.prod(shape), num_classes))
    try:
        spec = quick_spec(model=ModelSpec(name="plain_test"), prune=PruneSpec(levels=1))
        net = models.build(spec.model, datasets.info(spec.dataset), seed=0)
        assert models.family_of(net) is family and masks.Layers.of(net).ops is None  # no effective density
        with pytest.raises(paths.Unsupported, match="a test family with no ops"):
            paths.describe(net)
        error = packing.why_not_packed(spec)
        assert error.key == "model.name" and "a test family declared unpackable" in str(error)
        assert "plain_test" not in models.compactable()
        records = run_lottery(spec, tmp_path / "t")
        assert [r.level for r in records] == [0, 1] and records[1].effective_density is None
    finally:
        del models.MODELS["plain_test"], models.FAMILIES["plain_test"]


# ---------------------------------------------------------------- the torch-free description


SHAPES = sorted({*(s for shapes in COMPATIBLE.values() for s in shapes), (1, 28, 28), (3, 16, 16), (1, 4, 4),
                 (3, 15, 15), (1, 1, 1), (2, 33, 20), (7,)})


@pytest.mark.parametrize("name", sorted(structure.DESCRIBED))
def test_the_torch_free_description_is_the_built_network(name):
    """trials/nets/structure.py describes each built-in model as masks.Layers reads it off the
    network built on the meta device (what validation did before), on every shape and width:
    the same layers, weight shapes, classifier and companions, or the same refusal."""
    assert set(structure.DESCRIBED) == set(models.MODELS)  # a new built-in model gets a description
    widths = (1.0,) if name in structure.WIDTHLESS else (1.0, 0.5, 2.0, 0.01, 0.37)
    assert models.has_width(name) == (name not in structure.WIDTHLESS)
    seen = 0
    for shape in SHAPES:
        for width in widths:
            for num_classes in (10, 3):
                described = structure.describe(name, shape, num_classes, width)
                try:
                    layers = masks.Layers.of(models.shell(name, shape, num_classes, width))
                except models.IncompatibleInput as e:
                    assert described == (str(e), None)
                    continue
                error, got = described
                assert error is None and (got.names, got.output, got.shapes, got.companions) == (
                    layers.names, layers.output, layers.shapes, layers.companions), (shape, width)
                seen += 1
    assert seen >= 2 * len(widths)  # it was compared on networks, not only on refusals


def test_every_described_model_packs_on_every_dataset_it_takes():
    """The planner packs the built-in models without building them (trials/spec/packing.py
    no_packs): that holds only while each of them packs, as its family and its network say."""
    for name in structure.DESCRIBED:
        for info in structure.INFOS.values():
            try:
                net = models.shell(name, info.shape, info.num_classes)
            except models.IncompatibleInput:
                continue
            assert models.FAMILIES[name].no_packs is None and models.why_not_packable(net) is None, name


def test_infos_are_the_datasets_and_a_huge_width_is_left_to_torch():
    from trials.nets import datasets

    assert {n: s.info for n, s in datasets.DATASETS.items()} == structure.INFOS
    assert structure.describe("lenet_300_100", MNIST, 10, 1e9) is None  # past MOST_WEIGHTS
    assert structure.describe("lenet_300_100", MNIST, 10, float("inf")) is None
    assert structure.describe("not_built_in", MNIST, 10, 1.0) is None


def test_validating_a_built_in_spec_imports_no_torch():
    """A sweep's driver validates every trial and trains none: torch stays out of it."""
    import subprocess
    import sys

    from orchestrator.config import preset_names

    code = ("import sys; from orchestrator.config import expand, preset_names; from trials.spec.trial_spec import "
            "from_dict; specs = [from_dict(expand({'preset': p, 'prune': {'layer_rates': {'fc': 0.1}}})) "
            "for p in preset_names()]; print(len(specs), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(preset_names())), "False"]
