"""The level record: what a trial reports for each finished level. One schema for every
writer and reader (the engine, the trial folder, the sweep runner's results and Tune
reports, MLflow metrics, tickets, analysis, the command line). ARCHITECTURE.md, "The
level record", describes it; the field list lives here only.

A record is stored as one flat JSON object (levels.jsonl, level_XX/record.json);
`LevelRecord.from_dict` refuses a dict with missing or unknown keys, so a reader never
silently works on another schema. Optional fields (OPTIONAL: default None, e.g. the
instability analysis, measured only where the spec asks) are the exception: a record
leaves them out of its JSON while they are None, and a dict without them reads as None,
so records written before they existed (and tests/golden/records.json) read unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional


def _f(unit: str, help: str, tracked: bool = True, optional: bool = False):
    """`tracked`: logged as an MLflow metric per level (step = level). `optional`: default
    None (not measured), left out of the record's JSON while None."""
    meta = {"unit": unit, "help": help, "tracked": tracked, "optional": optional}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


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
    environment: Optional[dict] = _f(
        "names", "where the level was trained: lth version and commit, torch and CUDA versions, CPU model and "
        "capability, device, threads (trials/folder/environment.py; None: written before lth recorded it)",
        tracked=False, optional=True)
    effective_density: Optional[float] = _f(
        "fraction", "prunable weights kept that lie on some input-to-output path / all prunable weights "
        "(trials/nets/paths.py; None: a network with no description, or written before lth counted it)",
        optional=True)
    # instability analysis (Frankle et al. 2020; trials/methods/stability.py): None where not measured
    stability_error_barrier: Optional[float] = _f(
        "fraction", "instability: the largest test error on the straight line between two copies "
        "trained from the level's start with different SGD noise, minus the mean error of the two "
        "ends (mean over pairs of copies; < 0.02 = stable)", optional=True)
    stability_loss_barrier: Optional[float] = _f(
        "nats", "the same for test cross-entropy: largest loss on the line minus the ends' mean", optional=True)
    stability_acc_a: Optional[float] = _f(
        "fraction", "test accuracy of copy 0, the line's first end (BatchNorm statistics recomputed)",
        optional=True)
    stability_acc_b: Optional[float] = _f(
        "fraction", "test accuracy of copy 1, the line's other end (BatchNorm statistics recomputed)",
        optional=True)
    # early-bird tickets (You et al. 2020; trials/methods/early_bird_watch.py): None where no early-bird draw was made
    early_bird_iteration: Optional[int] = _f(
        "iterations", "the iteration of the weights this level's mask was drawn from (method=early_bird: where "
        "its density's mask stabilised in the dense run; early-bird IMP levels: where level L-1 stopped)",
        optional=True)
    early_bird_stable: Optional[bool] = _f(
        "yes/no", "whether that mask had stabilised (false: it never did and was drawn at the end of the run)",
        tracked=False, optional=True)
    early_bird_distance: Optional[float] = _f(
        "fraction", "the largest normalised Hamming distance in the window when the mask was drawn", optional=True)
    early_bird_trace: Optional[list] = _f(
        "fraction", "per draw before it: [iteration, largest distance of the newest mask to the others in "
        "the window]", tracked=False, optional=True)
    schedule_iterations: Optional[int] = _f(
        "iterations", "the iterations this level's schedule holds; `iterations` is what it trained "
        "(fewer where it stopped early)", optional=True)
    cost_iterations: Optional[int] = _f(
        "iterations", "iterations trained to obtain this level's network, its own included (IMP: levels "
        "0..L; method=early_bird: the dense run up to its draw plus its own)", optional=True)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if not (v is None and k in OPTIONAL)}

    @classmethod
    def from_dict(cls, data: dict) -> "LevelRecord":
        missing, unknown = set(FIELDS) - set(OPTIONAL) - set(data), set(data) - set(FIELDS)
        if missing or unknown:
            raise ValueError(f"not a level record: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> "LevelRecord":
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict:
        """Scalars only (Tune results, CSV rows), every field (None where not measured):
        layer_density, environment and early_bird_trace as JSON strings."""
        # every container field is one of the three JSON strings: the rest is copied as it is
        # (dataclasses.asdict deep-copies each value: most of `lth sweep status` at 10,000 trials)
        return {**{f: getattr(self, f) for f in FIELDS}, "layer_density": json.dumps(self.layer_density, sort_keys=True),
                "environment": None if self.environment is None else json.dumps(self.environment, sort_keys=True),
                "early_bird_trace": None if self.early_bird_trace is None else json.dumps(self.early_bird_trace)}

    @classmethod
    def from_flat(cls, row: dict) -> "LevelRecord":
        """The record inside a flat row (a Tune result, a CSV row): its fields, other keys
        ignored; an optional field missing or NaN (a table's empty cell) is None."""
        values = {k: row[k] for k in FIELDS if k not in OPTIONAL}
        values.update({k: _none(row.get(k)) for k in OPTIONAL})
        for key in ("layer_density", "environment", "early_bird_trace"):  # JSON text in a flat row
            if isinstance(values[key], str):
                values[key] = json.loads(values[key])
        return cls(**values)

    def json_line(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _none(value):
    return None if value is None or (isinstance(value, float) and value != value) else value


FIELDS = tuple(f.name for f in dataclasses.fields(LevelRecord))
OPTIONAL = tuple(f.name for f in dataclasses.fields(LevelRecord) if f.metadata["optional"])  # None = not measured
STABILITY = tuple(f for f in OPTIONAL if f.startswith("stability_"))  # trials/methods/stability.py measures these
EARLY_BIRD = tuple(f for f in OPTIONAL if f.startswith("early_bird_")) + ("schedule_iterations", "cost_iterations")
#   written only where early-bird draws are made (method early_bird, IMP with early_bird.imp_levels)
TRACKED = tuple(f.name for f in dataclasses.fields(LevelRecord) if f.metadata["tracked"])  # MLflow metrics
COUNTS = tuple(f.name for f in dataclasses.fields(LevelRecord) if f.type in ("int", int))  # whole numbers
UNITS = {f.name: f.metadata["unit"] for f in dataclasses.fields(LevelRecord)}


def read_lines(text: str) -> list[LevelRecord]:
    """The records of a levels.jsonl file's text, in file order."""
    return [LevelRecord.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]
# the fields a one-line summary of a level shows (the trial console, the ticket ranking)
HEADLINE = ("density", "remaining_params", "test_acc", "early_stop_iteration", "test_acc_at_early_stop")
ACCURACIES = tuple(f for f in TRACKED if UNITS[f] == "fraction" and "acc" in f
                   and f not in OPTIONAL)  # what tickets rank by
assert set(HEADLINE) <= set(TRACKED)
