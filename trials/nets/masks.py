"""Masks: parameter name -> bool tensor of the same shape (True = kept).

Prunable layers are every nn.Linear and nn.Conv2d, in module order; their weights are
what density counts. Biases and norm layers are never pruned one weight at a time;
structured pruning masks them only as *companions* of a removed unit (its bias, and
the affine parameters of a norm layer that directly normalises that unit's output).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from trials.nets.structure import Structure

Mask = dict  # str -> torch.BoolTensor


def prunable_layers(net: nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def output_layer(net: nn.Module) -> str:
    """The classifier: the last nn.Linear in module order."""
    return [name for name, m in net.named_modules() if isinstance(m, nn.Linear)][-1]


class Layers(Structure):
    """What pruning needs to know about a network (trials/nets/structure.py), read off it once."""

    @classmethod
    def of(cls, net: nn.Module) -> "Layers":
        from trials.nets import paths

        names = tuple(prunable_layers(net))
        modules = dict(net.named_modules())
        companions = {n: ([f"{n}.bias"] if modules[n].bias is not None else []) for n in names}
        for layer, norm in _norms_after(net).items():
            companions[layer] += [f"{norm}.weight", f"{norm}.bias"]
        shapes = {f"{n}.weight": tuple(modules[n].weight.shape) for n in names}
        ops = paths.describe_or_none(net)
        if ops is not None and {op["module"] for op in paths.layer_ops(ops)} != set(names):
            ops = None  # a description that does not cover exactly the prunable layers
        return cls(names, output_layer(net), shapes, {k: tuple(v) for k, v in companions.items()}, ops)

def _norms_after(net: nn.Module) -> dict:
    """conv/linear module -> the affine norm layer applied directly to its output (via torch.fx).
    A model fx cannot trace gets no norm companions (its removed units keep BN's beta)."""
    try:
        graph = torch.fx.symbolic_trace(net).graph
    except Exception:  # noqa: BLE001 - untraceable models are allowed, see docstring
        return {}
    modules = dict(net.named_modules())
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._NormBase):
            continue
        src = node.args[0] if node.args else None
        if getattr(src, "op", None) == "call_module" and isinstance(modules.get(src.target), (nn.Linear, nn.Conv2d)):
            if modules[node.target].affine:
                found[src.target] = node.target
    return found


def ones(layers: Layers) -> Mask:
    return {name: torch.ones(shape, dtype=torch.bool) for name, shape in layers.shapes.items()}


def layer_density(mask: Mask, layers: Layers) -> dict[str, float]:
    return {n: int(mask[layers.weight(n)].sum()) / mask[layers.weight(n)].numel() for n in layers.names}


def density(mask: Mask, layers: Layers) -> float:
    kept = sum(int(mask[layers.weight(n)].sum()) for n in layers.names)
    return kept / sum(mask[layers.weight(n)].numel() for n in layers.names)


def remaining(mask: Mask, layers: Layers) -> int:
    """Prunable weights kept."""
    return sum(int(mask[layers.weight(n)].sum()) for n in layers.names)


def describe(mask: Mask, layers: Layers) -> dict:
    """The level record's density fields of a mask (effective_density: trials/nets/paths.py)."""
    from trials.nets import paths

    return {"density": density(mask, layers), "layer_density": layer_density(mask, layers),
            "remaining_params": remaining(mask, layers), "effective_density": paths.effective_density(layers.ops, mask)}


def is_nested(inner: Mask, outer: Mask) -> bool:
    return all(not (inner[k] & ~outer.get(k, torch.ones_like(inner[k]))).any() for k in inner)


class Masker:
    """Keeps pruned parameters exactly zero during training.

    Gradients are masked before each optimizer step (so momentum and Adam moments of
    pruned weights stay zero) and the weights after it (so nothing, weight decay or a
    future optimizer included, can revive them). Both are one fused foreach multiply.
    """

    def __init__(self, net: nn.Module, mask: Mask):
        params = dict(net.named_parameters())
        names = [k for k in mask if not bool(mask[k].all())]  # all-ones masks cost nothing
        self.params = [params[k] for k in names]
        self.masks = [mask[k].to(device=params[k].device, dtype=params[k].dtype) for k in names]

    @torch.no_grad()
    def apply(self) -> None:
        if self.params:
            torch._foreach_mul_(self.params, self.masks)

    @torch.no_grad()
    def mask_grads(self) -> None:
        pairs = [(p.grad, m) for p, m in zip(self.params, self.masks) if p.grad is not None]
        if pairs:
            torch._foreach_mul_(*map(list, zip(*pairs)))
