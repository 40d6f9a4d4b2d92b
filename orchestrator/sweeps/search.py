"""Search: the sweep's space as Ray Tune / Optuna objects. Optuna lives here only.

grid    every combination of the grid values x every seed (Tune's grid_search).
random  Optuna's RandomSampler; optuna: Optuna's TPE (multi-objective when two metrics).
        Both persist their study in an SQLite file next to the sweep under a unique
        study name, so `lth sweep resume` continues the same study. Grid values in the
        space become categorical choices.

Seeds replicate a configuration: `Replicate` asks the sampler once per configuration,
runs it under every seed, and tells the sampler the seed-mean of each objective. A
configuration stopped by `stop_when_not_matching` is told as PRUNED (no value), one
whose every seed failed as FAIL. With packs (orchestrator/sweeps/packs.py) a Tune trial
runs `pack` of these trials (configurations x seeds, in order; one without packs): the
sampler is asked for configurations until the pack is full, K at a time when there is one
seed. The driver builds the pack's typed specs and groups here, as it does a grid's.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np
from ray import tune
from ray.tune.search import Searcher

from orchestrator.objectives import STOPPED
from orchestrator.sweeps.packs import FAILED, PACK, statuses


def grid_space(sweep) -> dict:
    """One Tune trial per pack (orchestrator/plan.py packs; packs of one without `pack`), of
    the specs the sweep's load built (Sweep.trials)."""
    from orchestrator.plan import packs

    return {PACK: tune.grid_search([c[PACK] for c in packs(sweep)])}


def optuna_distributions(sweep) -> dict:
    import optuna.distributions as od

    out = {}
    for d in sweep.space:
        low, high = (d.values + (None, None))[:2]
        out[d.path] = {
            "grid": lambda: od.CategoricalDistribution(list(d.values)),
            "choice": lambda: od.CategoricalDistribution(list(d.values)),
            "uniform": lambda: od.FloatDistribution(low, high),
            "loguniform": lambda: od.FloatDistribution(low, high, log=True),
            "int": lambda: od.IntDistribution(low, high),
        }[d.kind]()
    return out


def make_searcher(sweep, study_name: str, study_path: Optional[Path],
                  mirror: Optional[str] = None) -> Optional[Searcher]:
    """None for grid (Tune expands the grid itself), else a seed-replicating Optuna search."""
    if sweep.search.algorithm == "grid":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.RandomSampler(seed=sweep.search.seed) if sweep.search.algorithm == "random"
               else optuna.samplers.TPESampler(seed=sweep.search.seed))
    metric, mode = list(sweep.search.metric), list(sweep.search.mode)
    inner = OptunaSearch(
        space=optuna_distributions(sweep),
        metric=metric if len(metric) > 1 else metric[0],
        mode=mode if len(mode) > 1 else mode[0],
        sampler=sampler,
        study_name=study_name,
        storage=optuna.storages.RDBStorage(f"sqlite:///{study_path}"),
    )
    from orchestrator.plan import pack_of

    return Replicate(inner, sweep, metric, (str(study_path), mirror) if mirror else None, pack=pack_of(sweep))


def num_trials(sweep) -> int:
    """Tune's num_samples: grid runs its expansion once; samplers run configurations x
    seeds, in packs of pack_size (the searcher ends the search after num_samples configurations)."""
    if sweep.search.algorithm == "grid":
        return 1
    from orchestrator.plan import pack_of

    return -(-sweep.search.num_samples * len(sweep.seeds) // pack_of(sweep))


def mirror_study(local: str, remote: str) -> None:
    """A consistent copy of the study's SQLite file (sqlite3's backup) to `remote`."""
    import sqlite3
    import tempfile

    from orchestrator.sweeps.storage import write_bytes

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "study.db"
        source, target = sqlite3.connect(local), sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
        write_bytes(remote, copy.read_bytes())


def _number(value) -> float:
    """An objective as a float: NaN where it was not measured (None), so nanmean skips it."""
    return np.nan if value is None else float(value)


class Replicate(Searcher):
    def __init__(self, inner: Searcher, sweep, metrics: list, mirror: Optional[tuple] = None, pack: int = 1):
        """`mirror`: (the study's SQLite file, a storage path to copy it to at every save).
        `pack`: trials per Tune trial (orchestrator/sweeps/packs.py): the sampler is asked
        for configurations until a pack is full, at most the sweep's num_samples in all."""
        super().__init__(metric=None, mode=None)
        self.inner, self.sweep, self.seeds, self.metrics, self.mirror = inner, sweep, list(sweep.seeds), metrics, mirror
        self.pack, self.limit, self.asked = pack, sweep.search.num_samples, 0
        self.groups: dict = {}  # primary trial id -> {"config", "members": {trial_id: result|None}}
        self.member_of: dict = {}  # trial id -> primary trial id
        self.open: Optional[str] = None  # the group still handing out seeds
        self.packs: dict = {}  # pack's Tune trial id -> its members' ids here (the sampler's trials' own)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the inner searcher was configured at construction

    def suggest(self, trial_id: str) -> Optional[dict]:
        """A Tune trial's config: a pack of the next trials (orchestrator/plan.py searched_pack)."""
        from orchestrator.plan import searched_pack

        configs, ids = [], []
        for j in range(self.pack):
            config = self._trial(f"{trial_id}_{j:02d}")
            if config is None or config == Searcher.FINISHED:
                break
            configs.append(config)
            ids.append(f"{trial_id}_{j:02d}")
        if not configs:
            return config
        self.packs[trial_id] = ids
        return searched_pack(self.sweep, configs)

    def _trial(self, trial_id: str) -> Optional[dict]:
        if self.open is None or len(self.groups[self.open]["members"]) == len(self.seeds):
            if self.limit is not None and self.asked >= self.limit:
                return Searcher.FINISHED
            config = self.inner.suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                return config
            self.asked += 1
            self.open = trial_id
            self.groups[trial_id] = {"config": config, "members": {}}
        group = self.groups[self.open]
        seed = self.seeds[len(group["members"])]
        group["members"][trial_id] = "running"
        self.member_of[trial_id] = self.open
        return {**group["config"], "seed": seed}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # the sampler sees one aggregated result per configuration

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        ids = self.packs.get(trial_id, [])
        for member, state in zip(ids, statuses(result, len(ids))):
            failed = error or not state or state.get("status") == FAILED
            self._complete(member, None if failed else state, failed)

    def _complete(self, trial_id: str, result: Optional[dict], error: bool) -> None:
        primary = self.member_of.get(trial_id)
        if primary is None:
            return
        members = self.groups[primary]["members"]
        members[trial_id] = {"error": True} if error or not result else result
        if len(members) < len(self.seeds) or any(r == "running" for r in members.values()):
            return
        done = [r for r in members.values() if not r.get("error")]
        if not done:
            self.inner.on_trial_complete(primary, None, error=True)
        elif any(r.get(STOPPED) for r in done):
            self.inner.on_trial_complete(primary, {"done": True}, error=False)  # no value: PRUNED
        else:
            mean = {m: float(np.nanmean([_number(r.get(m)) for r in done])) for m in self.metrics}
            self.inner.on_trial_complete(primary, mean, error=False)

    # Tune keeps one searcher-state file per experiment: the wrapped OptunaSearch's state
    # (its __dict__, which is what OptunaSearch.save pickles) travels inside ours.
    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k != "inner"}
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"replicate": state, "inner": self.inner.__dict__.copy()}, f)
        if self.mirror:
            mirror_study(*self.mirror)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.__dict__.update(state["replicate"])
        self.inner.__dict__.update(state["inner"])
