"""Rebuild a ticket from an exported folder (lth tickets export): no unpickling anywhere.
The folder's names are the trial folder's (trials/folder/layout.py), flattened to one level:

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

from trials import methods
from trials.folder import layout
from trials.folder.record import LevelRecord
from trials.folder.store import load_tensors
from trials.nets import datasets, models
from trials.nets.masks import Masker
from trials.spec import from_dict


@dataclass
class Ticket:
    model: torch.nn.Module  # mask applied: pruned weights are exactly zero
    mask: dict
    spec: object  # TrialSpec
    record: LevelRecord  # the level's record as logged
    source: dict  # run_id and tracking_uri of the MLflow run it was exported from

    def __repr__(self) -> str:  # the tensors stay out of it
        r = self.record
        return (f"Ticket({self.spec.method} {self.spec.model.name} on {self.spec.dataset.name}, seed {self.spec.seed}, "
                f"level {r.level}, density {r.density:.4f}, recorded test_acc {r.test_acc:.4f}, "
                f"key {self.spec.key}{', run ' + self.source['run_id'] if self.source.get('run_id') else ''})")

    def evaluate(self, data=None) -> tuple[float, float]:
        """(test loss, test accuracy) of the model as loaded, in eval mode: with the final
        weights, on the machine kind that trained them, exactly the recorded test_acc."""
        from trials.loop.arithmetic import autocast_for, evaluate

        device = next(self.model.parameters()).device
        data = data or datasets.load(self.spec.dataset, device)
        result = evaluate(self.model, data.test_x, data.test_y, autocast_for(device, self.spec.train.precision))
        self.model.eval()  # evaluate() leaves a net in training mode; a ticket stays in eval mode
        return result

    def train(self, data=None, start_iteration=None):
        """Retrain the masked network as the trial did (from its rewind point). An
        edge-popup ticket's weights stay fixed (its accuracy is its supermask's): evaluate it."""
        from trials.loop.training import train_level

        if methods.of(self.spec).trains == "scores":
            raise ValueError(f"a {self.spec.method} ticket is not retrained: its weights stay fixed and its "
                             "accuracy is the supermask's (use evaluate())")
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
    if not (folder / files[weights]).exists() and weights == "final":
        raise ValueError(f"{folder} holds no final weights (its sweep kept only its last level's; the sweep "
                         "setting keep_finals: all keeps every level's): load weights='rewind' and retrain")
    spec = from_dict(json.loads((folder / layout.SPEC).read_text())["spec"])
    net = models.build(spec.model, datasets.info(spec.dataset), seed=spec.seed)
    net.load_state_dict(load_tensors(folder / files[weights]))
    mask = load_tensors(folder / layout.MASK)
    net = net.to(device).eval()  # for evaluation and inference; train() switches it back
    Masker(net, mask).apply()
    record = LevelRecord.from_dict(json.loads((folder / layout.RECORD).read_text()))
    source = json.loads((folder / layout.SOURCE).read_text()) if (folder / layout.SOURCE).exists() else {}
    return Ticket(net, mask, spec, record, source)
