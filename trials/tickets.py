"""Rebuild a ticket from an exported folder (lth tickets export): no unpickling anywhere.
The folder's names are the trial folder's (trials/layout.py), flattened to one level:

    spec.json          the trial's spec
    record.json        the level's LevelRecord (accuracies, density, ...)
    source.json        where it came from (MLflow run id, tracking URI)
    mask.safetensors   the level's mask
    rewind.safetensors the ticket's starting weights (retrain from here)
    final.safetensors  the level's trained weights (evaluate these)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trials import datasets, layout, models
from trials.masks import Masker
from trials.record import LevelRecord
from trials.spec import from_dict
from trials.store import load_tensors


@dataclass
class Ticket:
    model: torch.nn.Module  # mask applied: pruned weights are exactly zero
    mask: dict
    spec: object  # TrialSpec
    record: LevelRecord  # the level's record as logged
    source: dict  # run_id and tracking_uri of the MLflow run it was exported from

    def train(self, data=None, start_iteration=None):
        """Retrain the masked network as the trial did (from its rewind point)."""
        from trials.training import train_level

        data = data or datasets.load(self.spec.dataset, next(self.model.parameters()).device)
        k = self.spec.rewind_iteration if start_iteration is None else start_iteration
        return train_level(self.model, self.mask, data, self.spec.train, self.spec.seed, k)


def load_ticket(folder, weights: str = "final", device="cpu") -> Ticket:
    """The exported level's network. weights="final": the trained weights (evaluate them);
    "rewind": the ticket's starting weights under the mask (retrain them)."""
    files = {"final": layout.FINAL, "rewind": layout.REWIND}
    if weights not in files:
        raise ValueError(f"weights: {weights!r} is not allowed; allowed: {', '.join(files)}")
    folder = Path(folder)
    spec = from_dict(json.loads((folder / layout.SPEC).read_text())["spec"])
    net = models.build(spec.model, datasets.info(spec.dataset), seed=spec.seed)
    net.load_state_dict(load_tensors(folder / files[weights]))
    mask = load_tensors(folder / layout.MASK)
    net = net.to(device)
    Masker(net, mask).apply()
    record = LevelRecord.from_dict(json.loads((folder / layout.RECORD).read_text()))
    source = json.loads((folder / layout.SOURCE).read_text()) if (folder / layout.SOURCE).exists() else {}
    return Ticket(net, mask, spec, record, source)
