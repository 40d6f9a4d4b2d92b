"""The known networks as lists of ops (`describe`), and effective density: the kept
weights that lie on some input-to-output path of a masked network, over all prunable
weights (ARCHITECTURE.md, "Effective density"). The level records (`effective_density`,
through masks.describe) and compaction (trials/export/compact/: its description, and its
report's effective density) both take them from here.

`describe` reads only the modules' shapes and settings, so a shell network on the meta
device will do; the count reads only the mask.
Units are a Linear's features and a convolution's channels (a channel counts as one unit
at every position; a flattened channel is one unit for the Linear that reads it):

- forward: every input unit is reachable; a layer's output unit is reachable when a kept
  weight reads a reachable input unit. Pooling, flatten, ReLU and BatchNorm keep a
  unit's reachability (a norm's bias makes an unreachable unit a constant, not a path).
  A residual block's output unit is reachable when its body's or its shortcut's is; an
  identity shortcut passes every reachable unit through, so a unit reachable before the
  block is reachable after it whatever the body keeps.
- backward: every logit reaches the output; an input unit of a layer reaches it when a
  kept weight carries it to an output unit that does. A residual block's input unit
  reaches the output when it does through the body or through the shortcut (through an
  identity shortcut: when the block's output unit does).
- a kept weight counts when its input unit is reachable and its output unit reaches
  the output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

class Unsupported(ValueError):
    """A network with no description (its family declares none, or it has a layer that the
    description cannot take)."""


def supported() -> tuple[str, ...]:
    """The registered models that have a description (trials/nets/models.py Family.ops)."""
    from trials.nets import models

    return models.compactable()


# ---------------------------------------------------------------- describing the known networks


def describe(net: nn.Module) -> list:
    """The network as ops, each conv/linear/bn op naming its module in `net` ("module"): by
    its family's describer (trials/nets/models.py Family)."""
    from trials.nets import models

    family = models.family_of(net)
    if family is None or family.ops is None:
        why = f"{family.name}: {family.no_ops}" if family else f"{type(net).__name__} is of no registered model family"
        raise Unsupported(f"no description of {type(net).__name__} ({why}); described: {', '.join(supported())}")
    return family.describer()(net)


def lenet_ops(net) -> list:
    return [_flatten(), *[x for i in range(len(net.hidden)) for x in (_linear(net, f"hidden.{i}"), _relu())],
            _linear(net, "fc")]


def convnet_ops(net) -> list:
    return [*_sequence(net, "features"), _flatten(),
            *[x for i in range(len(net.hidden)) for x in (_linear(net, f"hidden.{i}"), _relu())],
            _linear(net, "fc")]


def vgg_ops(net) -> list:
    return [*_sequence(net, "features"), {"op": "avgpool"}, _flatten(), _linear(net, "fc")]


def cifar_resnet_ops(net) -> list:
    blocks = [_block(net, f"blocks.{i}", "shortcut") for i in range(len(net.blocks))]
    return [_conv(net, "conv"), _bn(net, "bn"), _relu(), *blocks, {"op": "avgpool"}, _flatten(), _linear(net, "fc")]


def torchvision_resnet_ops(net) -> list:
    from torchvision.models.resnet import BasicBlock

    if not all(isinstance(b, BasicBlock) for s in (net.layer1, net.layer2, net.layer3, net.layer4) for b in s):
        raise Unsupported("a torchvision ResNet with Bottleneck blocks (ResNet-18 and -34 have BasicBlocks)")
    blocks = [_block(net, f"layer{s}.{i}", "downsample") for s in range(1, 5)
              for i in range(len(getattr(net, f"layer{s}")))]
    return [_conv(net, "conv1"), _bn(net, "bn1"), _relu(), _maxpool(net.maxpool), *blocks, {"op": "avgpool"},
            _flatten(), _linear(net, "fc")]


def _flatten():
    return {"op": "flatten"}


def _relu():
    return {"op": "relu"}


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _conv(net, name):
    m = net.get_submodule(name)
    if m.groups != 1 or _pair(m.dilation) != [1, 1] or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise Unsupported(f"{name}: grouped, dilated, 'same' or non-zero-padded convolution")
    return {"op": "conv", "module": name, "in": m.in_channels, "out": m.out_channels, "kernel": _pair(m.kernel_size),
            "stride": _pair(m.stride), "padding": _pair(m.padding), "bias": m.bias is not None}


