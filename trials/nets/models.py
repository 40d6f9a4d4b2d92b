"""Model registry. Every entry takes the dataset's input shape and class count, and
declares its family (`Family`): what effective density, compaction and packs need to know
of its networks, in one place (ARCHITECTURE.md, "Models"). A new model is its builder,
registered with `model(name, family)`; a family with no description of its ops, or whose
networks do not pack, says why, and that reason is what a refusal names.

Architectures follow the papers our users reproduce: LeNet-300-100 and Conv-2/4/6
(Frankle & Carbin 2019), ResNet-20 and VGG-11/16/19 for CIFAR (open_lth's versions),
and torchvision's ResNet-18. The classifier is always the last ``nn.Linear`` in module
order: pruning treats it as the output layer. A builder that takes `width` scales its
hidden units and channels (model.width; 1.0 builds exactly the paper's network).
"""
from __future__ import annotations

import importlib
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.core.registry import Registry
from trials.nets.structure import CONV_HIDDEN, CONV_PLANS, LENET_HIDDEN, RESNET20_WIDTH, VGG_PLANS
from trials.nets.structure import IncompatibleInput  # noqa: F401 - raised by the builders (via image), caught as models.IncompatibleInput
from trials.nets.structure import image as _image
from trials.nets.structure import scale as _scale

MODELS: Registry = Registry("model", "model.name")


@dataclass(frozen=True)
class Family:
    """What the engine needs to know of a model family besides its builders.

    `net`: "module:Class" of the networks its builders return. `ops`: "module:function"
    that gives such a network as ops (trials/nets/paths.py: effective density in the level
    records, and compaction), or None: then `no_ops` says why, and compaction is refused
    with it. `no_packs`: why its networks cannot train in a pack, or None: each built network is
    then checked module by module (why_not_packable)."""

    name: str
    net: str
    ops: Optional[str]
    no_ops: str = ""
    no_packs: Optional[str] = None

    def builds(self, net) -> bool:
        """Whether `net` is one of this family's networks (never imports the family's module:
        a network of a module not imported yet is not one of them)."""
        module, _, cls = self.net.partition(":")
        return module in sys.modules and isinstance(net, getattr(sys.modules[module], cls))

    def describer(self):
        module, _, fn = self.ops.partition(":")
        return getattr(importlib.import_module(module), fn)


FAMILIES: Registry = Registry("model", "model.name")  # model name -> its Family

# The layer types a pack stacks (trials/loop/stacked.py PACKED): a network whose every parameter
# and buffer sits in one of them can train in a pack. Here, not in the loop, so that the
# planner decides packs without importing the training loop (trials/spec/packing.py).
PACKABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def why_not_packable(net: nn.Module) -> Optional[str]:
    """None if every parameter and buffer of `net` sits in a module of a PACKABLE type
    (nn.Linear, nn.Conv2d with numeric zero padding, nn.BatchNorm1d/2d with a momentum)."""
    for name, module in net.named_modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if type(module) not in PACKABLE and own:
            what = "parameters" if any(True for _ in module.parameters(recurse=False)) else "buffers (running state)"
            return f"its {what} in {name} ({type(module).__name__}) have no packed layer"
        if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
            return f"{name} pads with {module.padding_mode!r} {module.padding!r}: packed convolutions need numbers"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
            return (f"{name} averages its running statistics cumulatively (momentum=None): by a count each "
                    "member keeps for itself, which the packed BatchNorm does not do")
    return None


def model(name: str, family: Family):
    """Register a builder under `name`, of `family`."""
    def add(builder):
        FAMILIES.register(name)(family)
        return MODELS.register(name)(builder)
    return add


def family_of(net) -> Optional[Family]:
    """The family whose networks `net` is one of, or None (a network built elsewhere)."""
    return next((f for f in dict.fromkeys(FAMILIES.values()) if f.builds(net)), None)


def compactable() -> tuple[str, ...]:
    """The registered models whose family describes its networks as ops."""
    return tuple(n for n, f in FAMILIES.items() if f.ops)


