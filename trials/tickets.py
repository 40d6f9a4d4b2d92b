"""Rebuild a ticket from an exported folder (lth tickets export): no unpickling anywhere.

    spec.json          the trial's spec
    record.json        the level's record (accuracies, density, ...)
    mask.safetensors   the level's mask
    rewind.safetensors the ticket's starting weights (retrain from here)
    final.safetensors  the level's trained weights (evaluate these)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trials import datasets, models
from trials.masks import Masker
from trials.spec import from_dict
from trials.store import load_tensors


@dataclass
class Ticket:
    model: torch.nn.Module  # mask applied: pruned weights are exactly zero
    mask: dict
    spec: object  # TrialSpec
    record: dict  # the level's record as logged

    def train(self, data=None, start_iteration=None):
        """Retrain the masked network as the trial did (from its rewind point)."""
        from trials.training import train_level

        data = data or datasets.load(self.spec.dataset, next(self.model.parameters()).device)
        k = self.spec.rewind_iteration if start_iteration is None else start_iteration
        return train_level(self.model, self.mask, data, self.spec.train, self.spec.seed, k)


def load_ticket(folder, weights: str = "final", device="cpu") -> Ticket:
    """The exported level's network. weights="final": the trained weights (evaluate them);
    "rewind": the ticket's starting weights under the mask (retrain them)."""
    if weights not in ("final", "rewind"):
        raise ValueError(f"weights: {weights!r} is not allowed; allowed: final, rewind")
    folder = Path(folder)
    spec = from_dict(json.loads((folder / "spec.json").read_text())["spec"])
    net = models.build(spec.model, datasets.info(spec.dataset), seed=spec.seed)
    net.load_state_dict(load_tensors(folder / f"{weights}.safetensors"))
    mask = load_tensors(folder / "mask.safetensors")
    net = net.to(device)
    Masker(net, mask).apply()
    record = json.loads((folder / "record.json").read_text())
    return Ticket(net, mask, spec, record)
