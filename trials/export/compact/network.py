"""The compact network: plain JSON ops (`ARCH`, format FORMAT) and safetensors (`WEIGHTS`),
built back with torch alone, nothing unpickled (trials/export/compact/__init__.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from trials.nets.paths import Unsupported

FORMAT = "lth-compact/1"
WEIGHTS, ARCH = "model.safetensors", "model.json"


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
