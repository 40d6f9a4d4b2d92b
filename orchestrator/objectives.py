"""Per-trial summaries: what a search optimises and what `lth sweep status` ranks.

All are computed from the level records reached so far, so the last report of a
trial (finished or stopped early) carries its final values.
"""
from __future__ import annotations

from trials.record import LevelRecord

STOPPED = "stopped_not_matching"  # result key set on the level that ended a trial early


def matches(record: LevelRecord, dense: LevelRecord, tolerance: float) -> bool:
    """A level matches when its early-stop test accuracy is within `tolerance` of the
    same trial's dense (level 0) early-stop test accuracy."""
    return record.test_acc_at_early_stop >= dense.test_acc_at_early_stop - tolerance


def summarise(records: list[LevelRecord], tolerance: float) -> dict:
    """The trial's objectives; keys are OBJECTIVES."""
    dense, last = records[0], records[-1]
    matching = [r.density for r in records if matches(r, dense, tolerance)]
    return {
        "dense_test_acc": dense.test_acc,
        "final_test_acc": last.test_acc,
        "final_test_acc_at_early_stop": last.test_acc_at_early_stop,
        "final_density": last.density,
        "matching_density": min(matching),  # level 0 always matches itself
    }


OBJECTIVES = ("dense_test_acc", "final_test_acc", "final_test_acc_at_early_stop", "final_density",
              "matching_density")  # the keys of summarise, in its order: what a search may optimise
MINIMISED = ("matching_density", "final_density")  # the default mode of these is min, of the rest max
