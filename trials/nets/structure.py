"""The built-in networks' prunable layers, from the architectures' plans alone, without torch.

Validating a spec needs each prunable layer's name and weight shape, the classifier's
name and each layer's companions (its bias, and the affine norm right after it). A sweep's
driver validates every trial it plans but trains none, so for the built-in models and
datasets this module gives that description by arithmetic on the same plans the builders
in trials/nets/models.py use, and the driver never imports torch (about a second on 2
cores; ARCHITECTURE.md, "The sweep runner"). A model or dataset registered elsewhere is
described by building it on the meta device, as before (trials/spec/validate.py).
`tests/test_models.py` checks that every description here equals `masks.Layers.of` of
the built network, for every built-in model on every built-in dataset's shape and at
several widths.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class DatasetInfo:
    shape: tuple[int, ...]  # one example, e.g. (1, 28, 28)
    num_classes: int


# the built-in datasets' examples; trials/nets/datasets.py registers its sources with these
INFOS = {
    "digits": DatasetInfo((1, 8, 8), 10),
    "mnist1d": DatasetInfo((40,), 10),
    "synthetic": DatasetInfo((1, 28, 28), 10),
    "mnist": DatasetInfo((1, 28, 28), 10),
    "fashion_mnist": DatasetInfo((1, 28, 28), 10),
    "cifar10": DatasetInfo((3, 32, 32), 10),
}


@dataclass(frozen=True)
class Structure:
    """What pruning needs to know about a network (masks.Layers adds how to read it off one)."""

    names: tuple[str, ...]  # prunable modules, in module order
    output: str  # the classifier's module name
    shapes: dict  # "<layer>.weight" -> weight shape
    companions: dict  # layer -> parameter names indexed by its output units
    # the network as trials/export/compact/ describes it (trials/nets/paths.py counts paths on it);
    # None for a network it has no description for (effective density not measured)
    ops: Optional[list] = field(default=None, compare=False, repr=False)

    def weight(self, layer: str) -> str:
        return f"{layer}.weight"


class IncompatibleInput(ValueError):
    """The model cannot take the dataset's input shape."""


def scale(n: int, width: float) -> int:
    return max(1, round(n * width))


def image(shape, name: str, min_side: int = 1) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise IncompatibleInput(f"{name} needs image inputs (channels, height, width)")
    if min(shape[1:]) < min_side:
        raise IncompatibleInput(f"{name} needs images of at least {min_side}x{min_side}")
    return shape


CONV_PLANS = {  # Frankle & Carbin's Conv-2/4/6: 3x3 convolutions, "M" a 2x2 max-pool
    "conv2": (64, 64, "M"),
    "conv4": (64, 64, "M", 128, 128, "M"),
    "conv6": (64, 64, "M", 128, 128, "M", 256, 256, "M"),
}
VGG_PLANS = {  # open_lth's CIFAR VGGs
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512),
}
LENET_HIDDEN = (300, 100)
CONV_HIDDEN = 256  # Conv-N's two hidden fully connected layers
RESNET20_WIDTH = 16  # its first segment's channels (then 32, 64)
# most weights a description here answers for; past it, building on the meta device decides
# what torch can count (trials/spec/validate.py)
MOST_WEIGHTS = 2**40


class _Net:
    """A network's prunable layers, added in module order."""

    def __init__(self):
        self.shapes, self.companions = {}, {}

    def add(self, name: str, shape: tuple, bias: bool, norm: Optional[str] = None) -> None:
        self.shapes[f"{name}.weight"] = tuple(shape)
        self.companions[name] = ((f"{name}.bias",) if bias else ()) + ((f"{norm}.weight", f"{norm}.bias") if norm else ())

    def done(self, output: str) -> Structure:
        return Structure(tuple(self.companions), output, self.shapes, self.companions)


def _lenet(shape, num_classes, width: float = 1.0) -> Structure:
    net, sizes = _Net(), (math.prod(shape), *(scale(h, width) for h in LENET_HIDDEN))
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        net.add(f"hidden.{i}", (b, a), bias=True)
    net.add("fc", (num_classes, sizes[-1]), bias=True)
    return net.done("fc")


