"""The work a sweep needs, before anything runs (`lth sweep plan`, and the units the
driver hands its broker; ARCHITECTURE.md, "Shared work").

Counted in optimizer iterations, from the specs alone (a trial that stops early with
stop_when_not_matching, or a rerun after a failure, changes the real count):

    without sharing  each IMP trial: T (dense) + L x (T - k); a control also reruns IMP
    with sharing     each dense run once per dense key (all its rewind points kept in one
                     run), each trunk level once per trunk key, and each control's own
                     L x (T - k); edge-popup trials are never shared; a trial that prunes
                     at init shares its dense run and trains its own L x (T - k)

Grid sweeps are planned exactly. Random/Optuna searches pick their configurations as
they run: the plan draws `num_samples` configurations at random from the space to estimate.

Packs (`pack: K`, trials/runner/levels.py run_pack): a grid's trials are grouped by packing.pack_key (what
members must share); each group is cut into packs of at most K, balanced (20 trials at
K=16: two packs of 10, which finish together), members that share an IMP trunk, then a
dense run, side by side and cut apart only where balance leaves no choice (a unit is then
trained once inside the pack, and no pack waits for another's). Trials that cannot be
packed (a model without stacked layers) run as packs of one, and so does every trial of a
sweep without packs.
Each pack becomes a Tune trial's config once, here (tune_config): its members' specs,
how they train and the units they use, so that a worker decides nothing. A grid's specs
are those its sweep built and validated at load (Sweep.trials): planning builds none again.
`pack: auto` sizes K from an estimate of a member's memory (member_bytes) and
LTH_PACK_MEMORY_GB (default 4) of the trial's device, at most PACK_LIMIT (32 on CPU, 128 on CUDA).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from orchestrator.config import spec_at
from orchestrator.sweeps.packs import PACK, data_key
from trials.folder import layout
from trials import methods
from trials.core.errors import env_number
from trials.spec import flatten, sharing


@dataclass
class Unit:
    name: str
    iterations: int
    deps: list
    spec: object  # a TrialSpec that uses it (control none): what a helper trains it from
    users: int = 0
    points: set = field(default_factory=set)
    first: int = 0  # the index, in work_units' specs, of the spec it is `spec` of (as IMP)


@dataclass
class Plan:
    trials: list  # TrialSpecs
    units: dict  # name -> Unit, breadth-first: every dense run, then every level 1, ...
    own: int  # iterations trained by the trials themselves (controls' levels, edge-popup)
    unshared: int  # iterations without sharing
    estimated: bool  # configurations drawn at random (random/optuna search)

    @property
    def shared(self) -> int:
        return self.own + sum(u.iterations for u in self.units.values())


def trials_of(sweep) -> tuple[list, bool]:
    """(config: varied paths and seed, TrialSpec) of every trial the sweep runs (grid: the
    specs its load built, Sweep.trials), or of a random draw of them (random/optuna: drawn
    and built once per Sweep); whether drawn."""
    if sweep.search.algorithm == "grid":
        return sweep.trials, False

    def drawn():
        draw = random.Random(sweep.search.seed)
        configs = [{d.path: _draw(d, draw) for d in sweep.space} for _ in range(sweep.search.num_samples)]
        return [(c, spec_at(sweep.base, c)) for c in ({**c, "seed": s} for c in configs for s in sweep.seeds)]

    return sweep.cached("drawn", drawn), True


def trial_configs(sweep) -> tuple[list, bool]:
    """Every trial's config (varied paths and seed): trials_of() without the specs."""
    made, estimated = trials_of(sweep)
    return [c for c, _ in made], estimated


def trial_specs(sweep) -> tuple[list, bool]:
    made, estimated = trials_of(sweep)
    return [spec for _, spec in made], estimated


# members of a `pack: auto` pack at most: where bench/packed.py found packs still paying
# (README, "Speed")
PACK_LIMIT = {"cpu": 32, "cuda": 128}