def _linear(net, name):
    m = net.get_submodule(name)
    return {"op": "linear", "module": name, "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}


def _bn(net, name):
    m = net.get_submodule(name)
    if not isinstance(m, nn.BatchNorm2d) or not m.track_running_stats:
        raise Unsupported(f"{name}: only BatchNorm2d with running statistics")
    return {"op": "bn", "module": name, "n": m.num_features, "eps": m.eps, "affine": m.affine}


def _maxpool(m):
    if _pair(m.dilation) != [1, 1] or m.ceil_mode:
        raise Unsupported("max-pooling with dilation or ceil_mode")
    return {"op": "maxpool", "kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
            "padding": _pair(m.padding)}


def _sequence(net, prefix):
    ops = []
    for i, m in enumerate(net.get_submodule(prefix)):
        name = f"{prefix}.{i}"
        if isinstance(m, nn.Conv2d):
            ops.append(_conv(net, name))
        elif isinstance(m, nn.BatchNorm2d):
            ops.append(_bn(net, name))
        elif isinstance(m, nn.ReLU):
            ops.append(_relu())
        elif isinstance(m, nn.MaxPool2d):
            ops.append(_maxpool(m))
        else:
            raise Unsupported(f"{name}: {type(m).__name__}")
    return ops


def _block(net, name, shortcut):
    """A basic residual block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""
    sc = getattr(net.get_submodule(name), shortcut)
    sc = [] if sc is None or len(sc) == 0 else [_conv(net, f"{name}.{shortcut}.0"), _bn(net, f"{name}.{shortcut}.1")]
    body = [_conv(net, f"{name}.conv1"), _bn(net, f"{name}.bn1"), _relu(), _conv(net, f"{name}.conv2"),
            _bn(net, f"{name}.bn2")]
    return {"op": "residual", "body": body, "shortcut": sc}


# ---------------------------------------------------------------- input-to-output paths


def layer_ops(ops: list) -> list:
    """The conv/linear ops of a description, residual blocks' included, in network order."""
    out = []
    for op in ops:
        if op["op"] in ("conv", "linear"):
            out.append(op)
        elif op["op"] == "residual":
            out += layer_ops(op["body"]) + layer_ops(op["shortcut"])
    return out


def _columns(keep: torch.Tensor, units: Optional[int]) -> torch.Tensor:
    """A weight mask as [out, input unit, what one input unit contributes] (a Linear after
    flatten reads `in / units` features of each unit; units None: one unit, the input)."""
    if keep.dim() == 4:
        return keep.flatten(2)
    return keep.reshape(keep.shape[0], units or 1, -1)


def _forward(ops: list, mask: dict, reach: Optional[torch.Tensor], seen: dict) -> Optional[torch.Tensor]:
    """Reachability of each unit after `ops` (None: the input, every unit reachable);
    `seen`: layer -> reachability of its input units."""
    for op in ops:
        if op["op"] in ("conv", "linear"):
            cols = _columns(mask[f"{op['module']}.weight"], None if reach is None else reach.numel())
            seen[op["module"]] = torch.ones(cols.shape[1], dtype=torch.bool) if reach is None else reach
            reach = cols[:, seen[op["module"]]].flatten(1).any(1)
        elif op["op"] == "residual":
            body = _forward(op["body"], mask, reach, seen)
            shortcut = _forward(op["shortcut"], mask, reach, seen) if op["shortcut"] else reach
            reach = body | (torch.ones_like(body) if shortcut is None else shortcut)
    return reach


def _backward(ops: list, mask: dict, live: torch.Tensor, seen: dict, reads: dict) -> torch.Tensor:
    """Which units before `ops` reach the output, given `live` after them; `reads`: layer
    -> which of its output units reach the output; `seen` (the forward pass's) sizes a
    flattened input."""
    for op in reversed(ops):
        if op["op"] in ("conv", "linear"):
            reads[op["module"]] = live
            cols = _columns(mask[f"{op['module']}.weight"], seen[op["module"]].numel())
            live = cols[live].any(2).any(0)
        elif op["op"] == "residual":
            body = _backward(op["body"], mask, live, seen, reads)
            live = body | (_backward(op["shortcut"], mask, live, seen, reads) if op["shortcut"] else live)
    return live


def connected(ops: list, mask: dict) -> dict:
    """Per prunable weight ("<layer>.weight"): kept and on some input-to-output path
    (`mask`'s other entries, a structured mask's companions, are not read)."""
    mask = {f"{op['module']}.weight": mask[f"{op['module']}.weight"].detach().to("cpu", torch.bool)
            for op in layer_ops(ops)}
    seen, reads = {}, {}
    logits = _forward(ops, mask, None, seen)
    _backward(ops, mask, torch.ones_like(logits), seen, reads)
    out = {}
    for op in layer_ops(ops):
        name = f"{op['module']}.weight"
        keep = mask[name]
        cols = _columns(keep, seen[op["module"]].numel())
        on = cols & seen[op["module"]].view(1, -1, 1) & reads[op["module"]].view(-1, 1, 1)
        out[name] = on.reshape(keep.shape)
    return out


def count(ops: list, mask: dict) -> tuple[int, int]:
    """(weights on some input-to-output path, all prunable weights)."""
    on = connected(ops, mask)
    return sum(int(v.sum()) for v in on.values()), sum(v.numel() for v in on.values())


def effective_density(ops: Optional[list], mask: dict) -> Optional[float]:
    """Weights on some input-to-output path / all prunable weights (the described layers'
    weights); None where the network has no description (`ops` None)."""
    if ops is None:
        return None
    on, total = count(ops, mask)
    return on / total


def describe_or_none(net) -> Optional[list]:
    """describe(net), or None for a network it has no description for."""
    try:
        return describe(net)
    except Unsupported:
        return None
