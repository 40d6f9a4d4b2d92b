"""Sweep files: parsed and validated in full before Ray starts, so a bad file costs no
cluster time.

A sweep = a base trial spec, a `space` of spec paths to vary, `seeds` replicas of every
configuration, a search algorithm, per-trial resources and where things are stored.
The file is read by trials/core/typed.py, the machinery that reads trial specs: the
dataclasses below declare each key's type and rules. What plain typing cannot say
(seeds, the space, paths resolved against the working directory, the base spec, the
grid/continuous rule) is done by the explicit functions after them. Every trial spec
a grid runs is constructed and validated here, once, so a bad combination fails now with
the key that caused it, not hours later on a worker; the planner, the driver and the
workers use these specs (Sweep.trials) and never build them again.
"""
from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Union

from orchestrator.config import apply_overrides, expand, parse_override, read_yaml, spec_at, unknown_key
from orchestrator.objectives import MINIMISED, NEEDS_STABILITY, OBJECTIVES
from trials.core.errors import ConfigError, check, shown
from trials.spec import field_paths, from_dict
from trials.core.typed import Rule, above, at_least, build, coerce, option

Objective = Literal[OBJECTIVES]  # the keys of orchestrator.objectives.summarise
Mode = Literal["max", "min"]
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "int")
GRID_CHECK_LIMIT = 20000  # combinations constructed at validation; beyond it, a sample is checked
# A name is a folder (STORAGE/NAME, mlartifacts/EXPERIMENT) and part of file names (the
# study's NAME-xxxxxxxx.db): one path component, 255 bytes on common file systems, with room left.
NAME_MAX = 200
NAME = Rule(lambda v: len(v) <= NAME_MAX and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) is not None,
            f"a name of letters, digits, '.', '_' or '-', at most {NAME_MAX} characters")
SLOT = Rule(lambda v: v <= 1 or float(v).is_integer(), "a fraction <= 1 or a whole number")  # Ray's rule


@dataclass(frozen=True)
class Dimension:
    path: str  # a trial-spec path, e.g. "prune.rate"
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # grid/choice values, or (low, high)

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")


# A sweep's size is bounded before anything is built: every trial's spec is made at load
# (so a bad one is named), and 10^8 seeds or 10^12 samples would exhaust memory first.
MAX_SEEDS = 10_000
MAX_TRIALS = 10_000  # what `lth sweep plan` answers in seconds on 2 cores (README, "Sweeps")


@dataclass(frozen=True)
class Search:
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    # configurations to try (random/optuna; default 1), each run `seeds` times; grid runs them all
    num_samples: Optional[int] = option(None, Rule(lambda v: 1 <= v <= MAX_TRIALS,
                                                   f"an integer from 1 to {MAX_TRIALS:,}"))
    metric: Union[Objective, tuple[Objective, ...]] = ("final_test_acc",)  # kept as a tuple
    mode: Union[Mode, tuple[Mode, ...], None] = None  # kept as a tuple; default: by metric
    seed: int = option(0, at_least(0, "an integer"))  # the sampler's: the same sweep proposes the same

    def __post_init__(self):
        metric = _many(self.metric)
        mode = _many(self.mode) if self.mode is not None else tuple(
            "min" if m in MINIMISED else "max" for m in metric)
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "mode", mode)
        check(len(mode) == len(metric), "mode", list(mode),
              f"max or min for each of the {len(metric)} metric(s)")
        check(len(metric) in (1, 2), "metric", list(metric), "one objective, or two (a Pareto front)")
        check(len(set(metric)) == len(metric), "metric", list(metric), "two different objectives (a Pareto front)")
        if self.algorithm == "grid":
            check(self.num_samples is None, "num_samples", self.num_samples,
                  "not used by grid search (every combination runs once per seed)")
        elif self.num_samples is None:
            object.__setattr__(self, "num_samples", 1)


