"""The exactness check (ARCHITECTURE.md, "Compaction"): the same compaction in float64, its
logits against the masked network's in float64, max difference / max(1, largest |logit|)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from trials.export.compact.model import Compacted, compact_model

TOLERANCE = 1e-9


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
