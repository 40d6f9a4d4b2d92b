"""The method registry (trials/methods): every entry is whole, the spec and validation ask
it, no code outside it compares a method's name to a string, and a new pruning-at-init
method is one scorer function plus one entry (trained here end to end, for real)."""
import dataclasses
import re
from pathlib import Path

import pytest

from tests.conftest import quick_spec
from trials import methods
from trials.spec import packing
from trials.runner import shared
from trials.core.errors import ConfigError
from trials.runner.levels import run_lottery
from trials.methods import Method
from trials.spec import TrainSpec, TrialSpec, field_paths, flatten, from_dict

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", methods.names())
def test_every_entry_is_whole_and_its_names_resolve(name):
    m = methods.get(name)
    assert m.trains in ("weights", "scores") and m.shares in ("trunk", "dense", "none")
    assert set(m.controls) <= set(methods.CONTROLS) and "none" in m.controls
    assert set(m.retrain) <= set(methods.RETRAIN) and "weight_rewind" in m.retrain
    member = m.load("member")
    assert callable(getattr(member, "job")) and callable(getattr(member, "finish"))
    if m.mask == "scored":
        assert callable(m.load("scorer"))
    paths = field_paths()
    for read in (*methods.COMMON, *m.reads):  # every path it says it reads is a spec path or group
        assert read in paths or any(p.startswith(read + ".") for p in paths), read


def test_the_spec_takes_its_choices_and_help_from_the_registry():
    f = {f.name: f for f in dataclasses.fields(TrialSpec)}["method"]
    assert all(n in f.metadata["help"] for n in methods.names())
    with pytest.raises(ConfigError) as e:
        from_dict({"method": "no_such"})
    assert e.value.key == "method" and ", ".join(methods.names()) in str(e.value)


def test_params_are_what_the_method_reads():
    imp = flatten(quick_spec().to_dict())
    logged = methods.get("imp").params(imp)
    assert "prune.rate" in logged and "train.lr" in logged and "seed" in logged and "method" in logged
    assert not [p for p in logged if p.startswith(("supermask.", "at_init."))]
    popup = methods.get("edge_popup").params(imp)
    assert "supermask.densities" in popup and "prune.rate" not in popup and "train.lr" not in popup
    snip = methods.get("snip").params(imp)
    assert "at_init.batches" in snip and "at_init.rounds" not in snip and "prune.scope" not in snip
    # a run logged with every field (before runs held only their method's) reads as one logged since
    assert methods.logged({**imp, "method": "imp"}) == logged
    assert methods.logged({k: v for k, v in imp.items() if k != "method"}) == {
        k: v for k, v in logged.items() if k != "method"}  # no `method` param: IMP (runs before there was a choice)


def test_no_code_outside_the_registry_compares_a_method_to_a_string():
    pattern = re.compile(r"""method["')\]]*\s*(==|!=)\s*["']|["'](%s)["']\s*(==|!=)|method["')\]]*\s+(not\s+)?in\s+[(\[{A-Z]"""
                         % "|".join(methods.names()))
    own = {ROOT / "trials" / "methods" / "__init__.py", ROOT / "trials" / "at_init.py", ROOT / "trials" / "supermask.py"}
    found = [f"{p.relative_to(ROOT)}:{i}" for package in ("trials", "orchestrator", "analysis", "lth")
             for p in (ROOT / package).rglob("*.py") if p not in own
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def _middle_scores(at):
    """A toy scorer: keeps the weights nearest the layer's median magnitude."""
    net = at.net()
    params = dict(net.named_parameters())
    scores = {n: -(params[at.layers.weight(n)].detach().abs().flatten().double()
                   - params[at.layers.weight(n)].detach().abs().median()).abs() for n in at.layers.names}
    return scores, at.top(scores)


def test_a_new_at_init_method_is_one_scorer_and_one_entry(tmp_path):
    snip = methods.get("snip")
    entry = dataclasses.replace(snip, name="middle_init", help="weights nearest the median magnitude",
                                scorer=f"{__name__}:_middle_scores",
                                reads=tuple(r for r in snip.reads if r != "at_init.batches"))
    methods.register(entry)
    try:
        train = TrainSpec(optimizer="adam", lr=1e-3, batch_size=60, iterations=40, eval_interval=20)
        spec = quick_spec(method="snip", train=train).replace(method="middle_init")  # replace: past the Literal
        assert packing.trains(spec) == "weights" and shared.shareable(spec) and not shared.shares_levels(spec)
        records = run_lottery(spec, tmp_path / "t")
        assert [r.level for r in records] == [0, 1, 2]
        assert records[1].remaining_params < records[0].remaining_params
        with pytest.raises(ConfigError) as e:  # it does not read at_init.batches: refused, naming the key
            spec.replace(at_init=dataclasses.replace(spec.at_init, batches=2))
        assert e.value.key == "at_init.batches"
    finally:
        del methods.METHODS["middle_init"]


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError):
        methods.register(Method("imp", "again", trains="weights", reads=(), member="trials.methods.imp:Member",
                                mask="pruned", levels="prune.levels", shares="trunk", controls=("none",)))
