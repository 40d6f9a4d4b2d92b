"""Every random draw of a trial is a pure function of its seed and what the draw is for
(ARCHITECTURE.md, "The engine"): data order and augmentation per (seed, iteration), initial
weights, random masks and scores per (seed, purpose, level)."""
from __future__ import annotations

import hashlib

import torch


def rng(seed: int, *parts) -> torch.Generator:
    """An independent CPU generator for one purpose, e.g. rng(seed, "order", epoch)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
