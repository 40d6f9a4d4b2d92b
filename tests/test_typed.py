"""trials/core/typed.py on its own: plain data -> frozen dataclasses by real types, and every
refusal naming the full key path, the value and what is allowed."""
from dataclasses import dataclass
from typing import Literal, Optional, Union

import pytest

from trials.core.errors import ConfigError
from trials.spec import TrialSpec, field_paths
from trials.core.errors import check
from trials.core.typed import Rule, above, at_least, build, coerce, describe, non_null, option


@dataclass(frozen=True)
class Inner:
    label: str = "plain"
    lr: float = 0.1
    steps: int = option(10, at_least(1, "an integer"))

    def __post_init__(self):  # a cross-field rule names keys relative to this class
        check(self.steps * self.lr <= 100, "steps", self.steps, "at most 100 / lr")


@dataclass(frozen=True)
class Outer:
    name: str = option(expected="a short name")  # required
    flag: bool = False
    kind: Literal["a", "b"] = "a"
    limit: Optional[int] = option(None, Rule(lambda v: v >= 1, "an integer >= 1, or null"))
    cap: int | None = None
    milestones: tuple[int, ...] = ()
    rates: tuple[tuple[str, float], ...] = ()
    either: Union[Literal["x", "y"], tuple[Literal["x", "y"], ...]] = "x"
    extra: dict = option(factory=dict)
    inner: Inner = option(factory=Inner, shorthand="label")
    share: float = option(0.5, above(0), Rule(lambda v: v <= 1 or float(v).is_integer(), "a fraction <= 1"))


def make(**data):
    return build(Outer, {"name": "n", **data})


