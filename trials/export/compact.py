"""Compaction: a ticket as a physically smaller dense network, for inference.

A masked network computes at dense cost. Units (neurons, channels) whose removal cannot
change the logits are cut out of every layer that produces or reads them, and the rest
is rebuilt as an ordinary dense network:

- **dead in**: a unit whose incoming weights (from the units that stay) are all zero
  outputs a constant, activation(norm(bias)), BatchNorm in eval mode. A constant of 0
  (every unit structured pruning removed: its bias and norm parameters are masked with
  it, trials/nets/masks.py) goes with nothing to add. Another constant goes only where every
  layer reading the unit sees a constant too, and is folded into that layer's bias: a
  Linear (after flatten, max or average pooling) or an unpadded convolution. A padded
  convolution sees the constant inside the image and zeros at its borders, so a unit it
  reads with a nonzero constant stays (counted in the report as `kept_constant`).
- **dead out**: a unit that every layer reading it reads with zero weights goes.
- **residual streams**: channels tied by skip connections (ResNet) form one space with
  several producers. A channel goes only when every producer outputs exactly 0 for it
  (the stream is then 0 wherever it is read) or nobody reads it; otherwise it stays
  everywhere, its removed producers computing zeros (counted as `kept_tied`).

The analysis is explicit per architecture family (trials/nets/models.py Family: its describer
in trials/nets/paths.py, for LeNet, Conv-N, VGG, the CIFAR ResNets, torchvision's ResNet-18)
and generic after that: the
description is a list of ops, spaces of units come from walking it, and one forward pass
(dead in, folding) and one backward pass (dead out) decide what stays. ARCHITECTURE.md,
"Compaction", says why not Torch-Pruning.

The compact network's architecture is plain JSON (`ARCH`: ops with their widths), its
tensors safetensors (`WEIGHTS`): `load_compact` rebuilds it with torch alone, nothing
unpickled. `export` also writes TorchScript and ONNX (checked in ONNX Runtime) and the
report (`REPORT`): parameters, multiply-accumulates per example, effective density
(trials/nets/paths.py) and the worst logit difference against the masked network, before and
after (`check`: the exactness check, in float64).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.core.errors import ConfigError
from trials.nets import paths
from trials.nets.paths import Unsupported, describe, supported  # noqa: F401 - the network as ops (compact.describe)

FORMAT = "lth-compact/1"
WEIGHTS, ARCH, TORCHSCRIPT, ONNX, REPORT = "model.safetensors", "model.json", "model.ts", "model.onnx", "compact.json"
FILES = (WEIGHTS, ARCH, TORCHSCRIPT, ONNX, REPORT)
# the exactness check: the same compaction in float64, its logits against the masked network's
# in float64, max difference / max(1, largest |logit|) (ARCHITECTURE.md, "Compaction")
TOLERANCE = 1e-9
ONNX_TOLERANCE = 1e-4  # ONNX Runtime fuses and reorders (BatchNorm into convolutions)


# ---------------------------------------------------------------- the compact network


class Residual(nn.Module):
    """relu(body(x) + shortcut(x)); an empty shortcut is the identity."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Sequential):
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def _module(op: dict) -> nn.Module:
    kind = op["op"]
    if kind == "conv":
        return nn.Conv2d(op["in"], op["out"], tuple(op["kernel"]), tuple(op["stride"]), tuple(op["padding"]),
                         bias=op["bias"])
    if kind == "linear":
        return nn.Linear(op["in"], op["out"], bias=op["bias"])
    if kind == "bn":
        return nn.BatchNorm2d(op["n"], eps=op["eps"], affine=op["affine"])
    if kind == "relu":
        return nn.ReLU()
    if kind == "maxpool":
        return nn.MaxPool2d(tuple(op["kernel"]), tuple(op["stride"]), tuple(op["padding"]))
    if kind == "avgpool":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "flatten":
        return nn.Flatten(1)
    if kind == "residual":
        return Residual(build_ops(op["body"]), build_ops(op["shortcut"]))
    raise Unsupported(f"op {kind!r}")


def build_ops(ops: list) -> nn.Sequential:
    return nn.Sequential(*(_module(op) for op in ops))


def build(arch: dict) -> nn.Module:
    """The network an architecture JSON describes (uninitialised values; load the weights)."""
    if arch.get("format") != FORMAT:
        raise ValueError(f"format: {arch.get('format')!r} is not allowed; allowed: {FORMAT}")
    return build_ops(arch["ops"])


def load_compact(folder, device="cpu") -> nn.Module:
    """A compact folder's network, in eval mode: torch, its JSON and its safetensors only."""
    from safetensors.torch import load_file

    folder = Path(folder)
    net = build(json.loads((folder / ARCH).read_text()))
    net.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    return net.to(device).eval()


# ---------------------------------------------------------------- spaces of units


@dataclass(eq=False)
class _Layer:
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
class _Space:
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


