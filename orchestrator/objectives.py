"""Per-trial summaries: what a search optimises and what `lth sweep status` ranks.

All are computed from the level records reached so far, so the last report of a
trial (finished or stopped early) carries its final values.
"""
from __future__ import annotations

from trials.folder.record import LevelRecord

STOPPED = "stopped_not_matching"  # result key set on the level that ended a trial early


def matches(record: LevelRecord, dense: LevelRecord, tolerance: float) -> bool:
    """A level matches when its early-stop test accuracy is within `tolerance` of the
    same trial's dense (level 0) early-stop test accuracy."""
    return record.test_acc_at_early_stop >= dense.test_acc_at_early_stop - tolerance


def summarise(records: list[LevelRecord], tolerance: float) -> dict:
    """The trial's objectives; keys are OBJECTIVES. The instability objectives are None
    until a level that measures it (spec.stability) is reached."""
    dense, last = records[0], records[-1]
    matching = [r.density for r in records if matches(r, dense, tolerance)]
    measured = [r for r in records if r.stability_error_barrier is not None]
    return {
        "dense_test_acc": dense.test_acc,
        "final_test_acc": last.test_acc,
        "final_test_acc_at_early_stop": last.test_acc_at_early_stop,
        "final_density": last.density,
        "matching_density": min(matching),  # level 0 always matches itself
        # the sparsest measured level reached so far (Frankle et al. 2020's question: is the ticket stable?)
        "instability": measured[-1].stability_error_barrier if measured else None,
        "dense_instability": dense.stability_error_barrier,
    }


OBJECTIVES = ("dense_test_acc", "final_test_acc", "final_test_acc_at_early_stop", "final_density",
              "matching_density", "instability",
              "dense_instability")  # the keys of summarise, in its order: what a search may optimise
MINIMISED = ("matching_density", "final_density", "instability",
             "dense_instability")  # the default mode of these is min, of the rest max
NEEDS_STABILITY = ("instability", "dense_instability")  # None unless the trials measure instability