def refused(data: dict, key: str, allowed: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build(Outer, {"name": "n", **data})
    e = info.value
    assert e.key == key, str(e)
    assert str(e).startswith(f"{key}: {e.value!r} is not allowed; ") and allowed in e.allowed, str(e)
    return e


def test_scalars_are_accepted_and_coerced():
    o = make(flag=True, kind="b", limit=3, cap=None, inner={"lr": 1, "steps": 5}, share=2)
    assert (o.flag, o.kind, o.limit, o.cap, o.share) == (True, "b", 3, None, 2.0)
    assert o.inner == Inner(lr=1.0, steps=5) and isinstance(o.inner.lr, float)  # an int is a number


@pytest.mark.parametrize("data,key,allowed", [
    ({"flag": "yes"}, "flag", "expected true or false"),
    ({"flag": 1}, "flag", "expected true or false"),
    ({"kind": "c"}, "kind", "allowed: a, b"),
    ({"limit": "3"}, "limit", "expected an integer"),
    ({"limit": True}, "limit", "expected an integer"),  # bool is not an int here
    ({"cap": 1.5}, "cap", "expected an integer"),
    ({"inner": {"lr": True}}, "inner.lr", "expected a number"),  # nor a number
    ({"inner": {"lr": "fast"}}, "inner.lr", "expected a number"),
    ({"name": 3}, "name", "expected a short name"),
    ({"extra": [1]}, "extra", "expected a mapping"),
])
def test_wrong_types_name_the_key_the_value_and_what_is_allowed(data, key, allowed):
    refused(data, key, allowed)


def test_tuples_from_lists_and_pairs_from_mappings():
    o = make(milestones=[3, 5], rates={"fc2": 0.5, "fc1": 1})
    assert o.milestones == (3, 5)
    assert o.rates == (("fc1", 1.0), ("fc2", 0.5))  # sorted: equal mappings give equal specs
    refused({"milestones": 3}, "milestones", "expected a list of integers")
    refused({"milestones": [1, "2"]}, "milestones", "expected an integer")
    refused({"rates": [0.1]}, "rates", "expected a mapping of names to numbers")
    refused({"rates": {"fc1": "x"}}, "rates.fc1", "expected a number")


def test_unions_take_the_first_arm_that_fits_and_explain_the_one_written_alike():
    assert make(either="y").either == "y" and make(either=["x", "y"]).either == ("x", "y")
    refused({"either": "z"}, "either", "allowed: x, y")  # a scalar: the Literal arm's message
    refused({"either": ["x", "z"]}, "either", "allowed: x, y")  # a list: the tuple arm's message
    refused({"either": {"x": 1}}, "either", "expected one of x, y or a list of values from x, y")
    assert coerce("k", None, Optional[int]) is None and coerce("k", 2, int | None) == 2


def test_rules_from_field_metadata():
    refused({"limit": 0}, "limit", "an integer >= 1, or null")
    refused({"inner": {"steps": 0}}, "inner.steps", "an integer >= 1")
    refused({"share": 0}, "share", "a number > 0")
    refused({"share": 1.5}, "share", "a fraction <= 1")
    assert make(limit=None).limit is None  # rules judge values, not null


def test_unknown_and_missing_keys():
    e = refused({"colour": "red"}, "colour", "unknown key; known keys here: name, flag, kind")
    assert e.value == "red"
    refused({"inner": {"lrr": 1}}, "inner.lrr", "known keys here: label, lr, steps")
    with pytest.raises(ConfigError, match="^name: None is not allowed; a value is required: a short name$"):
        build(Outer, {})
    with pytest.raises(ConfigError, match="^outer: 3 is not allowed; expected a mapping of keys$"):
        build(Outer, 3, "outer")


def test_nested_null_means_defaults_and_shorthand_fills_one_key():
    assert make(inner=None).inner == Inner()
    assert make(inner="bold").inner == Inner(label="bold")
    refused({"inner": 0.3}, "inner", "expected a mapping of keys")  # not a string: no shorthand


def test_post_init_errors_get_the_nested_path():
    refused({"inner": {"lr": 20.0, "steps": 10}}, "inner.steps", "at most 100 / lr")


def test_field_paths_are_real_types():
    paths = field_paths(Outer)
    assert paths["inner.lr"] is float and paths["limit"] == Optional[int]
    assert paths["milestones"] == tuple[int, ...]
    assert "inner" not in paths and non_null(paths["limit"]) is int and non_null(paths["cap"]) is int
    spec = field_paths()  # the trial spec's, as --set, sweep spaces and analysis columns use them
    assert spec["train.lr"] is float and spec["prune.levels"] is int and spec["dataset.augment"] is bool
    assert spec["prune.output_rate"] == Optional[float]
    assert spec["prune.layer_rates"] == tuple[tuple[str, float], ...]
    assert set(spec) >= {"model.name", "seed", "device"} and not any(isinstance(t, str) for t in spec.values())


def test_describe_says_how_a_type_is_written():
    assert describe(Optional[int]) == "an integer, or null"
    assert describe(tuple[float, ...]) == "a list of numbers"
    assert describe(Literal["a", "b"]) == "one of a, b"


def test_the_trial_spec_is_built_by_the_same_machinery():
    spec = build(TrialSpec, {"model": "conv2", "dataset": "cifar10", "train": {"milestones": [10]}})
    assert spec.model.name == "conv2" and spec.train.milestones == (10,)
    with pytest.raises(ConfigError, match="^train.milestones: 'x' is not allowed; expected an integer$"):
        build(TrialSpec, {"train": {"milestones": ["x"]}})


# ---------------------------------------------------------------- the sweep file, by the same machinery

SWEEP = {"name": "s", "experiment": "e", "base": {"preset": "lenet_digits_quick"}}


@pytest.mark.parametrize("data,key,allowed", [
    ({"name": "a b"}, "name", "a name of letters"),
    ({"seeds": "three"}, "seeds", "a count from 1 to 10,000, or a list of at most 10,000 distinct seeds >= 0"),
    ({"seeds": [1, 1]}, "seeds", "distinct"),
    ({"max_concurrent": 0}, "max_concurrent", "an integer >= 1, or null for no limit"),
    ({"max_failures": -1}, "max_failures", "an integer >= 0"),
    ({"tolerance": "small"}, "tolerance", "expected a number"),
    ({"resources": {"cpu": 0}}, "resources.cpu", "a number > 0"),
    ({"resources": {"gpu": 1.5}}, "resources.gpu", "a fraction <= 1 or a whole number"),
    ({"search": {"algorithm": "random", "num_samples": 0}}, "search.num_samples", "an integer from 1 to 10,000"),
    ({"search": {"mode": ["max", "min"]}}, "search.mode", "for each of the 1 metric(s)"),
    ({"search": {"metric": ["final_test_acc", "nope"]}}, "search.metric", "allowed: dense_test_acc, final_test_acc"),
    ({"space": ["prune.rate"]}, "space", "a mapping of trial-spec paths to distributions"),
    ({"stop_when_not_matching": "no"}, "stop_when_not_matching", "expected true or false"),
])
def test_sweep_file_refusals(tmp_path, data, key, allowed):
    from orchestrator.sweep_spec import parse_sweep

    with pytest.raises(ConfigError) as info:
        parse_sweep({**SWEEP, **data}, tmp_path)
    assert info.value.key == key and allowed in info.value.allowed, str(info.value)


def test_sweep_file_types_defaults_and_round_trip(tmp_path):
    from orchestrator.sweep_spec import parse_sweep

    sweep = parse_sweep({**SWEEP, "seeds": [3, 1], "resources": {"cpu": 2, "gpu": 0.5}, "storage": "runs",
                         "search": {"algorithm": "optuna", "metric": ["final_test_acc", "matching_density"]},
                         "space": {"prune.rate": {"uniform": [0.1, 0.3]}}}, tmp_path)
    assert sweep.seeds == (3, 1) and sweep.resources == {"cpu": 2.0, "gpu": 0.5}
    assert sweep.search.mode == ("max", "min") and sweep.search.num_samples == 1  # defaults by metric
    assert sweep.storage == str(tmp_path / "runs")
    assert parse_sweep(sweep.to_dict(), tmp_path.parent).to_dict() == sweep.to_dict()
    grid = parse_sweep({**SWEEP, "search": {"metric": "final_density"}}, tmp_path)
    assert grid.search.metric == ("final_density",) and grid.search.mode == ("min",)
    assert "num_samples" not in grid.to_dict()["search"] and grid.seeds == (0,)


def test_logged_params_come_back_as_the_spec_types_them():
    from typing import Optional

    from trials.spec import field_paths
    from trials.core.typed import from_logged

    types = field_paths()
    assert from_logged("3", types["seed"]) == 3 and isinstance(from_logged("3", types["seed"]), int)
    assert from_logged("0.25", types["prune.rate"]) == 0.25
    assert from_logged("None", types["prune.output_rate"]) is None and from_logged(float("nan"), float) is None
    assert from_logged("[100, 200]", types["train.milestones"]) == (100, 200)
    assert from_logged('{"fc1": 0.3}', types["prune.layer_rates"]) == {"fc1": 0.3}
    assert from_logged("False", types["dataset.augment"]) is False
    assert from_logged("structured", types["prune.kind"]) == "structured"
    assert from_logged("1e-3", Optional[float]) == 0.001
