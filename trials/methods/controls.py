"""Controls: the numbers of a control network at a method's masks or densities (ARCHITECTURE.md,
"The engine" and "Pruning at initialization").

An IMP control runs the IMP trajectory itself in OUT/imp/ (a full trial folder, a member of
its own in a pack) because its masks or densities come from it:
    reinit        IMP's level-L mask on a fresh random init (one init per trial, from a
                  seed derived from `seed`), trained k..end like the ticket
    random_prune  random masks, nested across levels, with exactly IMP's per-layer counts
                  of weights (units when structured), on the ticket's rewind weights
    shuffle       IMP's level-L mask permuted at random within each layer (Frankle et al.
                  2021), on the ticket's rewind weights
    invert        masks nested across levels with exactly IMP's per-layer counts, keeping the
                  *smallest* magnitudes of the control's own level L-1 final weights among its
                  own level L-1 survivors (IMP's ranking turned over), on the ticket's rewind weights
A control's level 0 is IMP's dense network: density 1 has no mask to control for.

A control of a method that prunes at initialization needs no IMP run: its mask is its own
method's, changed (trials/methods/at_init.py level_mask); reinit trains it from the fresh init
(`start`), the others from the trial's rewind point.
"""
from __future__ import annotations

from trials import methods
from trials.core.seeds import rng
from trials.folder.store import TrialDir, state_of
from trials.methods import at_init, pruning
from trials.nets import models

pruning.STRATEGIES.register("smallest")(lambda weight, units, g: -pruning.magnitude(weight, units, g))


def start(spec, imp: TrialDir, info) -> dict:
    """An IMP control's rewind point: its IMP run's, or a fresh init (reinit, which spec
    validation allows with retrain=weight_rewind only)."""
    if spec.control != "reinit":
        return imp.rewind()
    return fresh(spec, info)


def fresh(spec, info) -> dict:
    """reinit's init: drawn from a seed derived from the trial's."""
    return state_of(models.build(spec.model, info, seed=rng(spec.seed, "reinit").initial_seed(), device="cpu"))


def mask(spec, level: int, imp: TrialDir, trial: TrialDir, layers) -> dict:
    """An IMP control's level-L mask, from its IMP run's level L (module doc)."""
    imp_mask = imp.mask(level)
    if spec.control == "reinit":
        return imp_mask
    if spec.control == "shuffle":
        return at_init.shuffle(imp_mask, layers, rng(spec.seed, "shuffle", level))
    units = spec.prune.kind == "structured"
    strategy = "random" if spec.control == "random_prune" else "smallest"
    return pruning.prune(spec.prune, trial.final(level - 1), trial.mask(level - 1), layers, strategy=strategy,
                         targets=pruning.counts(imp_mask, layers, units),
                         generator=rng(spec.seed, "random_prune", level))


def needs_imp(spec) -> bool:
    """Whether the trial runs an IMP trajectory in OUT/imp/ beside its own levels."""
    return methods.of(spec).control_trunk and spec.control != "none"  # at init and edge-popup: their own masks

