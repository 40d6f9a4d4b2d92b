"""Spaces of units (trials/export/compact/__init__.py): walking a network's ops gives each
layer's input and output space (residual adds tie spaces into one); one forward pass
(dead in, folding constants into readers' biases) and one backward pass (dead out)
decide which units of each space stay (`decide`); `slice_ops` and `clean` cut the
tensors and write the compact ops."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(eq=False)
class Layer:
    op: dict  # its conv/linear op (a copy: widths are rewritten for the compact network)
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    in_space: int
    out_space: int = -1
    bn: Optional[dict] = None  # the BatchNorm op right after it, with its tensors in op["t"]
    relu: bool = False  # a ReLU right after it (or after its norm)
    fold: Optional[torch.Tensor] = None  # constants of removed input units, added to the bias

    @property
    def foldable(self) -> bool:
        """A constant input unit gives this layer a constant output: Linear, unpadded convolution."""
        return self.op["op"] == "linear" or self.op["padding"] == [0, 0]

    def effective_bias(self) -> torch.Tensor:
        b = self.bias if self.bias is not None else torch.zeros(self.weight.shape[0], dtype=self.weight.dtype)
        return b if self.fold is None else b + self.fold

    def constant(self) -> torch.Tensor:
        """Each unit's output when its kept inputs have zero weight: activation(norm(bias))."""
        x = self.effective_bias().view(1, -1, *([1, 1] if self.op["op"] == "conv" else []))
        if self.bn is not None:
            t = self.bn["t"]
            x = F.batch_norm(x, t["running_mean"], t["running_var"], t.get("weight"), t.get("bias"), False, 0.0,
                             self.bn["eps"])
        return (torch.relu(x) if self.relu else x).flatten()


@dataclass(eq=False)
class Space:
    size: int
    members: list = field(default_factory=list)  # ids of the spaces merged into it (residual adds)
    producers: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    keep: Optional[torch.Tensor] = None
    kept_tied: int = 0
    kept_constant: int = 0
    removed_in: int = 0
    removed_out: int = 0
    folded: int = 0  # removed units whose nonzero constant went into the readers' biases


