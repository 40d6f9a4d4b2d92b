"""The science: a trial of one registered method (trials/methods: IMP, edge-popup, pruning
at initialization), run level by level by one level runner (trials/runner/levels.py run_pack; a
trial is a pack of one) through one training loop (trials/loop/training.py train_members), in
its own trial folder (ARCHITECTURE.md, "The engine"). Imports torch/torchvision only (no
ray, optuna, mlflow)."""
from trials.core.errors import ConfigError
from trials.spec import DatasetSpec, ModelSpec, PruneSpec, TrainSpec, TrialSpec
from trials.export.ticket_folder import Ticket, load_ticket

__all__ = ["ConfigError", "DatasetSpec", "ModelSpec", "PruneSpec", "TrainSpec", "TrialSpec", "Ticket",
           "load_ticket"]
