"""Write tests/golden/records.json: level records of a few small trials, made by the engine
as it stood before a refactor. tests/test_golden.py reruns the same specs and requires the
same records (wall-clock seconds aside). Regenerate only when numbers are meant to change:

    .venv/bin/python tests/golden/make_records.py
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trials.lottery import run_lottery  # noqa: E402
from trials.spec import from_dict  # noqa: E402

BASE = {"model": {"name": "lenet_300_100"}, "dataset": {"name": "digits"},
        "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 60, "iterations": 120, "eval_interval": 20},
        "prune": {"rate": 0.3, "output_rate": 0.1, "levels": 2}, "device": "cpu"}
CASES = {
    "unstructured": {},
    "structured_rewind": {"prune": {"kind": "structured"}, "rewind_iteration": 20},
    "global_sgd": {"prune": {"scope": "global"}, "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                                                            "milestones": [60], "warmup_iterations": 10}},
    "reinit_rewind": {"control": "reinit", "rewind_iteration": 20, "seed": 1},
    "random_prune_structured": {"control": "random_prune", "prune": {"kind": "structured"}},
    "conv2_synthetic": {"model": {"name": "conv2"}, "dataset": {"name": "synthetic"},
                        "train": {"iterations": 40, "eval_interval": 20}, "prune": {"levels": 1}},
}


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def spec_data(name: str) -> dict:
    return merge(BASE, CASES[name])


def records(name: str) -> list:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_lottery(from_dict(spec_data(name)), Path(tmp) / "trial")
    rows = [r.to_dict() if hasattr(r, "to_dict") else r for r in rows]  # LevelRecord, or the old dicts
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


if __name__ == "__main__":
    out = {"torch": torch.__version__, "cases": {name: {"spec": spec_data(name), "records": records(name)}
                                                   for name in CASES}}
    (Path(__file__).parent / "records.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print("wrote", Path(__file__).parent / "records.json")
