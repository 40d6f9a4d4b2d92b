"""The level record schema (trials/folder/record.py) and the trial folder names (trials/folder/layout.py)."""
import json

import pytest

from trials.folder import layout
from trials.folder.record import ACCURACIES, COUNTS, FIELDS, HEADLINE, OPTIONAL, TRACKED, UNITS, LevelRecord, read_lines

EXAMPLE = dict(level=2, density=0.64, layer_density={"fc": 0.9, "hidden.0": 0.64}, remaining_params=123,
               test_acc=0.95, early_stop_iteration=180, test_acc_at_early_stop=0.96, val_loss=0.2, val_acc=0.94,
               val_loss_at_early_stop=0.19, train_loss=0.1, start_iteration=0, iterations=200, seconds=1.5)


def test_every_field_has_a_unit_and_the_derived_tuples_follow_the_types():
    record = LevelRecord(**EXAMPLE)
    assert FIELDS == tuple(EXAMPLE) + OPTIONAL and set(UNITS) == set(FIELDS) and all(UNITS.values())
    assert set(COUNTS) == {k for k, v in EXAMPLE.items() if isinstance(v, int)}
    assert set(TRACKED) <= set(FIELDS) and "layer_density" not in TRACKED and "level" not in TRACKED
    assert set(HEADLINE) <= set(TRACKED) and set(ACCURACIES) == {"test_acc", "test_acc_at_early_stop", "val_acc"}
    assert record.to_dict() == EXAMPLE


def test_dicts_of_another_schema_are_refused():
    with pytest.raises(ValueError, match=r"missing \['seconds'\]"):
        LevelRecord.from_dict({k: v for k, v in EXAMPLE.items() if k != "seconds"})
    with pytest.raises(ValueError, match=r"unknown \['run_id'\]"):
        LevelRecord.from_dict({**EXAMPLE, "run_id": "abc"})


def test_json_line_and_flat_row_round_trip():
    record = LevelRecord(**EXAMPLE)
    assert read_lines(record.json_line() + "\n\n" + record.json_line()) == [record, record]
    row = {**record.flat(), "trial_id": "t1", "seed": 3}  # a Tune result carries more keys
    assert isinstance(row["layer_density"], str) and json.loads(row["layer_density"]) == EXAMPLE["layer_density"]
    assert LevelRecord.from_flat(row) == record


def test_level_folder_names_round_trip():
    assert layout.level_dir(3) == "level_03" and layout.level_of("level_03") == 3
    assert layout.level_of("level_123") == 123 and layout.level_of("imp") is None
    assert layout.level_of(layout.LEVELS) is None and layout.level_of("level_x") is None
