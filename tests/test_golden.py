"""Same spec, same seed, same records as the engine that wrote tests/golden/records.json
(before the level-record/store refactor): a refactor must not move a single number."""
import json
from pathlib import Path

import pytest
import torch

from tests.golden.make_records import CASES, records, spec_data

GOLDEN = json.loads((Path(__file__).parent / "golden" / "records.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_records_equal_the_saved_engine_output(name):
    if torch.__version__ != GOLDEN["torch"]:
        pytest.skip(f"records were saved with torch {GOLDEN['torch']}; this is {torch.__version__}")
    saved = GOLDEN["cases"][name]
    assert saved["spec"] == spec_data(name)
    assert records(name) == saved["records"]  # exact: every float bit for bit