class Graph:
    def __init__(self, state: dict, input_size: int):
        self.state = state
        self.spaces = [Space(input_size, [0])]
        self.parent = [0]
        self.layers = []

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            s = self.parent[s]
        return s

    def space(self, s: int) -> Space:
        return self.spaces[self.find(s)]

    def tensors(self, op: dict, names) -> dict:
        return {n: self.state[f"{op['module']}.{n}"].detach().clone() for n in names
                if f"{op['module']}.{n}" in self.state}

    def walk(self, ops: list, space: int) -> int:
        """Attach tensors to the ops, create a space per conv/linear output, tie residual adds."""
        last = None
        for op in ops:
            kind = op["op"]
            if kind in ("conv", "linear"):
                t = self.tensors(op, ("weight", "bias"))
                layer = Layer(op, real(t["weight"]), t.get("bias"), in_space=space)
                self.space(space).consumers.append(layer)
                self.spaces.append(Space(op["out"], [len(self.spaces)], producers=[layer]))
                self.parent.append(len(self.spaces) - 1)
                space = layer.out_space = len(self.spaces) - 1
                self.layers.append(layer)
                last = layer
            elif kind == "bn":
                op["t"] = self.tensors(op, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))
                op["space"] = last.out_space
                last.bn = op
            elif kind == "relu":
                if last is not None:
                    last.relu = True
            elif kind == "residual":
                body = self.walk(op["body"], space)
                shortcut = self.walk(op["shortcut"], space) if op["shortcut"] else space
                space, last = self._tie(body, shortcut), None
        return space

    def _tie(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            sa, sb = self.spaces[a], self.spaces[b]
            sa.members += sb.members
            sa.producers += sb.producers
            sa.consumers += sb.consumers
        return a


def real(t: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (the exactness check's copy), anything else is computed in float32."""
    return t if t.dtype == torch.float64 else t.float()


def in_index(layer: Layer, keep_in: torch.Tensor) -> torch.Tensor:
    """Indices of the layer's input features that stay (a unit is `repeat` features after flatten)."""
    repeat = layer.weight.shape[1] // keep_in.numel()
    return (keep_in.nonzero().flatten()[:, None] * repeat + torch.arange(repeat)).flatten()


def columns(layer: Layer, unit_count: int) -> torch.Tensor:
    """The layer's weight as [out, input unit, everything a unit contributes]."""
    w = layer.weight
    return w.reshape(w.shape[0], unit_count, -1) if w.dim() == 2 else w.flatten(2)


def decide(graph: Graph) -> None:
    """Forward: dead-in units (and folds); backward: dead-out units. Keeps >= 1 unit per space."""
    roots = sorted({graph.find(i) for i in range(len(graph.spaces))}, key=lambda r: max(graph.spaces[r].members))
    graph.spaces[0].keep = torch.ones(graph.spaces[0].size, dtype=torch.bool)
    for r in roots[1:]:
        s = graph.spaces[r]
        if not s.consumers:  # the logits: classes stay
            s.keep = torch.ones(s.size, dtype=torch.bool)
            continue
        zero, dead = [], []
        constants = None
        for p in s.producers:
            keep_in = graph.space(p.in_space).keep
            w = p.weight[:, in_index(p, keep_in)] if p.weight.dim() == 2 else p.weight[:, keep_in]
            d = ~w.flatten(1).ne(0).any(1)
            c = p.constant()
            dead.append(d)
            zero.append(d & (c == 0))
            constants = c
        if len(s.producers) == 1:
            foldable = all(q.foldable for q in s.consumers)
            removed = dead[0] & ((constants == 0) | foldable)
            s.kept_constant = int((dead[0] & ~removed).sum())
        else:
            removed = torch.stack(zero).all(0)
            s.kept_tied = int((torch.stack(zero).any(0) & ~removed).sum())
        if bool(removed.all()):
            removed[0] = False
        s.keep = ~removed
        s.removed_in = int(removed.sum())
        fold = removed & (constants != 0) if len(s.producers) == 1 else torch.zeros_like(removed)
        s.folded = int(fold.sum())
        if fold.any():
            for q in s.consumers:
                cols = columns(q, s.size)[:, fold].sum(2)
                add = cols @ constants[fold].to(cols.dtype)
                q.fold = add if q.fold is None else q.fold + add
    for r in reversed(roots[1:]):
        s = graph.spaces[r]
        if not s.consumers:
            continue
        read = torch.zeros(s.size, dtype=torch.bool)
        for q in s.consumers:
            rows = graph.space(q.out_space).keep
            read |= columns(q, s.size)[rows].ne(0).any(2).any(0)
        unread = s.keep & ~read
        if bool(unread.sum() == s.keep.sum()):  # keep one
            unread[unread.nonzero()[0]] = False
        s.keep = s.keep & ~unread
        s.removed_out = int(unread.sum())


def slice_ops(graph: Graph, ops: list) -> list:
    """The compact ops (widths rewritten) with their sliced tensors in op["t"]."""
    layers = {id(layer.op): layer for layer in graph.layers}
    out = []
    for original in ops:
        op = dict(original)
        if op["op"] in ("conv", "linear"):
            layer = layers[id(original)]
            keep_in = graph.space(layer.in_space).keep
            keep_out = graph.space(layer.out_space).keep
            w = layer.weight[keep_out]
            w = w[:, in_index(layer, keep_in)] if w.dim() == 2 else w[:, keep_in]
            t = {"weight": w.contiguous()}
            if layer.bias is not None or (layer.fold is not None and bool(layer.fold.ne(0).any())):
                t["bias"] = layer.effective_bias()[keep_out].contiguous()
            op.update({"in": w.shape[1], "out": w.shape[0], "bias": "bias" in t, "t": t})
        elif op["op"] == "bn":
            keep = graph.space(op["space"]).keep
            op["t"] = {k: (v if v.dim() == 0 else v[keep].contiguous()) for k, v in op["t"].items()}
            op["n"] = int(keep.sum())
        elif op["op"] == "residual":
            op["body"], op["shortcut"] = slice_ops(graph, op["body"]), slice_ops(graph, op["shortcut"])
        out.append(op)
    return out


def clean(ops: list) -> tuple[list, dict]:
    """(ops as JSON, tensors by the compact module's state-dict names)."""
    arch, tensors = [], {}

    def visit(ops, prefix, arch_out):
        for i, op in enumerate(ops):
            entry = {k: v for k, v in op.items() if k not in ("t", "space")}
            if op["op"] == "residual":
                entry["body"], entry["shortcut"] = [], []
                visit(op["body"], f"{prefix}{i}.body.", entry["body"])
                visit(op["shortcut"], f"{prefix}{i}.shortcut.", entry["shortcut"])
            for k, v in op.get("t", {}).items():
                tensors[f"{prefix}{i}.{k}"] = v
            arch_out.append(entry)

    visit(ops, "", arch)
    return arch, tensors
