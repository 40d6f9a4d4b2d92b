"""The engine's records against saved ones (tests/golden/make_records.py), in two modes,
named in each test's id:

- `exact`: against the recording of a machine with this one's fingerprint (torch, CUDA
  build, CPU model and capability, threads): every float bit for bit. A refactor must not
  move a single number. Skipped where no such recording exists (`make golden` adds one).
- `across`: against each recording from another machine: counts, densities and
  iterations equal, floats within the file's tolerance (1e-5 relative); for cases that
  cannot be compared across machines (make_records.COUNTS_ONLY, with why), counts only.

On the machine that recorded, both run: its own recording exactly, the others across.
"""
import json

import pytest

from tests.golden.make_records import COUNTS, COUNTS_ONLY, FILE, CASES, differences, fingerprint, records, spec_data

GOLDEN = json.loads(FILE.read_text())
HERE = fingerprint()


def comparisons():
    """(case, mode, recording) for every case: this machine's recording exactly (or a skip),
    every other machine's recording of the same spec across."""
    out = []
    for name in sorted(CASES):
        mine = [r for r in GOLDEN["recordings"] if r["fingerprint"] == HERE and name in r["cases"]]
        out.append(pytest.param(name, "exact", mine[0] if mine else None, id=f"{name}-exact"))
        for i, rec in enumerate(r for r in GOLDEN["recordings"] if r["fingerprint"] != HERE):
            if name in rec["cases"]:
                out.append(pytest.param(name, "across", rec, id=f"{name}-across-{i}"))
    return out


@pytest.fixture(scope="module")
def run():
    cache = {}
    return lambda name: cache.setdefault(name, records(name))


def describe(fp: dict) -> str:
    return f"{fp['cpu']} ({fp['cpu_capability']}), torch {fp['torch']}, {fp['threads']} threads"


@pytest.mark.parametrize("name, mode, recording", comparisons())
def test_records_equal_the_saved_records(name, mode, recording, run):
    if recording is None:
        pytest.skip(f"no golden recording from this machine ({describe(HERE)}): `make golden` writes one")
    saved = recording["cases"][name]
    if saved["spec"] != spec_data(name):
        pytest.skip(f"the recording from {describe(recording['fingerprint'])} has another spec for {name}")
    if mode == "exact":
        problems = differences(run(name), saved["records"], 0.0)
    elif name in COUNTS_ONLY:
        problems = differences(run(name), saved["records"], 0.0, keys=COUNTS)
    else:
        problems = differences(run(name), saved["records"], GOLDEN["tolerance"])
    where = "this machine's recording, bit for bit" if mode == "exact" else \
        f"{describe(recording['fingerprint'])}, floats within {GOLDEN['tolerance']:g}"
    assert not problems, f"{name} against {where}:\n" + "\n".join(problems[:20])


def test_the_tolerance_tells_machines_apart_from_mistakes():
    """The across-machine comparison is not vacuous: a record off by 1e-4 relative, or
    with another early-stop iteration, fails it; one off by 1e-7 (another CPU) passes."""
    rec = GOLDEN["recordings"][0]["cases"]["unstructured"]["records"]
    nudge = lambda f, key, by: [{**r, key: f(r[key], by)} if r["level"] == 1 else r for r in rec]  # noqa: E731
    assert differences(nudge(lambda v, e: v * (1 + e), "val_loss", 1e-7), rec, GOLDEN["tolerance"]) == []
    assert differences(nudge(lambda v, e: v * (1 + e), "val_loss", 1e-4), rec, GOLDEN["tolerance"])
    assert differences(nudge(lambda v, e: v + e, "early_stop_iteration", 20), rec, GOLDEN["tolerance"])
    assert differences(nudge(lambda v, e: v * (1 + e), "val_loss", 1e-7), rec, 0.0)
