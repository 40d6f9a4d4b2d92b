"""The science: one trial = one IMP run. Imports torch/torchvision only (no ray, optuna, mlflow)."""
from trials.errors import ConfigError
from trials.spec import DatasetSpec, ModelSpec, PruneSpec, TrainSpec, TrialSpec
from trials.tickets import Ticket, load_ticket

__all__ = ["ConfigError", "DatasetSpec", "ModelSpec", "PruneSpec", "TrainSpec", "TrialSpec", "Ticket",
           "load_ticket"]