def _many(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


@dataclass(frozen=True)
class Resources:
    """Per trial; Ray allows fractions of one CPU/GPU (several trials share it)."""

    cpu: float = option(1.0, above(0, "a number"), SLOT)
    gpu: float = option(0.0, at_least(0, "a number (fractions allowed, e.g. 0.25)"), SLOT)


def _seeds(key: str, value) -> tuple:
    """A count (seeds 0..n-1) or a list of distinct seeds."""
    seeds = coerce(key, value, Union[int, tuple[int, ...]])
    if isinstance(seeds, int):
        check(1 <= seeds <= MAX_SEEDS, key, seeds, f"a count from 1 to {MAX_SEEDS:,} or a list of seeds")
        return tuple(range(seeds))
    check(seeds and min(seeds) >= 0 and len(set(seeds)) == len(seeds) and len(seeds) <= MAX_SEEDS, key,
          list(seeds), f"a count >= 1 or a list of at most {MAX_SEEDS:,} distinct seeds >= 0")
    return seeds


def _space(key: str, value) -> tuple:
    entries = coerce(key, {} if value is None else value, dict)
    dims = tuple(_dimension(f"{key}.{path}", path, entry) for path, entry in entries.items())
    for d in dims:  # `model` and `model.name` would each set the model's name: which wins?
        outer = next((o.path for o in dims if d.path.startswith(o.path + ".")), None)
        check(outer is None, f"{key}.{d.path}", entries[d.path],
              f"not varied together with {key}.{outer}, which sets it too (vary one of them)")
    return dims


def _resources(key: str, value) -> dict:
    return asdict(coerce(key, value, Resources))  # a dict, as Ray takes it


@dataclass(frozen=True)
class Sweep:
    name: str = option(MISSING, NAME)
    experiment: str = option(MISSING, NAME)
    base: dict = option(expected="a trial spec mapping (or {preset: NAME, ...})")  # expanded, paths absolute
    space: tuple[Dimension, ...] = option((), parse=_space, expected="a mapping of trial-spec paths to "
                                          "distributions, e.g. {prune.rate: {grid: [0.1, 0.2]}}")
    seeds: tuple[int, ...] = option((0,), parse=_seeds,
                                    expected=f"a count from 1 to {MAX_SEEDS:,}, or a list of at most "
                                             f"{MAX_SEEDS:,} distinct seeds >= 0")
    search: Search = option(factory=Search)
    resources: dict[str, float] = option(factory=lambda: asdict(Resources()), parse=_resources)
    max_concurrent: Optional[int] = option(None, Rule(lambda v: v >= 1,
                                                      "an integer >= 1, or null for no limit"))
    storage: str = "./runs"
    tracking_uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    max_failures: int = option(1, at_least(0, "an integer"))
    tolerance: float = option(0.005, at_least(0))  # accuracy within which a level "matches" its dense level
    stop_when_not_matching: bool = False
    # train each dense run and IMP trunk once, in STORAGE/_units/, for every trial and every
    # later sweep on the same storage (orchestrator/plan.py); false: each trial trains its own
    share: bool = True
    # K trials trained together in one process (trials/runner/levels.py run_pack), one Tune trial per pack;
    # "auto": as many as fit PACK_MEMORY_GB (orchestrator/plan.py pack_size); 1: no packs
    pack: Union[int, Literal["auto"]] = option(1, Rule(lambda v: v == "auto" or v >= 1,
                                                       "an integer >= 1, or auto"))
    # which levels' final weights a trial folder in storage keeps (orchestrator/sweeps/folders.py):
    # "last": the newest level's (rewind + masks + last level: what a ticket needs); "all": every level's
    keep_finals: Literal["last", "all"] = "last"
    # true: every level's tensors (rewind, masks, kept finals) also go to each trial's MLflow run;
    # false: MLflow gets metrics, params, tags and the trial folder's place (`lth tickets best --export` on demand)
    track_tensors: bool = False

    @property
    def varied(self) -> list[str]:
        return [d.path for d in self.space]

    @property
    def trial_count(self) -> int:
        """Trials the sweep runs in all: every grid combination x seed, or num_samples
        configurations x seeds (computed, not built: MAX_TRIALS bounds it before any spec)."""
        if self.search.algorithm != "grid":
            return self.search.num_samples * len(self.seeds)
        return math.prod(len(d.values) for d in self.space if d.discrete) * len(self.seeds)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["space"] = {dim.path: {dim.kind: list(dim.values)} for dim in self.space}
        d["seeds"] = list(self.seeds)
        d["search"] = {**d["search"], "metric": list(self.search.metric), "mode": list(self.search.mode)}
        if self.search.algorithm == "grid":
            del d["search"]["num_samples"]  # grid runs every combination; the key is refused there
        return d

    @property
    def packed(self) -> bool:
        """Whether trials train in packs of more than one (their arithmetic: ARCHITECTURE.md, "Packs in sweeps")."""
        return self.pack != 1

    def trial_spec(self, values: dict, seed: int):
        """The TrialSpec of one configuration: base + varied values + seed, set by path."""
        return spec_at(self.base, {**values, "seed": seed})

    @property
    def trials(self) -> list:
        """(config: varied values and seed, TrialSpec) of every trial a grid sweep runs, in
        grid order (combinations, then seeds): built and validated once per Sweep, at load
        (parse_sweep), however often the planner, the driver and `lth sweep plan` ask."""
        check(self.search.algorithm == "grid", "search.algorithm", self.search.algorithm,
              "grid (a search's trials are the configurations it proposes)")
        return self.cached("trials", lambda: _grid_trials(self, here=False))

    def cached(self, name: str, make):
        """What `make()` derives from this sweep, made once per Sweep object (its trials'
        specs, the plan); never pickled: Tune pickles the callbacks that hold a sweep, and a
        pickled TrialSpec would tie Tune's saved state to this lth's classes."""
        memo = self.__dict__.setdefault("_memo", {})  # a frozen dataclass: not one of its fields
        if name not in memo:
            memo[name] = make()
        return memo[name]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_memo"}


def _yaml_scalar(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def load_sweep(path, overrides=(), name: str | None = None, storage: str | None = None,
               cwd: Path | None = None, here: bool = True) -> Sweep:
    """The sweep file, validated; `here` off (`lth sweep plan`, which trains nothing): what
    only matters to a run on this machine is not checked (a data_dir that exists)."""
    data = read_yaml(path, "sweep")
    for text in overrides:
        key, value = parse_override(text)
        _set(data, key, value)
    if name:
        data["name"] = name
    if storage:
        data["storage"] = storage
    return parse_sweep(data, cwd or Path.cwd(), here)


def _set(data: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    if parents and parents[0] == "base":
        data["base"] = apply_overrides(expand(data.get("base") or {}, "base"), [f"{'.'.join([*parents[1:], last])}="
                                                                       f"{_yaml_scalar(value)}"])
        return
    if parents and parents[0] == "space":  # --set space.prune.rate='{grid: [0.1, 0.2]}'
        data.setdefault("space", {})[".".join([*parents[1:], last])] = value
        return
    node = data
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        check(isinstance(node, dict), f"--set {key}", value,
              f"{'.'.join(parents[:i + 1])} is {shown(node)}, not a mapping with keys to set")
    node[last] = value


def parse_sweep(data: dict, cwd: Path, here: bool = True, trials: bool = True) -> Sweep:
    """A validated Sweep from the file's mapping; relative paths are resolved against `cwd`.
    `trials` off: its trials are not built here (a saved sweep only compared with another)."""
    check(isinstance(data, dict), "sweep", data, "a YAML mapping")
    sweep = build(Sweep, data)
    tracking_uri = sweep.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    sweep = replace(
        sweep, base=_base(sweep.base, cwd), space=tuple(_absolute_dirs(d, cwd) for d in sweep.space),
        storage=resolve_storage(sweep.storage, cwd), tracking_uri=_tracking_uri(tracking_uri, cwd))
    if sweep.search.algorithm == "grid":
        continuous = [d.path for d in sweep.space if not d.discrete]
        check(not continuous, f"space.{continuous[0]}" if continuous else "", None,
              "grid search needs grid/choice values here; use search.algorithm random or optuna")
    if trials:
        _check_combinations(sweep, here)
    return sweep


def _base(base: dict, cwd: Path) -> dict:
    try:
        expanded = expand(base)
        data_dir = (expanded.get("dataset") or {}).get("data_dir")
        if isinstance(data_dir, str):  # trials run in their own folders: make it absolute now
            expanded["dataset"]["data_dir"] = _absolute(data_dir, cwd)
        from_dict(expanded)
    except ConfigError as e:
        raise ConfigError(f"base.{e.key}", e.value, e.allowed) from None
    return expanded


def _dimension(key: str, path: str, entry) -> Dimension:
    known = field_paths()
    check(path in known or path in ("model", "dataset"), key, entry,
          f"not a trial-spec path ({unknown_key(path, known)})")
    check(path != "seed", key, entry, "seeds are set by the top-level `seeds:` key")
    check(isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in DISTRIBUTIONS, key, entry,
          "one of {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, "
          "{int: [lo, hi]}")
    kind, values = next(iter(entry.items()))
    key = f"{key}.{kind}"
    check(isinstance(values, list) and values, key, values, "a non-empty list")
    if kind in ("grid", "choice"):
        return Dimension(path, kind, tuple(values))
    check(len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
          key, values, "[low, high] numbers")
    low, high = values
    check(low <= high, key, values, "low <= high")
    check(kind != "loguniform" or low > 0, key, values, "low > 0 for loguniform")
    check(kind != "int" or all(isinstance(v, int) for v in values), key, values, "integers")
    return Dimension(path, kind, (low, high))


def _absolute_dirs(dim: Dimension, cwd: Path) -> Dimension:
    """Trials run in their own folders: a varied data_dir is made absolute now."""
    if dim.path != "dataset.data_dir":
        return dim
    return replace(dim, values=tuple(_absolute(v, cwd) if isinstance(v, str) else v for v in dim.values))


def _absolute(path: str, cwd: Path) -> str:
    return str((cwd / Path(path).expanduser()).resolve())


def resolve_storage(value, cwd: Path) -> str:
    check(isinstance(value, str) and value, "storage", value, "a folder path or an s3:// / gs:// URI")
    if re.match(r"^[a-z][a-z0-9+.-]*://", value):
        check(value.split("://")[0] in ("s3", "gs", "file"), "storage", value,
               "a local/NFS path, s3://bucket/prefix or gs://bucket/prefix")
        return value.removeprefix("file://") if value.startswith("file://") else value
    return _absolute(value, cwd)


def _tracking_uri(value, cwd: Path) -> str:
    check(isinstance(value, str) and re.match(r"^(sqlite:///|https?://|postgresql|mysql)", value or ""),
           "tracking_uri", value, "sqlite:///PATH.db, http(s)://HOST:PORT or a database URI")
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return "sqlite:///" + str((cwd / value[len("sqlite:///"):]).resolve())
    return value


def _check_measured(sweep: Sweep, spec) -> None:
    """An instability objective needs trials that measure it (trials/methods/stability.py)."""
    for metric in set(sweep.search.metric) & set(NEEDS_STABILITY):
        level = 0 if metric == "dense_instability" else None
        s = spec.stability
        check(s.copies >= 2 and (level is None or not s.levels or level in s.levels), "stability.copies",
              s.copies, f"search.metric {metric} needs instability measured "
              f"{'at level 0' if level == 0 else 'at some level'}: stability.copies >= 2"
              f"{' and stability.levels holding 0 (or [])' if level == 0 else ''}")


def _check_where(sweep: Sweep, spec, here: bool = True) -> None:
    """What a trial would refuse on a worker about where it runs, checked on the driver
    before Ray starts (a worker's refusal would fail every trial, one by one): a data
    folder that does not exist (on a cluster it must be a path every node sees, the
    driver's included), and CUDA without a GPU in the trial's resources."""
    d = spec.dataset.data_dir
    if d and here:
        check(Path(d).expanduser().is_dir(), "dataset.data_dir", d,
              "an existing folder (seen from where lth runs; on a cluster, a path every node shares)")
    check(not spec.device.startswith("cuda") or sweep.resources["gpu"] > 0, "device", spec.device,
          "cpu or auto while resources.gpu is 0 (a trial on CUDA needs resources.gpu > 0)")


def _plain(value) -> str:
    """A combination's value in a message: as written where it prints as one plain line,
    else as `shown` (its repr: a control character never splits the message)."""
    text = str(value)
    return text if text.isprintable() and len(text) <= 60 else shown(value)


def _check_combinations(sweep: Sweep, here: bool = True) -> None:
    """A grid: every trial's spec, built and validated once and kept (Sweep.trials). A
    search: the spec of every combination of its discrete values, each continuous
    dimension at both ends (its trials are built as the search proposes them)."""
    grid = sweep.search.algorithm == "grid"
    check(sweep.trial_count <= MAX_TRIALS, "space" if grid else "search.num_samples",
          f"{sweep.trial_count:,} trials ({'grid combinations' if grid else 'num_samples'} x seeds)",
          f"at most {MAX_TRIALS:,} trials in one sweep")
    if grid:
        sweep.cached("trials", lambda: _grid_trials(sweep, here))
        return
    discrete = [d for d in sweep.space if d.discrete]
    continuous = [d for d in sweep.space if not d.discrete]
    ends = [{d.path: d.values[0] for d in continuous}]
    ends += [{**ends[0], d.path: d.values[1]} for d in continuous]
    combos = itertools.islice(itertools.product(*[d.values for d in discrete]), GRID_CHECK_LIMIT)
    for combo in combos:
        for end in ends:
            _checked(sweep, {**dict(zip([d.path for d in discrete], combo)), **end}, sweep.seeds[0], here)


def _grid_trials(sweep: Sweep, here: bool) -> list:
    """(config, TrialSpec) of every combination x seed of a grid (Sweep.trials)."""
    discrete = [d for d in sweep.space if d.discrete]
    out = []
    for combo in itertools.product(*[d.values for d in discrete]):
        values = dict(zip([d.path for d in discrete], combo))
        for seed in sweep.seeds:
            out.append(({**values, "seed": seed}, _checked(sweep, values, seed, here)))
    return out


def _checked(sweep: Sweep, values: dict, seed: int, here: bool):
    """The validated TrialSpec of one configuration, its sweep-level rules checked; a
    refusal names the key as the sweep file spells it, and the combination."""
    try:
        spec = sweep.trial_spec(values, seed)
        _check_measured(sweep, spec)
        _check_where(sweep, spec, here)
        return spec
    except ConfigError as e:
        varied = e.key in values or (e.key.endswith(".name") and e.key[:-5] in values)
        where = f"space.{e.key}" if varied else f"base.{e.key}"
        combo_text = ", ".join(f"{k}={_plain(v)}" for k, v in values.items())
        raise ConfigError(where, e.value, f"{e.allowed} (in combination {combo_text})" if values
                          else e.allowed) from None
