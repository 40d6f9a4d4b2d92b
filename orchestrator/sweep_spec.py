"""Sweep files: parsed and validated in full before Ray starts (house rule 10).

A sweep = a base trial spec, a `space` of spec paths to vary, `seeds` replicas of every
configuration, a search algorithm, per-trial resources and where things are stored.
Every trial spec the grid can produce is constructed once here, so a bad combination
fails now with the key that caused it, not hours later on a worker.
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from orchestrator.config import apply_overrides, expand, parse_override, read_yaml
from trials.errors import ConfigError
from trials.spec import field_paths, from_dict

OBJECTIVES = ("final_test_acc", "final_test_acc_at_early_stop", "dense_test_acc", "matching_density",
              "final_density")
ALGORITHMS = ("grid", "random", "optuna")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "int")
TOP_KEYS = ("name", "experiment", "base", "space", "seeds", "search", "resources", "max_concurrent",
            "storage", "tracking_uri", "max_failures", "tolerance", "stop_when_not_matching")
GRID_CHECK_LIMIT = 20000  # combinations constructed at validation; beyond it, a sample is checked


@dataclass(frozen=True)
class Dimension:
    path: str  # a trial-spec path, e.g. "prune.rate"
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # grid/choice values, or (low, high)

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")


@dataclass(frozen=True)
class Search:
    algorithm: str = "grid"
    num_samples: int = 1  # configurations to try (random/optuna); each runs `seeds` times
    metric: tuple = ("final_test_acc",)
    mode: tuple = ("max",)
    seed: int = 0  # the sampler's seed: the same sweep proposes the same configurations


@dataclass(frozen=True)
class Sweep:
    name: str
    experiment: str
    base: dict  # expanded trial-spec dict (preset resolved, paths absolute)
    space: tuple = ()
    seeds: tuple = (0,)
    search: Search = field(default_factory=Search)
    resources: dict = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    max_concurrent: Optional[int] = None
    storage: str = "./runs"
    tracking_uri: str = "sqlite:///mlflow.db"
    max_failures: int = 1
    tolerance: float = 0.005  # accuracy within which a level "matches" its dense level
    stop_when_not_matching: bool = False

    @property
    def varied(self) -> list[str]:
        return [d.path for d in self.space]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["space"] = {dim.path: {dim.kind: list(dim.values)} for dim in self.space}
        d["seeds"] = list(self.seeds)
        d["search"] = {**d["search"], "metric": list(self.search.metric), "mode": list(self.search.mode)}
        if self.search.algorithm == "grid":
            del d["search"]["num_samples"]  # grid runs every combination; the key is refused there
        return d

    def trial_spec(self, values: dict, seed: int):
        """The TrialSpec of one configuration: base + varied values + seed."""
        return config_spec(self.base, {**values, "seed": seed})


def config_spec(base: dict, config: dict):
    """The TrialSpec of a Tune trial's config (spec paths -> values) on top of `base`;
    keys starting with "__" are Tune's own and ignored."""
    overrides = [f"{path}={_yaml_scalar(v)}" for path, v in config.items() if not path.startswith("__")]
    return from_dict(apply_overrides(base, overrides))


