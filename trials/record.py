"""The level record: what a trial reports for each finished level. One schema for every
writer and reader (the engine, the trial folder, the sweep runner's results and Tune
reports, MLflow metrics, tickets, analysis, the command line). ARCHITECTURE.md, "The
level record", describes it; the field list lives here only.

A record is stored as one flat JSON object (levels.jsonl, level_XX/record.json);
`LevelRecord.from_dict` refuses a dict with missing or unknown keys, so a reader never
silently works on another schema.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


def _f(unit: str, help: str, tracked: bool = True):
    """`tracked`: logged as an MLflow metric per level (step = level)."""
    return field(metadata={"unit": unit, "help": help, "tracked": tracked})


@dataclass(frozen=True)
class LevelRecord:
    level: int = _f("level", "0 = the dense network; L = after L prunings", tracked=False)
    density: float = _f("fraction", "prunable weights kept / all prunable weights (1.0 = dense)")
    layer_density: dict = _f("fraction", "prunable layer (module name) -> weights kept / weights", tracked=False)
    remaining_params: int = _f("weights", "prunable weights kept")
    test_acc: float = _f("fraction", "test accuracy after the level's last iteration")
    early_stop_iteration: int = _f("iterations", "iteration (from 0 = init) of minimum validation loss")
    test_acc_at_early_stop: float = _f("fraction", "test accuracy of the weights at early_stop_iteration")
    val_loss: float = _f("nats", "mean validation cross-entropy after the last iteration")
    val_acc: float = _f("fraction", "validation accuracy after the last iteration")
    val_loss_at_early_stop: float = _f("nats", "the minimum validation loss", tracked=False)
    train_loss: float = _f("nats", "mean training loss over the last evaluation window")
    start_iteration: int = _f("iterations", "where the level started: 0 (dense) or the rewind iteration k",
                              tracked=False)
    iterations: int = _f("iterations", "optimizer steps trained in this level", tracked=False)
    seconds: float = _f("seconds", "wall-clock time of the level's training and evaluation")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LevelRecord":
        missing, unknown = set(FIELDS) - set(data), set(data) - set(FIELDS)
        if missing or unknown:
            raise ValueError(f"not a level record: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(**data)

    def flat(self) -> dict:
        """Scalars only (Tune results, CSV rows): layer_density as one JSON string."""
        return {**self.to_dict(), "layer_density": json.dumps(self.layer_density, sort_keys=True)}

    @classmethod
    def from_flat(cls, row: dict) -> "LevelRecord":
        """The record inside a flat row (a Tune result, a CSV row): its fields, other keys ignored."""
        values = {k: row[k] for k in FIELDS}
        if isinstance(values["layer_density"], str):
            values["layer_density"] = json.loads(values["layer_density"])
        return cls(**values)

    def json_line(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


FIELDS = tuple(f.name for f in dataclasses.fields(LevelRecord))
TRACKED = tuple(f.name for f in dataclasses.fields(LevelRecord) if f.metadata["tracked"])  # MLflow metrics
COUNTS = tuple(f.name for f in dataclasses.fields(LevelRecord) if f.type in ("int", int))  # whole numbers
UNITS = {f.name: f.metadata["unit"] for f in dataclasses.fields(LevelRecord)}


def read_lines(text: str) -> list[LevelRecord]:
    """The records of a levels.jsonl file's text, in file order."""
    return [LevelRecord.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]
# the fields a one-line summary of a level shows (the trial console, the ticket ranking)
HEADLINE = ("density", "remaining_params", "test_acc", "early_stop_iteration", "test_acc_at_early_stop")
ACCURACIES = tuple(f for f in TRACKED if UNITS[f] == "fraction" and "acc" in f)  # what tickets rank by
assert set(HEADLINE) <= set(TRACKED)
