"""The trial folder's names: the file contract between the engine (trials/folder/store.py),
the sweep runner's checkpoints, MLflow artifacts, tickets and analysis. ARCHITECTURE.md,
"The trial folder", describes the contract; the names live here only.

    OUT/spec.json                  resolved spec + key + package version + git sha
    OUT/levels.jsonl               one LevelRecord per finished level (trials/folder/record.py)
    OUT/rewind.safetensors         the ticket's starting weights (level 0 after k iterations)
    OUT/level_XX/mask.safetensors  the mask that trained level XX
    OUT/level_XX/final.safetensors trained weights at the end of level XX
    OUT/level_XX/record.json       that level's record
    OUT/level_XX/DONE              written last
    OUT/level_XX/draw_YY.json      early-bird tickets: level YY's mask draw, made while level XX
                                   trained (trials/methods/early_bird_watch.py; .safetensors / .mask.safetensors:
                                   method=early_bird's weights and mask at that draw)
    OUT/scored.safetensors         control=reinit of a method that prunes at init: the rewind
                                   point its method scores (its rewind.safetensors is the fresh init)
    OUT/imp/                       a control's IMP trajectory (a trial folder of its own)
    OUT/nodes.json                 sweeps only: level -> Ray node that trained it
    OUT/units.json                 shared sweeps only: the work units it used (trials/runner/shared.py)

An exported ticket (lth tickets export, trials.load_ticket) holds one level's files flat:
spec.json, record.json, mask/rewind/final.safetensors and source.json (its MLflow run).
"""
from __future__ import annotations

import re
from typing import Optional

SPEC = "spec.json"
LEVELS = "levels.jsonl"
REWIND = "rewind.safetensors"
SCORED = "scored.safetensors"
MASK = "mask.safetensors"
FINAL = "final.safetensors"
RECORD = "record.json"
DONE = "DONE"
IMP = "imp"
NODES = "nodes.json"
UNITS = "units.json"
SOURCE = "source.json"
TENSOR_SUFFIX = ".safetensors"

_LEVEL_DIR = re.compile(r"level_(\d+)$")


def draw(level: int, suffix: str) -> str:
    """A level folder's early-bird draw of level `level`'s mask (trials/methods/early_bird_watch.py)."""
    return f"draw_{level:02d}{suffix}"


def is_draw(name: str) -> bool:
    return name.startswith("draw_")


def level_dir(level: int) -> str:
    return f"level_{level:02d}"


def level_of(name: str) -> Optional[int]:
    """The level of a level folder's name, None for any other name."""
    m = _LEVEL_DIR.match(name)
    return int(m.group(1)) if m else None
