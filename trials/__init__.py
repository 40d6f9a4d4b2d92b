"""The science: a trial of one registered method (trials/methods: IMP, edge-popup, pruning
at initialization), run level by level by one level runner (trials/runner/levels.py run_pack; a
trial is a pack of one) through one training loop (trials/loop/training.py train_members), in
its own trial folder (ARCHITECTURE.md, "The engine"). Imports torch/torchvision only (no
ray, optuna, mlflow)."""
from importlib import import_module

# imported when first asked for (PEP 562): `import trials.X` then costs only X's imports,
# so readers of MLflow and storage (`lth report`, `lth sweep status`) do not load torch
_WHERE = {"ConfigError": "trials.core.errors", **dict.fromkeys(
    ("DatasetSpec", "ModelSpec", "PruneSpec", "TrainSpec", "TrialSpec"), "trials.spec"),
    "Ticket": "trials.export.ticket_folder", "load_ticket": "trials.export.ticket_folder"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'trials' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_WHERE])