def build(spec, info, seed: int, device="cpu") -> nn.Module:
    """Build on CPU under `seed` (same init on every device), then move to `device`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _construct(spec.name, tuple(info.shape), info.num_classes, spec.width)
        _initialise(net, spec.init)
    return net.to(device)


def shell(name: str, shape: tuple, num_classes: int, width: float = 1.0) -> nn.Module:
    """The architecture on the meta device, uninitialised: nothing is allocated (validation)."""
    with torch.device("meta"):
        return _construct(name, tuple(shape), num_classes, width)


def has_width(name: str) -> bool:
    return "width" in inspect.signature(MODELS.get(name)).parameters


def _construct(name: str, shape: tuple, num_classes: int, width: float) -> nn.Module:
    builder = MODELS.get(name)
    return builder(shape, num_classes) if width == 1.0 else builder(shape, num_classes, width=width)


def _initialise(net: nn.Module, init: str) -> None:
    weight_init = {
        "kaiming_normal": nn.init.kaiming_normal_,
        "kaiming_uniform": nn.init.kaiming_uniform_,
        "xavier_normal": nn.init.xavier_normal_,
    }[init]
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            weight_init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- fully connected


class LeNet(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        sizes = (in_features, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.fc = nn.Linear(sizes[-1], num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.fc(x)


LENET = Family("LeNet", "trials.nets.models:LeNet", "trials.nets.paths:lenet_ops")


@model("lenet_300_100", LENET)
def lenet_300_100(shape, num_classes, width: float = 1.0):
    return LeNet(math.prod(shape), tuple(_scale(h, width) for h in LENET_HIDDEN), num_classes)


# ---------------------------------------------------------------- Conv-2/4/6


class ConvNet(nn.Module):
    """Frankle & Carbin's Conv-N: 3x3 conv pairs with max-pooling, then FC 256-256-classes."""

    def __init__(self, shape, plan, num_classes: int, hidden: int = 256):
        super().__init__()
        layers, channels, side = [], shape[0], shape[1:]
        for width in plan:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                side = tuple(s // 2 for s in side)
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.hidden = nn.ModuleList([nn.Linear(channels * math.prod(side), hidden), nn.Linear(hidden, hidden)])
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.features(x).flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.fc(x)


CONV = Family("Conv-N", "trials.nets.models:ConvNet", "trials.nets.paths:convnet_ops")


def _register_conv(name: str, plan: tuple):
    pools = plan.count("M")

    @model(name, CONV)
    def conv(shape, num_classes, width: float = 1.0):
        widths = tuple(w if w == "M" else _scale(w, width) for w in plan)
        return ConvNet(_image(shape, name, 2**pools), widths, num_classes, _scale(CONV_HIDDEN, width))


for _name, _plan in CONV_PLANS.items():
    _register_conv(_name, _plan)


# ---------------------------------------------------------------- CIFAR ResNet-20


class Block(nn.Module):
    def __init__(self, f_in: int, f_out: int, downsample: bool):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        self.shortcut = nn.Sequential()
        if downsample or f_in != f_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(f_in, f_out, 1, stride=stride, bias=False), nn.BatchNorm2d(f_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """open_lth's cifar_resnet_D: 3 segments of (D-2)/6 blocks, widths 16/32/64."""

    def __init__(self, shape, depth: int, num_classes: int, width: int = 16):
        super().__init__()
        blocks_per_segment = (depth - 2) // 6
        self.conv = nn.Conv2d(shape[0], width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, f_in = [], width
        for segment, f_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks_per_segment):
                blocks.append(Block(f_in, f_out, downsample=segment > 0 and i == 0))
                f_in = f_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(f_in, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


CIFAR_RESNET = Family("CIFAR ResNet", "trials.nets.models:CifarResNet", "trials.nets.paths:cifar_resnet_ops")


@model("resnet20", CIFAR_RESNET)
def resnet20(shape, num_classes, width: float = 1.0):
    return CifarResNet(_image(shape, "resnet20", 4), 20, num_classes, _scale(RESNET20_WIDTH, width))


# ---------------------------------------------------------------- CIFAR VGG

class CifarVGG(nn.Module):
    """open_lth's cifar_vgg: conv-BN-ReLU stacks, 4 max-pools, global average pool, one FC."""

    def __init__(self, shape, plan, num_classes: int):
        super().__init__()
        layers, channels = [], shape[0]
        for width in plan:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


VGG = Family("VGG", "trials.nets.models:CifarVGG", "trials.nets.paths:vgg_ops")


def _register_vgg(name: str):
    @model(name, VGG)
    def vgg(shape, num_classes, width: float = 1.0):
        plan = tuple(w if w == "M" else _scale(w, width) for w in VGG_PLANS[name])
        return CifarVGG(_image(shape, name, 16), plan, num_classes)


for _name in VGG_PLANS:
    _register_vgg(_name)


# ---------------------------------------------------------------- torchvision ResNet-18


TORCHVISION_RESNET = Family("torchvision ResNet", "torchvision.models.resnet:ResNet", "trials.nets.paths:torchvision_resnet_ops")


@model("resnet18", TORCHVISION_RESNET)
def resnet18(shape, num_classes):
    import torchvision

    shape = _image(shape, "resnet18", 32)
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if shape[0] != 3:  # grayscale inputs: the stem takes the dataset's channels
        net.conv1 = nn.Conv2d(shape[0], 64, 7, stride=2, padding=3, bias=False)
    return net