def member_bytes(spec) -> int:
    """A rough size of one pack member in float32: its parameters eight times (weights,
    gradient, two optimizer moments, mask, best weights, rewind point, final copy) and its
    activations three times per training example (output, saved input, gradient) plus once
    per evaluation example."""
    import torch

    from trials.nets import datasets, models
    from trials.nets.datasets import EVAL_BATCH

    info = datasets.info(spec.dataset)
    net = models.shell(spec.model.name, info.shape, info.num_classes, spec.model.width)
    sizes: list = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel()))
             for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net.eval()(torch.zeros(1, *info.shape, device="meta"))  # a shell: shapes only
    for h in hooks:
        h.remove()
    params = sum(p.numel() for p in net.parameters())
    return 4 * (8 * params + (3 * spec.train.batch_size + EVAL_BATCH) * sum(sizes))


def pack_size(sweep, spec) -> int:
    """K for trials like `spec`: the sweep's `pack`, or for "auto" what fits the budget."""
    if sweep.pack != "auto":
        return sweep.pack
    budget = env_number("LTH_PACK_MEMORY_GB", 4.0) * 2**30
    limit = PACK_LIMIT["cuda" if spec.device.startswith("cuda") else "cpu"]  # "auto" may land on a CPU
    return max(1, min(limit, int(budget // member_bytes(spec))))


def pack_of(sweep) -> int:
    """Trials per Tune trial of a searched sweep (its base spec sizes `pack: auto`)."""
    from trials.spec import from_dict

    return pack_size(sweep, from_dict(sweep.base)) if sweep.packed else 1


def packs(sweep, configs: list | None = None) -> list[dict]:
    """The grid's trials as Tune trials' configs (module doc, tune_config): packable groups
    first, cut into balanced packs, then packs of one. `configs`: those trials only (their
    specs built here), else every trial of the grid (the specs its load built)."""
    return [tune_config(sweep, p) for p in _packed(sweep, configs)]


def _packed(sweep, configs: list | None = None) -> list[list]:
    """packs(), each pack as its (config, TrialSpec, packing.pack_key) triples."""
    from trials.spec.packing import pack_key

    made = sweep.trials if configs is None else [(c, spec_at(sweep.base, c)) for c in configs]
    groups: dict = {}
    alone = []
    for c, spec in made:
        key = pack_key(spec)
        if key is None:
            alone.append([(c, spec, key)])
        else:
            groups.setdefault(key, []).append((c, spec, key))
    out = []
    for key, members in groups.items():
        # stable: grid order within a dense run, and within it a trunk (a control beside its ticket)
        names = {id(m): (sharing.dense_name(m[1]), sharing.trunk_name(m[1])) for m in members}  # named once
        members.sort(key=lambda m: names[id(m)])
        out += cut(members, pack_size(sweep, members[0][1]), lambda m: names[id(m)][1], lambda m: names[id(m)][0])
    return out + alone


def cut(members: list, k: int, *runs) -> list[list]:
    """`members` (sorted) in ceil(n / k) balanced packs (their sizes differ by one at most:
    20 at k=16 make two of 10, which finish together). Where a pack may end one member
    earlier or later, it ends where fewer runs are split: `runs` are functions of a
    member, most important first (a trunk, then a dense run), members in a run side by side."""
    n = math.ceil(len(members) / k)
    low, high = len(members) // n, -(-len(members) // n)
    out, start = [], 0
    for i in range(1, n):
        left = n - i  # packs after this one

        def score(end):
            split = [run(members[end - 1]) == run(members[end]) for run in runs]
            return (*split, abs(end - round(i * len(members) / n)))

        ends = [start + size for size in sorted({low, high})
                if left * low <= len(members) - start - size <= left * high]
        end = min(ends, key=score)
        out.append(members[start:end])
        start = end
    return out + [members[start:]]


# the arithmetics' names in a Tune config (trials/runner/levels.py ARITHMETICS; the planner does not import the engine)
ALONE, STACKED = "alone", "stacked"


def tune_config(sweep, members: list) -> dict:
    """A Tune trial's config (ARCHITECTURE.md, "Packs in sweeps"; its layout:
    orchestrator/sweeps/packs.py), from (config, TrialSpec, packing.pack_key) triples: built
    once here, never again on a worker. Members sharing a pack key train together,
    "stacked" in sweeps with packs; the others (and every trial of a sweep without packs)
    alone, with a single trial's arithmetic. Each group names its data (data_key) and, in a
    searched sweep that shares units, the units its members use (registrations): a grid's
    units are all registered with the broker by the driver up front (runner._share)."""
    groups: dict = {}
    for i, (_, _, key) in enumerate(members):
        groups.setdefault(i if key is None else key, []).append(i)
    searched = sweep.share and sweep.search.algorithm != "grid"
    return {PACK: {
        "trials": [{"config": c, "spec": spec.to_dict(), "key": spec.key} for c, spec, _ in members],
        "groups": [{"members": ids, "arithmetic": STACKED if sweep.packed and not isinstance(key, int) else ALONE,
                    "data": data_key(members[ids[0]][1]),
                    "units": pack_units([members[i][1] for i in ids], ids) if searched else []}
                   for key, ids in groups.items()]}}


def pack_units(specs: list, ids: list) -> list[dict]:
    """The units of a pack's members `specs` (its members `ids`) as its config carries them
    (orchestrator/sweeps/packs.py registrations): each unit's spec named by the member it
    is trained as (as IMP), not copied into the config (Tune keeps the config in every result)."""
    return [{"name": u.name, "deps": u.deps, "member": ids[u.first], "points": sorted(u.points)}
            for u in work_units(specs).values()]


def searched_pack(sweep, configs: list) -> dict:
    """The Tune config of a pack a search proposed (its configurations may not all train
    together): each spec built and validated here, once."""
    from trials.spec.packing import pack_key

    specs = [spec_at(sweep.base, c) for c in configs]
    return tune_config(sweep, [(c, spec, pack_key(spec)) for c, spec in zip(configs, specs)])


def _draw(d, draw: random.Random):
    if d.discrete:
        return draw.choice(d.values)
    low, high = d.values
    if d.kind == "int":
        return draw.randint(low, high)
    if d.kind == "loguniform":
        import math

        return math.exp(draw.uniform(math.log(low), math.log(high)))
    return draw.uniform(low, high)


def trial_cost(spec) -> tuple[int, int]:
    """(iterations of its shareable IMP trunk incl. the dense run, of its own levels)."""
    t = spec.train.iterations
    if not sharing.shareable(spec):
        return 0, t * (spec.last_level + 1)
    levels = spec.prune.levels * (t - spec.rewind_iteration)
    if not sharing.shares_levels(spec):  # pruning at init: the dense run is shared, its levels are its own
        return t, levels
    trunk = t + levels
    own = 0 if spec.control == "none" else levels
    return trunk, own


@dataclass
class Totals:
    """What the sweep plans, as `lth sweep plan`, `lth sweep status` and the live line all
    count it (orchestrator/sweeps/progress.py): trials, their levels, the iterations of
    those levels (each trial's own, once, however trained: level_iterations) and shared units."""
    trials: int
    levels: int
    iterations: int
    units: int


def level_iterations(spec) -> list[int]:
    """The iterations of each of a trial's levels as it records them: level 0 T, each
    later level T - k (edge-popup: T per density)."""
    t = spec.train.iterations
    if not methods.of(spec).rewinds:
        return [t] * (spec.last_level + 1)
    return [t] + [t - spec.rewind_iteration] * spec.last_level


def totals(sweep, p: "Plan | None" = None) -> Totals:
    p = p or plan(sweep)
    per = [level_iterations(spec) for spec in p.trials]
    return Totals(len(p.trials), sum(map(len, per)), sum(map(sum, per)), len(p.units))


def plan(sweep) -> Plan:
    """The sweep's plan, made once per Sweep (Sweep.cached): `lth sweep plan`, the driver's
    broker and its progress line all read the same."""
    return sweep.cached("plan", lambda: _plan(sweep))


def _plan(sweep) -> Plan:
    specs, estimated = trial_specs(sweep)
    own = unshared = 0
    for spec in specs:
        trunk, mine = trial_cost(spec)
        unshared += trunk + mine
        own += trunk + mine if not sweep.share or not sharing.shareable(spec) else mine
    return Plan(specs, work_units(specs) if sweep.share else {}, own, unshared, estimated)


def work_units(specs: list) -> dict:
    """name -> Unit of every shareable trial's units, breadth-first: every dense run, then
    every trunk level 1, ... (grid order within a depth: the sort is stable)."""
    units: dict = {}
    for i, spec in enumerate(specs):
        if not sharing.shareable(spec):
            continue
        for u in sharing.plan(spec):
            unit = units.get(u["name"])
            if unit is None:  # its first user's spec, as IMP (a control's is built, once per unit)
                unit = units[u["name"]] = Unit(u["name"], u["iterations"], u["deps"],
                                               spec if spec.control == "none" else spec.replace(control="none"),
                                               first=i)
            unit.users += 1
            if u["name"].startswith("dense/"):
                unit.points.add(spec.rewind_iteration)
    return {u.name: u for u in sorted(units.values(), key=_depth)}


def _depth(u: Unit) -> int:
    return 0 if u.name.startswith("dense/") else layout.level_of(u.name.rsplit("/", 1)[1])


def pack_line(sweep) -> str:
    """What `pack` makes of the sweep (grid: exact; searches: K per Tune trial)."""
    if sweep.search.algorithm != "grid":
        return f"  packs: {pack_of(sweep)} trials per Tune trial, as the search proposes them"
    made = _packed(sweep)
    reasons: dict = {}
    for _, spec, _ in (p[0] for p in made if len(p) == 1):
        why = _why_alone(spec)
        if why:
            reasons[why] = reasons.get(why, 0) + 1
    line = (f"  packs: {sum(map(len, made))} trials in {len(made)} Tune trials, "
            f"{max(len(p) for p in made)} per pack at most")
    return line + "".join(f"; {n} alone: {why}" for why, n in reasons.items())


def _why_alone(spec) -> str:
    """The spec key and value that keep a trial out of packs ("" when it can be packed)."""
    from trials.spec.packing import why_not_packed

    e = why_not_packed(spec)
    return f"{e.key}={e.value}" if e else ""


def registrations(units: dict) -> list[dict]:
    """Units (work_units) as the broker takes them (orchestrator/sweeps/units.py): the
    grid's all up front, a searched configuration's when its trial starts."""
    return [{"name": u.name, "deps": u.deps, "spec": u.spec.to_dict(), "data": data_key(u.spec),
             "points": sorted(u.points)} for u in units.values()]


def _shown(values: dict, path: str):
    """A varied path's value in a flattened spec; a whole section (`model`) by its name."""
    if path in values:
        return values[path]
    inner = {k[len(path) + 1:]: v for k, v in values.items() if k.startswith(path + ".")}
    return inner.get("name", inner)


def describe(sweep, p: Plan) -> str:
    """`lth sweep plan`: the units, who uses them, and what sharing saves (last line)."""
    varied = sweep.varied
    lines = [f"sweep {sweep.name}: {len(p.trials)} trials ({sweep.search.algorithm}"
             + (f", {sweep.search.num_samples} configurations drawn at random to estimate" if p.estimated else "")
             + f"), sharing {'on' if sweep.share else 'off (share: false)'}"]
    if p.units:
        lines.append(f"  {'work unit':<36} {'iterations':>10} {'trials':>6}  what")
    trunks: dict = {}
    for u in p.units.values():
        if u.name.startswith("dense/"):
            what = f"dense run, seed {u.spec.seed}, keeps rewind points {', '.join(map(str, sorted(u.points)))}"
            lines.append(f"  {u.name:<36} {u.iterations:>10,} {u.users:>6}  {what}")
        else:
            trunks.setdefault(u.name.rsplit("/", 1)[0], []).append(u)
    for name, levels in trunks.items():
        spec = levels[0].spec
        values = flatten(spec.to_dict())
        what = " ".join(f"{path}={_shown(values, path)}" for path in varied if path != "control")
        what = f"IMP levels 1-{len(levels)}, seed {spec.seed}" + (f", {what}" if what else "")
        total = sum(u.iterations for u in levels)
        lines.append(f"  {name:<36} {total:>10,} {max(u.users for u in levels):>6}  {what}")
    if p.own:
        lines.append(f"  {'levels trained by their own trial':<36} {p.own:>10,}")
    if sweep.packed:
        lines.append(pack_line(sweep))
    t = totals(sweep, p)
    lines.append(f"plan: {t.trials} trial{'s' * (t.trials != 1)}, {t.levels} levels"
                 + (f", {t.units} shared units" if p.units else "") + f", {t.iterations:,} iterations in the trials' levels")
    saved = 100 * (1 - p.shared / p.unshared) if p.unshared else 0.0
    lines.append(f"to train: {p.shared:,} iterations, {p.unshared:,} without sharing ({saved:.0f}% fewer)")
    return "\n".join(lines)