def _yaml_scalar(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _check(ok, key, value, allowed):
    if not ok:
        raise ConfigError(key, value, allowed)


def load_sweep(path, overrides=(), name: str | None = None, storage: str | None = None,
               cwd: Path | None = None) -> Sweep:
    data = read_yaml(path, "sweep")
    for text in overrides:
        key, value = parse_override(text)
        _set(data, key, value)
    if name:
        data["name"] = name
    if storage:
        data["storage"] = storage
    return parse_sweep(data, cwd or Path.cwd())


def _set(data: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    if parents and parents[0] == "base":
        data["base"] = apply_overrides(expand(data.get("base") or {}), [f"{'.'.join([*parents[1:], last])}="
                                                                       f"{_yaml_scalar(value)}"])
        return
    if parents and parents[0] == "space":  # --set space.prune.rate='{grid: [0.1, 0.2]}'
        data.setdefault("space", {})[".".join([*parents[1:], last])] = value
        return
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def parse_sweep(data: dict, cwd: Path) -> Sweep:
    _check(isinstance(data, dict), "sweep", data, "a YAML mapping")
    unknown = [k for k in data if k not in TOP_KEYS]
    _check(not unknown, unknown[0] if unknown else "", data.get(unknown[0]) if unknown else None,
           f"unknown key; known keys: {', '.join(TOP_KEYS)}")
    for key in ("name", "experiment"):
        _check(isinstance(data.get(key), str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", data[key]),
               key, data.get(key), "a name of letters, digits, '.', '_' or '-'")
    base = _base(data.get("base"), cwd)
    space = tuple(_dimension(path, entry, cwd) for path, entry in (data.get("space") or {}).items())
    sweep = Sweep(
        name=data["name"], experiment=data["experiment"], base=base, space=space,
        seeds=_seeds(data.get("seeds", 1)), search=_search(data.get("search") or {}, space),
        resources=_resources(data.get("resources") or {}),
        max_concurrent=_optional_int(data, "max_concurrent", 1),
        storage=resolve_storage(data.get("storage", "./runs"), cwd),
        tracking_uri=_tracking_uri(data.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
                                   or "sqlite:///mlflow.db", cwd),
        max_failures=_int(data, "max_failures", 1, 0),
        tolerance=_number(data, "tolerance", 0.005, 0.0),
        stop_when_not_matching=_bool(data, "stop_when_not_matching", False),
    )
    _check_combinations(sweep)
    return sweep


def _base(base, cwd: Path) -> dict:
    _check(isinstance(base, dict), "base", base, "a trial spec mapping (or {preset: NAME, ...})")
    try:
        expanded = expand(base)
        data_dir = (expanded.get("dataset") or {}).get("data_dir")
        if isinstance(data_dir, str):  # trials run in their own folders: make it absolute now
            expanded["dataset"]["data_dir"] = str((cwd / Path(data_dir).expanduser()).resolve())
        from_dict(expanded)
    except ConfigError as e:
        raise ConfigError(f"base.{e.key}", e.value, e.allowed) from None
    return expanded


def _dimension(path: str, entry, cwd: Path) -> Dimension:
    key = f"space.{path}"
    known = field_paths()
    _check(path in known or path in ("model", "dataset"), key, entry,
           f"not a trial-spec path; known paths: {', '.join(known)}")
    _check(path != "seed", key, entry, "seeds are set by the top-level `seeds:` key")
    _check(isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in DISTRIBUTIONS, key, entry,
           "one of {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, "
           "{int: [lo, hi]}")
    kind, values = next(iter(entry.items()))
    _check(isinstance(values, list) and values, f"{key}.{kind}", values, "a non-empty list")
    if kind in ("grid", "choice"):
        if path == "dataset.data_dir":
            values = [str((cwd / Path(v).expanduser()).resolve()) if isinstance(v, str) else v for v in values]
        return Dimension(path, kind, tuple(values))
    _check(len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
           f"{key}.{kind}", values, "[low, high] numbers")
    low, high = values
    _check(low <= high, f"{key}.{kind}", values, "low <= high")
    _check(kind != "loguniform" or low > 0, f"{key}.{kind}", values, "low > 0 for loguniform")
    _check(kind != "int" or all(isinstance(v, int) for v in values), f"{key}.{kind}", values, "integers")
    return Dimension(path, kind, (low, high))


def _seeds(seeds) -> tuple:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        _check(seeds >= 1, "seeds", seeds, "a count >= 1 or a list of seeds")
        return tuple(range(seeds))
    _check(isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
           and len(set(seeds)) == len(seeds), "seeds", seeds, "a count >= 1 or a list of distinct seeds >= 0")
    return tuple(seeds)


def _search(data: dict, space) -> Search:
    known = ("algorithm", "num_samples", "metric", "mode", "seed")
    unknown = [k for k in data if k not in known]
    _check(not unknown, f"search.{unknown[0]}" if unknown else "", data.get(unknown[0]) if unknown else None,
           f"unknown key; known: {', '.join(known)}")
    algorithm = data.get("algorithm", "grid")
    _check(algorithm in ALGORITHMS, "search.algorithm", algorithm, f"allowed: {', '.join(ALGORITHMS)}")
    metric = data.get("metric", "final_test_acc")
    metric = tuple(metric) if isinstance(metric, list) else (metric,)
    for m in metric:
        _check(m in OBJECTIVES, "search.metric", m, f"allowed: {', '.join(OBJECTIVES)}")
    mode = data.get("mode", ["max" if m != "matching_density" and m != "final_density" else "min"
                             for m in metric])
    mode = tuple(mode) if isinstance(mode, list) else (mode,)
    _check(len(mode) == len(metric) and all(m in ("max", "min") for m in mode), "search.mode", list(mode),
           f"max or min for each of the {len(metric)} metric(s)")
    _check(len(metric) in (1, 2), "search.metric", list(metric), "one objective, or two (a Pareto front)")
    num_samples = data.get("num_samples", 1)
    _check(isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1,
           "search.num_samples", num_samples, "an integer >= 1")
    if algorithm == "grid":
        continuous = [d.path for d in space if not d.discrete]
        _check(not continuous, f"space.{continuous[0]}" if continuous else "", None,
               "grid search needs grid/choice values here; use search.algorithm random or optuna")
        _check("num_samples" not in data, "search.num_samples", num_samples,
               "not used by grid search (every combination runs once per seed)")
    seed = data.get("seed", 0)
    _check(isinstance(seed, int) and seed >= 0, "search.seed", seed, "an integer >= 0")
    return Search(algorithm, num_samples, metric, mode, seed)


def _resources(data: dict) -> dict:
    unknown = [k for k in data if k not in ("cpu", "gpu")]
    _check(not unknown, f"resources.{unknown[0]}" if unknown else "", data.get(unknown[0]) if unknown else None,
           "unknown resource; known resources: cpu, gpu")
    out = {"cpu": data.get("cpu", 1), "gpu": data.get("gpu", 0)}
    for k, v in out.items():
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, f"resources.{k}", v,
               "a number >= 0 (fractions allowed, e.g. 0.25)")
        _check(v <= 1 or float(v).is_integer(), f"resources.{k}", v, "a fraction <= 1 or a whole number")
    _check(out["cpu"] > 0, "resources.cpu", out["cpu"], "a number > 0")
    return {k: float(v) for k, v in out.items()}


def _optional_int(data, key, low):
    v = data.get(key)
    _check(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= low), key, v,
           f"an integer >= {low}, or null for no limit")
    return v


def _int(data, key, default, low):
    v = data.get(key, default)
    _check(isinstance(v, int) and not isinstance(v, bool) and v >= low, key, v, f"an integer >= {low}")
    return v


def _number(data, key, default, low):
    v = data.get(key, default)
    _check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= low, key, v, f"a number >= {low}")
    return float(v)