class _Graph:
    def __init__(self, state: dict, input_size: int):
        self.state = state
        self.spaces = [_Space(input_size, [0])]
        self.parent = [0]
        self.layers = []

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            s = self.parent[s]
        return s

    def space(self, s: int) -> _Space:
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
                layer = _Layer(op, _real(t["weight"]), t.get("bias"), in_space=space)
                self.space(space).consumers.append(layer)
                self.spaces.append(_Space(op["out"], [len(self.spaces)], producers=[layer]))
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


def _real(t: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (the exactness check's copy), anything else is computed in float32."""
    return t if t.dtype == torch.float64 else t.float()


def _in_index(layer: _Layer, keep_in: torch.Tensor) -> torch.Tensor:
    """Indices of the layer's input features that stay (a unit is `repeat` features after flatten)."""
    repeat = layer.weight.shape[1] // keep_in.numel()
    return (keep_in.nonzero().flatten()[:, None] * repeat + torch.arange(repeat)).flatten()


def _columns(layer: _Layer, unit_count: int) -> torch.Tensor:
    """The layer's weight as [out, input unit, everything a unit contributes]."""
    w = layer.weight
    return w.reshape(w.shape[0], unit_count, -1) if w.dim() == 2 else w.flatten(2)


def _decide(graph: _Graph) -> None:
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
            w = p.weight[:, _in_index(p, keep_in)] if p.weight.dim() == 2 else p.weight[:, keep_in]
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
                cols = _columns(q, s.size)[:, fold].sum(2)
                add = cols @ constants[fold].to(cols.dtype)
                q.fold = add if q.fold is None else q.fold + add
    for r in reversed(roots[1:]):
        s = graph.spaces[r]
        if not s.consumers:
            continue
        read = torch.zeros(s.size, dtype=torch.bool)
        for q in s.consumers:
            rows = graph.space(q.out_space).keep
            read |= _columns(q, s.size)[rows].ne(0).any(2).any(0)
        unread = s.keep & ~read
        if bool(unread.sum() == s.keep.sum()):  # keep one
            unread[unread.nonzero()[0]] = False
        s.keep = s.keep & ~unread
        s.removed_out = int(unread.sum())


def _slice(graph: _Graph, ops: list) -> list:
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
            w = w[:, _in_index(layer, keep_in)] if w.dim() == 2 else w[:, keep_in]
            t = {"weight": w.contiguous()}
            if layer.bias is not None or (layer.fold is not None and bool(layer.fold.ne(0).any())):
                t["bias"] = layer.effective_bias()[keep_out].contiguous()
            op.update({"in": w.shape[1], "out": w.shape[0], "bias": "bias" in t, "t": t})
        elif op["op"] == "bn":
            keep = graph.space(op["space"]).keep
            op["t"] = {k: (v if v.dim() == 0 else v[keep].contiguous()) for k, v in op["t"].items()}
            op["n"] = int(keep.sum())
        elif op["op"] == "residual":
            op["body"], op["shortcut"] = _slice(graph, op["body"]), _slice(graph, op["shortcut"])
        out.append(op)
    return out


def _clean(ops: list) -> tuple[list, dict]:
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


# ---------------------------------------------------------------- compaction


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
    described = describe(net)
    on_path, _ = paths.count(described, {k: v.ne(0) for k, v in net.state_dict().items()
                                         if k in {f"{op['module']}.weight" for op in paths.layer_ops(described)}})
    ops = copy.deepcopy(described)
    graph = _Graph(net.state_dict(), input_shape[0])
    graph.walk(ops, 0)
    _decide(graph)
    arch_ops, tensors = _clean(_slice(graph, ops))
    arch = {"format": FORMAT, "input_shape": list(input_shape), "num_classes": graph.layers[-1].weight.shape[0],
            "ops": arch_ops}
    model = build(arch).to(_real(next(iter(tensors.values()))).dtype)
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


def exact(worst: float, largest: float, tolerance: float = TOLERANCE) -> bool:
    """Whether a logit difference is within `tolerance`: absolute for logits up to 1, relative
    to the largest |logit| beyond (rounding grows with the values summed)."""
    return worst <= tolerance * max(1.0, largest)


class NotExact(RuntimeError):
    """The compact network's logits differ from the masked network's beyond the tolerance."""


@torch.no_grad()
def logit_difference(a: nn.Module, b: nn.Module, x: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """(largest absolute difference of the two networks' logits over `x`, largest |logit| of
    `a`), in eval mode."""
    worst = largest = 0.0
    for i in range(0, len(x), batch):
        ya, yb = a(x[i:i + batch]), b(x[i:i + batch])
        worst = max(worst, float((ya - yb).abs().max()))
        largest = max(largest, float(ya.abs().max()))
    return worst, largest


def check(net: nn.Module, c: Compacted, x: torch.Tensor) -> dict:
    """The exactness check (ARCHITECTURE.md, "Compaction"): the masked network copied to
    float64 is compacted again; the compaction must come out the same (architecture JSON)
    and its float64 logits over `x` within TOLERANCE of the masked network's in float64.
    float64 rounding is ~1e-16 relative, so on any CPU or GPU (no TF32 in float64) an exact
    compaction passes by orders of magnitude and a removed unit that mattered fails; the
    float32 artifact computes the same function with the same parameters (copied, or a
    folded bias rounded to float32). The report's fields: `max_logit_diff_fp64`,
    `max_abs_logit` (float64) and `tolerance`; NotExact when the two compactions differ."""
    net64 = copy.deepcopy(net).double().eval()
    c64 = compact_model(net64, tuple(x.shape[1:]))
    if c64.arch != c.arch:
        raise NotExact("the float64 compaction keeps other units than the float32 one; nothing written")
    worst, largest = logit_difference(net64, c64.model.to(x.device), x.double())
    return {"max_logit_diff_fp64": worst, "max_abs_logit": largest, "tolerance": TOLERANCE}


def compact(ticket, data=None) -> Compacted:
    """A loaded ticket (trials.load_ticket) compacted and checked: the report gets the worst
    logit difference against the masked network over the ticket's test set (`data`: its
    datasets.Data, loaded when None): float32's (what the artifact does), and float64's,
    which `check` decides on."""
    from trials.nets import datasets

    net = ticket.model.eval()
    data = data or datasets.load(ticket.spec.dataset, next(net.parameters()).device)
    c = compact_model(net, tuple(data.test_x.shape[1:]))
    worst, _ = logit_difference(net, c.model.to(data.test_x.device), data.test_x)
    c.report.update({
        "model": ticket.spec.model.name, "dataset": ticket.spec.dataset.name, "method": ticket.spec.method,
        "prune_kind": ticket.spec.prune.kind, "level": ticket.record.level, "recorded_density": ticket.record.density,
        "source": ticket.source, "max_logit_diff": worst, **check(net, c, data.test_x),
        "examples": len(data.test_x),
    })
    return c


def compact_folder(ticket_folder, out) -> Compacted:
    """Compact an exported ticket (lth tickets export) into `out` (export's files). Refuses
    (NotExact, nothing written) a result whose logits on the test set differ from the masked
    network's beyond rounding (`check`, `exact`)."""
    from trials.nets import datasets
    from trials.export.ticket_folder import load_ticket

    ticket = load_ticket(ticket_folder)
    data = datasets.load(ticket.spec.dataset, torch.device("cpu"))
    try:
        c = compact(ticket, data)
    except Unsupported as e:
        raise ConfigError("model.name", ticket.spec.model.name, f"allowed: {', '.join(supported())} ({e})") from None
    r = c.report
    if not exact(r["max_logit_diff_fp64"], r["max_abs_logit"]):
        raise NotExact(f"compact logits differ from the masked network's by {r['max_logit_diff_fp64']:.3g} in "
                       f"float64 (largest |logit| {r['max_abs_logit']:.3g}, allowed {TOLERANCE:g} x max(1, that)); "
                       "nothing written")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export(c, tmp, data.test_x[:256])
        os.replace(tmp, out)  # out is new or empty: the folder appears whole
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return c


# ---------------------------------------------------------------- export


def export(c: Compacted, out, example: torch.Tensor) -> Path:
    """Write the compact folder: WEIGHTS + ARCH (load_compact), TORCHSCRIPT, ONNX (run in ONNX
    Runtime on `example` against the torch network; the difference goes in the report) and
    REPORT. Each file is written under a temporary name and renamed."""
    from trials.folder.store import save_tensors, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = c.model.cpu().eval()
    example = example.cpu()
    save_tensors(out / WEIGHTS, model.state_dict())
    write_json(out / ARCH, c.arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; it still runs
        scripted = torch.jit.script(model)
    _atomic_path(out / TORCHSCRIPT, lambda tmp: scripted.save(str(tmp)))
    _atomic_path(out / ONNX, lambda tmp: to_onnx(model, example[:2], tmp))
    c.report["onnx_max_diff"] = onnx_difference(out / ONNX, model, example)
    with torch.no_grad():
        largest = float(model(example).abs().max())
    if not exact(c.report["onnx_max_diff"], largest, ONNX_TOLERANCE):
        raise NotExact(f"ONNX Runtime's logits differ from torch's by {c.report['onnx_max_diff']:.3g}")
    c.report["files"] = list(FILES)
    write_json(out / REPORT, c.report)
    return out


def _atomic_path(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def to_onnx(model: nn.Module, example: torch.Tensor, path) -> None:
    """ONNX through torch.export (torch's exporter since 2.9), the batch dimension dynamic."""
    import contextlib
    import io
    import logging

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["x"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(path))


def onnx_session(path, device="cpu", threads: Optional[int] = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider"] if str(device).startswith("cuda") else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


@torch.no_grad()
def onnx_difference(path, model: nn.Module, x: torch.Tensor) -> float:
    """The largest absolute difference of ONNX Runtime's logits and the torch network's."""
    session = onnx_session(path)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    return float((got - model(x)).abs().max())