def _conv(name: str):
    plan = CONV_PLANS[name]

    def describe(shape, num_classes, width: float = 1.0) -> Structure:
        channels, side = image(shape, name, 2 ** plan.count("M"))[0], tuple(shape[1:])
        net, i, hidden = _Net(), 0, scale(CONV_HIDDEN, width)
        for w in plan:
            if w == "M":
                side, i = tuple(s // 2 for s in side), i + 1
            else:
                w = scale(w, width)
                net.add(f"features.{i}", (w, channels, 3, 3), bias=True)
                channels, i = w, i + 2  # the convolution, its ReLU
        net.add("hidden.0", (hidden, channels * math.prod(side)), bias=True)
        net.add("hidden.1", (hidden, hidden), bias=True)
        net.add("fc", (num_classes, hidden), bias=True)
        return net.done("fc")

    return describe


def _resnet20(shape, num_classes, width: float = 1.0) -> Structure:
    channels, w = image(shape, "resnet20", 4)[0], scale(RESNET20_WIDTH, width)
    net, b, f_in = _Net(), 0, w
    net.add("conv", (w, channels, 3, 3), bias=False, norm="bn")
    for segment, f_out in enumerate((w, 2 * w, 4 * w)):
        for i in range((20 - 2) // 6):
            block = f"blocks.{b}"
            net.add(f"{block}.conv1", (f_out, f_in, 3, 3), bias=False, norm=f"{block}.bn1")
            net.add(f"{block}.conv2", (f_out, f_out, 3, 3), bias=False, norm=f"{block}.bn2")
            if (segment > 0 and i == 0) or f_in != f_out:
                net.add(f"{block}.shortcut.0", (f_out, f_in, 1, 1), bias=False, norm=f"{block}.shortcut.1")
            f_in, b = f_out, b + 1
    net.add("fc", (num_classes, f_in), bias=True)
    return net.done("fc")


def _vgg(name: str):
    def describe(shape, num_classes, width: float = 1.0) -> Structure:
        channels = image(shape, name, 16)[0]
        net, i = _Net(), 0
        for w in VGG_PLANS[name]:
            if w == "M":
                i += 1
            else:
                w = scale(w, width)
                net.add(f"features.{i}", (w, channels, 3, 3), bias=True, norm=f"features.{i + 1}")
                channels, i = w, i + 3  # the convolution, its BatchNorm, its ReLU
        net.add("fc", (num_classes, channels), bias=True)
        return net.done("fc")

    return describe


def _resnet18(shape, num_classes) -> Structure:
    """torchvision's resnet18: BasicBlocks, two per stage, the stem taking the input's channels."""
    net, f_in = _Net(), 64
    net.add("conv1", (64, image(shape, "resnet18", 32)[0], 7, 7), bias=False, norm="bn1")
    for stage, planes in enumerate((64, 128, 256, 512), 1):
        for b in range(2):
            block = f"layer{stage}.{b}"
            net.add(f"{block}.conv1", (planes, f_in, 3, 3), bias=False, norm=f"{block}.bn1")
            net.add(f"{block}.conv2", (planes, planes, 3, 3), bias=False, norm=f"{block}.bn2")
            if (stage > 1 and b == 0) or f_in != planes:
                net.add(f"{block}.downsample.0", (planes, f_in, 1, 1), bias=False, norm=f"{block}.downsample.1")
            f_in = planes
    net.add("fc", (num_classes, 512), bias=True)
    return net.done("fc")


DESCRIBED: dict[str, Callable] = {  # model name -> (shape, num_classes[, width]) -> Structure
    "lenet_300_100": _lenet, **{n: _conv(n) for n in CONV_PLANS}, "resnet20": _resnet20,
    **{n: _vgg(n) for n in VGG_PLANS}, "resnet18": _resnet18,
}
WIDTHLESS = frozenset({"resnet18"})  # builders that take no width multiplier


def describes(model: str, dataset: str) -> bool:
    """Whether this module answers for this model on this dataset (both built in)."""
    return model in DESCRIBED and dataset in INFOS


@functools.lru_cache(maxsize=256)
def describe(model: str, shape: tuple, num_classes: int, width: float = 1.0):
    """(incompatibility message or None, Structure or None), as validation's meta build gives
    it; None where this module does not answer: a model it does not know, or a network of
    more than MOST_WEIGHTS weights (what torch can build of it decides then). Remembered
    (a sweep validates thousands of specs of a few models): callers must not modify it."""
    if model not in DESCRIBED:
        return None
    try:
        s = DESCRIBED[model](tuple(shape), num_classes) if width == 1.0 else DESCRIBED[model](
            tuple(shape), num_classes, width=width)
    except IncompatibleInput as e:
        return str(e), None
    except (OverflowError, TypeError, ValueError):  # e.g. an infinite width: the meta build names it
        return None
    if sum(math.prod(v) for v in s.shapes.values()) > MOST_WEIGHTS:
        return None
    return None, s
