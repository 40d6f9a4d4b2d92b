"""The engine: a trial of one registered method (IMP, early-bird tickets, an edge-popup
supermask search, pruning at initialization), run level by level in its own trial folder
(ARCHITECTURE.md, "The engine"). A trial is a pack of one: one level runner trains K >= 1
trials together through one training loop.

Its wings, bottom to top; a module imports only its own wing or lower ones
(tests/test_architecture.py):

    core/     errors, registries, typed coercion of plain data, the seeded random draws
    folder/   the trial folder: its layout, records, the store that reads and writes them,
              the environment and code version each record carries
    nets/     model families, datasets, masks, the networks as ops (paths)
    loop/     the one training loop (training.py), its arithmetics (arithmetic.py: one
              network alone; stacked.py: a pack) and optimizers
    methods/  the method registry (methods/__init__.py: names, what each trains and reads)
              and each method's member: IMP (imp.py), pruning at init, early-bird,
              edge-popup supermasks, controls, instability
    spec/     TrialSpec and its validation; packing and sharing rules (what may train in
              one pack, which work units a trial shares) for planners
    runner/   running a pack's levels (levels.py run_pack) and sharing work units
    export/   what leaves a trial: a ticket's folder, compact models

Building or validating a spec, and planning packs and units, imports no training loop,
runner or method implementation (tests/test_architecture.py). Imports torch/torchvision
only (no ray, optuna, mlflow). The names below are imported on first use."""
import importlib

_FRONT = {  # name -> the module that defines it
    "ConfigError": "trials.core.errors",
    "DatasetSpec": "trials.spec", "ModelSpec": "trials.spec", "PruneSpec": "trials.spec",
    "TrainSpec": "trials.spec", "TrialSpec": "trials.spec",
    "Ticket": "trials.export.ticket_folder", "load_ticket": "trials.export.ticket_folder",
}
__all__ = list(_FRONT)


def __getattr__(name: str):
    if name in _FRONT:
        return getattr(importlib.import_module(_FRONT[name]), name)
    raise AttributeError(f"module 'trials' has no attribute {name!r}")
