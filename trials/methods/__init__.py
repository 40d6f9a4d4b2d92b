"""The method registry: what the engine needs to know of each trial method, in one place
(ARCHITECTURE.md, "Methods").

An entry (`Method`) says a method's name and one-line help, what its levels train
(`trains`: "weights" as IMP, or "scores" as edge-popup's supermasks), the spec fields it
reads (`reads`: what its MLflow run logs as params), the member class the level runner
runs it as (`member`, "module:Class"), how a level's mask is drawn (`mask`; for a method
that scores its rewind point, the `scorer` function), where its level count comes from
(`levels`), which of IMP's work it shares in a sweep (`shares`), and the controls,
retraining modes and instability analysis it admits. Spec validation (trials/spec/validate.py),
the spec's `method` type and help (trials/spec/trial_spec.py), the level runner, the planner,
packing, sharing, ticket export and the analysis layer ask this module; outside it and
the methods' own files (trials/methods/at_init.py, trials/methods/supermask.py) no code compares a
method's name to a string.

This module imports nothing heavy: classes and functions are named as "module:attr"
strings and imported when used (`load`), so building or validating a spec never imports
the training loop through it.

Adding a method:
  - A pruning-at-initialization scorer: one function in trials/methods/at_init.py,
        def my_scores(at: at_init.Scoring) -> tuple[scores, keep]   (at.net(), at.top(scores))
    and one line below: `_at_init("my_method", "trials.methods.at_init:my_scores", "help", reads=(...))`,
    `reads` naming the `at_init.*` fields it reads besides `scope`.
  - A new kind of method: one file, trials/methods/my_method.py, with
    its member class (the interface of trials/methods/imp.py Member: job(level) -> a Job of
    trials/loop/training.py, finish(level, job, result, fields) -> LevelRecord, and `trial`), and
    one `register(Method(...))` below naming it. Fields only it reads go into a spec group
    of their own (trials/spec/trial_spec.py), listed in its `reads` and in `OWN_GROUPS`.
The spec's `method` choices are the entries registered here when trials/spec/trial_spec.py is first
imported, so every entry is registered in this module.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal, Optional

from trials.core.registry import Registry

CONTROLS = ("none", "reinit", "random_prune", "shuffle", "invert")
RETRAIN = ("weight_rewind", "lr_rewind", "finetune")
COMMON = ("method", "model.name", "model.width", "dataset", "seed", "control", "device")  # read by every method
OWN_GROUPS = ("supermask", "at_init", "early_bird")  # spec groups that only some methods read


@dataclass(frozen=True)
class Method:
    """One trial method, as the engine needs to know it (module doc)."""

    name: str
    help: str  # one line, for the spec's help text of `method`
    trains: Literal["weights", "scores"]  # what a level trains; a pack holds one kind (trials/spec/packing.py)
    reads: tuple[str, ...]  # spec paths it reads besides COMMON; a group name ("prune") = all its fields
    member: str  # "module:Class" the level runner (trials/runner/levels.py run_pack) runs it as
    mask: Literal["pruned", "scored", "searched", "drawn"]  # level L's mask: pruned from L-1's final weights,
    #   scored at the rewind point (`scorer`), searched (learned scores over fixed weights), or
    #   drawn from the dense run where its mask stabilised (early-bird tickets, trials/methods/early_bird_watch.py)
    levels: Literal["prune.levels", "supermask.densities"]  # how many levels after level 0
    shares: Literal["trunk", "dense", "none"]  # IMP's work it shares in a sweep: the dense run and
    #   the pruned trunk, the dense run only, or nothing (trials/runner/shared.py)
    controls: tuple[str, ...]  # the `control` values it admits
    retrain: tuple[str, ...] = ("weight_rewind",)  # the `retrain` values it admits
    stability: bool = False  # admits instability analysis (stability.copies)
    scorer: Optional[str] = None  # mask="scored": "module:function" (trials/methods/at_init.py Scoring)
    control_trunk: bool = False  # its controls run its own trajectory in OUT/imp/ (trials/methods/controls.py)
    refuses: tuple[str, ...] = ("at_init",)  # spec groups or paths whose fields it does not read are
    #   refused when set (a group it reads none of, or a path it does not read; others are ignored)
    why_not: tuple[tuple[str, str], ...] = ()  # "control=reinit" or "retrain" -> why it is refused
    early_bird: Literal["none", "levels", "dense"] = "none"  # how it reads early_bird.* (trials/methods/early_bird_watch.py):
    #   not at all; "levels": with early_bird.imp_levels each level but the last stops once the next
    #   level's mask has stabilised; "dense": its dense run stops once every level's mask has stabilised

    def why(self, what: str) -> str:
        """" (reason)" of a refused value, or ""."""
        reason = dict(self.why_not).get(what)
        return f" ({reason})" if reason else ""

    @property
    def rewinds(self) -> bool:
        """Levels >= 1 start at the rewind iteration k (T - k iterations); else each trains T."""
        return self.levels == "prune.levels"

    @property
    def dense(self) -> bool:
        """Level 0 is the dense network (an edge-popup level 0 is its densest supermask)."""
        return self.mask != "searched"

    def last_level(self, spec) -> int:
        return len(spec.supermask.densities) - 1 if self.levels == "supermask.densities" else spec.prune.levels

    def reads_path(self, path: str) -> bool:
        """Whether the method reads the flattened spec path `path` (e.g. "prune.rate")."""
        return any(path == r or path.startswith(r + ".") for r in (*COMMON, *self.reads))

    def params(self, flat: dict) -> dict:
        """The entries of a flattened spec (trials/spec/trial_spec.py flatten) that this method reads."""
        return {p: v for p, v in flat.items() if self.reads_path(p)}

    def load(self, what: str = "member") -> Any:
        """The class or function an entry names ("member" or "scorer"), imported now."""
        module, _, attr = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), attr)


METHODS: Registry[Method] = Registry("method", "method")


def register(method: Method) -> Method:
    return METHODS.register(method.name)(method)


def get(name: str) -> Method:
    """The entry of `name`; a miss is a ConfigError naming `method` and every known one."""
    return METHODS.get(name)


def of(spec) -> Method:
    return METHODS.get(spec.method)


def names(**having) -> tuple[str, ...]:
    """The registered names in registration order, of the entries whose attributes equal
    `having` (e.g. names(trains="scores"))."""
    return tuple(n for n, m in METHODS.items() if all(getattr(m, k) == v for k, v in having.items()))


def logged(params: dict) -> dict:
    """The params of a logged trial run (a flattened spec, values as logged) that its method
    reads: runs logged before a run held only those (every field, then) read as runs logged
    since; a run logged before `method` existed is IMP; a method no longer registered keeps all."""
    name = params.get("method", DEFAULT)
    return METHODS[name].params(params) if name in METHODS else dict(params)


def readers(path: str) -> tuple[str, ...]:
    """The methods that read a spec path."""
    return tuple(n for n, m in METHODS.items() if m.reads_path(path))


DEFAULT = "imp"

# ---------------------------------------------------------------- the entries

register(Method(
    "imp", "train weights and prune them (prune.*)", trains="weights",
    reads=("model.init", "train", "prune", "rewind_iteration", "retrain", "stability", "early_bird"),
    member="trials.methods.imp:Member", mask="pruned", levels="prune.levels", shares="trunk",
    controls=CONTROLS, retrain=RETRAIN, stability=True, control_trunk=True, early_bird="levels"))

register(Method(
    "early_bird", "one dense run, stopped once the masks of every level's density have stabilised "
    "(early_bird.*, You et al. 2020); level L trains IMP's level-L count drawn where its mask stabilised, "
    "from the dense weights at k (weight_rewind) or continuing from the draw (finetune)", trains="weights",
    reads=("model.init", "train", "prune", "rewind_iteration", "retrain", "early_bird"),
    member="trials.methods.early_bird:EarlyBird", mask="drawn", levels="prune.levels", shares="none",
    controls=("none", "reinit", "random_prune", "shuffle"), retrain=("weight_rewind", "finetune"),
    control_trunk=True, refuses=("at_init", "supermask"), early_bird="dense",
    why_not=(("control=invert", "invert turns over IMP's ranking of its own trajectory, which an early-bird "
              "ticket does not have"),
             ("retrain", "finetune continues from the early-bird weights"))))

register(Method(
    "edge_popup", "learn a supermask on fixed random weights (supermask.*); it reads train's "
    "batch_size, iterations, eval_interval, precision and fused, not prune.*, rewind_iteration or "
    "model.init", trains="scores",
    reads=("train.batch_size", "train.iterations", "train.eval_interval", "train.precision", "train.fused",
           "supermask"),
    member="trials.methods.supermask:Searcher", mask="searched", levels="supermask.densities", shares="none",
    controls=("none", "random_prune"),
    why_not=(("control=reinit", "a supermask belongs to its fixed weights; for other weights run another seed"),
             ("retrain", "a supermask level never retrains weights"))))

# Pruning at initialization (trials/methods/at_init.py): IMP's level-L counts (prune.rate,
# layer_rates, output_rate, levels) with at_init.scope, scored at the rewind point, trained
# like a weight-rewind ticket; the dense run is IMP's.
AT_INIT_READS = ("model.init", "train", "prune.rate", "prune.layer_rates", "prune.output_rate", "prune.levels",
                 "rewind_iteration", "retrain", "at_init.scope")


def _at_init(name: str, scorer: str, help: str, reads: tuple[str, ...] = ()) -> Method:
    return register(Method(
        name, help, trains="weights", reads=(*AT_INIT_READS, *(f"at_init.{r}" for r in reads)),
        member="trials.methods.imp:Member", mask="scored", scorer=scorer, levels="prune.levels", shares="dense",
        controls=("none", "reinit", "shuffle", "invert"), refuses=("at_init", "supermask", "prune.kind", "prune.scope"),
        why_not=(("control=random_prune", "shuffle is a random mask at the method's per-layer counts"),
                 ("retrain", "a mask found at init trains from the rewind point"),
                 ("prune.kind", "the scores are per weight"), ("prune.scope", f"method={name} reads at_init.scope"))))


_at_init("snip", "trials.methods.at_init:snip_level", "|g ⊙ θ| (Lee et al. 2019)", reads=("batches",))
_at_init("grasp", "trials.methods.at_init:grasp_level", "θ ⊙ Hg (Wang et al. 2020)", reads=("batches", "temperature"))
_at_init("synflow", "trials.methods.at_init:synflow_level", "iterative data-free |θ ⊙ ∂R/∂θ| (Tanaka et al. 2020)",
         reads=("rounds",))
_at_init("magnitude_init", "trials.methods.at_init:magnitude_level", "|θ| at init")
_at_init("random_init", "trials.methods.at_init:random_level", "uniform random scores")


def help_text() -> str:
    """The spec's help of `method`, from the entries."""
    at_init = names(mask="scored")
    own = [f"{n} = {m.help}" for n, m in METHODS.items() if m.mask != "scored"]
    return ("; ".join(own) + f"; {', '.join(at_init)} = prune at initialization (at_init.*) to IMP's level-L "
            "counts (prune.rate, layer_rates, output_rate, levels) and train like a weight-rewind ticket "
            f"({'; '.join(f'{n}: {METHODS[n].help}' for n in at_init)}). A method ignores the fields it does not read")

