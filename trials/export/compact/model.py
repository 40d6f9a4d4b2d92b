"""compact_model: a masked network made physically smaller (trials/export/compact/__init__.py),
with its report: parameters, multiply-accumulates per example, units before and after."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from trials.export.compact import units
from trials.export.compact.network import FORMAT, build
from trials.nets import paths


@dataclass
class Compacted:
    model: nn.Module  # the compact network, eval mode
    arch: dict  # its JSON (build(arch) rebuilds it)
    tensors: dict  # its state dict
    report: dict  # counts before and after; compact() adds the logit check


def macs(net: nn.Module, input_shape) -> int:
    """Multiply-accumulates of one example through every Conv2d and Linear (norms, pooling and
    activations left out)."""
    total = [0]

    def conv(m, inp, out):
        total[0] += out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear(m, inp, out):
        total[0] += out[0].numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        p = next(net.parameters())
        with torch.no_grad():
            net(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def _weights(net: nn.Module) -> tuple[int, int]:
    """(nonzero, all) weights of the Conv2d and Linear layers (what density counts)."""
    ws = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int(w.ne(0).sum()) for w in ws), sum(w.numel() for w in ws)


def compact_model(net: nn.Module, input_shape) -> Compacted:
    """The compact network of a masked network (pruned weights exactly zero), for inference:
    BatchNorm is taken in eval mode (its running statistics)."""
    described = paths.describe(net)
    on_path, _ = paths.count(described, {k: v.ne(0) for k, v in net.state_dict().items()
                                         if k in {f"{op['module']}.weight" for op in paths.layer_ops(described)}})
    ops = copy.deepcopy(described)
    graph = units.Graph(net.state_dict(), input_shape[0])
    graph.walk(ops, 0)
    units.decide(graph)
    arch_ops, tensors = units.clean(units.slice_ops(graph, ops))
    arch = {"format": FORMAT, "input_shape": list(input_shape), "num_classes": graph.layers[-1].weight.shape[0],
            "ops": arch_ops}
    model = build(arch).to(units.real(next(iter(tensors.values()))).dtype)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    nonzero, dense = _weights(net)
    nonzero_after, _ = _weights(model)
    spaces = []
    for r in sorted({graph.find(i) for i in range(1, len(graph.spaces))}, key=lambda r: min(graph.spaces[r].members)):
        s = graph.spaces[r]
        if s.consumers:
            producers = sorted(s.producers, key=lambda p: p.out_space)  # in network order
            spaces.append({"layers": [p.op["module"] for p in producers], "units": s.size, "kept": int(s.keep.sum()),
                           "removed_dead_in": s.removed_in, "removed_dead_out": s.removed_out,
                           "folded": s.folded, "kept_tied": s.kept_tied,
                           "kept_constant": s.kept_constant})
    report = {
        "params": {"before": sum(p.numel() for p in net.parameters()),
                   "after": sum(p.numel() for p in model.parameters())},
        "nonzero_weights": {"before": nonzero, "after": nonzero_after},
        "density": nonzero / dense,
        "effective_density": on_path / dense,  # what the level records count (trials/nets/paths.py)
        "macs_per_example": {"before": macs(net, input_shape), "after": macs(model, input_shape)},
        "units": {"before": sum(s["units"] for s in spaces), "after": sum(s["kept"] for s in spaces)},
        "kept_tied": sum(s["kept_tied"] for s in spaces),
        "kept_constant": sum(s["kept_constant"] for s in spaces),
        "folded": sum(s["folded"] for s in spaces),
        "spaces": spaces,
    }
    report["mac_ratio"] = report["macs_per_example"]["before"] / report["macs_per_example"]["after"]
    return Compacted(model, arch, tensors, report)
