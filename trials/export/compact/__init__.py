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

This package, by concern: network.py (the compact network's JSON and its builder),
units.py (spaces of units and what stays), model.py (compact_model and its report),
checks.py (exactness), files.py (the folder: weights, TorchScript, ONNX, report); here,
a ticket compacted, checked and written (`compact`, `compact_folder`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from trials.core.errors import ConfigError
from trials.export.compact.checks import TOLERANCE, NotExact, check, exact, logit_difference  # noqa: F401
from trials.export.compact.files import (  # noqa: F401
    FILES, ONNX, ONNX_TOLERANCE, REPORT, TORCHSCRIPT, export, onnx_difference, onnx_session, to_onnx,
)
from trials.export.compact.model import Compacted, compact_model, macs  # noqa: F401
from trials.export.compact.network import ARCH, FORMAT, WEIGHTS, build, load_compact  # noqa: F401
from trials.nets.paths import Unsupported, describe, supported  # noqa: F401 - the network as ops (compact.describe)


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