def _bool(data, key, default):
    v = data.get(key, default)
    _check(isinstance(v, bool), key, v, "true or false")
    return v


def resolve_storage(value, cwd: Path) -> str:
    _check(isinstance(value, str) and value, "storage", value, "a folder path or an s3:// / gs:// URI")
    if re.match(r"^[a-z][a-z0-9+.-]*://", value):
        _check(value.split("://")[0] in ("s3", "gs", "file"), "storage", value,
               "a local/NFS path, s3://bucket/prefix or gs://bucket/prefix")
        return value.removeprefix("file://") if value.startswith("file://") else value
    return str((cwd / Path(value).expanduser()).resolve())


def _tracking_uri(value, cwd: Path) -> str:
    _check(isinstance(value, str) and re.match(r"^(sqlite:///|https?://|postgresql|mysql)", value or ""),
           "tracking_uri", value, "sqlite:///PATH.db, http(s)://HOST:PORT or a database URI")
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return "sqlite:///" + str((cwd / value[len("sqlite:///"):]).resolve())
    return value


def _check_combinations(sweep: Sweep) -> None:
    """Construct the spec of every grid combination (continuous dimensions at both ends)."""
    discrete = [d for d in sweep.space if d.discrete]
    continuous = [d for d in sweep.space if not d.discrete]
    ends = [{d.path: d.values[0] for d in continuous}]
    ends += [{**ends[0], d.path: d.values[1]} for d in continuous]
    combos = itertools.islice(itertools.product(*[d.values for d in discrete]), GRID_CHECK_LIMIT)
    for combo in combos:
        for end in ends:
            values = {**dict(zip([d.path for d in discrete], combo)), **end}
            try:
                sweep.trial_spec(values, sweep.seeds[0])
            except ConfigError as e:
                varied = e.key in values or (e.key.endswith(".name") and e.key[:-5] in values)
                where = f"space.{e.key}" if varied else f"base.{e.key}"
                combo_text = ", ".join(f"{k}={v}" for k, v in values.items())
                raise ConfigError(where, e.value, f"{e.allowed} (in combination {combo_text})") from None
