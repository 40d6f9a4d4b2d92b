"""TrialSpec: a frozen, typed, validated description of one trial of a registered method
(trials/methods: IMP, an edge-popup supermask search, pruning at initialization, ...).

Groups follow open_lth's hyperparameter groups. Help text lives with each field
(``metadata["help"]``). A field marked ``key=False`` says where the run happens, not
what it computes, and is left out of the content key (``data_dir``, ``device``).
The content key hashes only non-default fields: a new field's default must reproduce the
old behaviour, so that every old key stays valid (see ARCHITECTURE.md, "The trial spec").
Plain data becomes a spec through trials/core/typed.py, by the fields' real types.
"""
from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from trials import methods
from trials.core import typed
from trials.spec.validate import validate

MethodName = Literal[methods.names()]  # the registered methods (trials/methods), in registration order


def _f(default, help: str, key: bool = True, **coercion):
    """`coercion`: metadata for trials/core/typed.py, e.g. shorthand="name" (`model: conv2`)."""
    return field(default=default, metadata={"help": help, "key": key, **coercion})


@dataclass(frozen=True)
class ModelSpec:
    name: str = _f("lenet_300_100", "model registry name (lth trial models)")
    init: Literal["kaiming_normal", "kaiming_uniform", "xavier_normal"] = _f(
        "kaiming_normal", "init of conv/linear weights; biases start at 0 (open_lth's default). "
        "method=edge_popup ignores it: supermask.weight_init sets its fixed weights"
    )
    width: float = _f(1.0, "width multiplier: hidden units and channels x width, rounded (1.0 = the paper's)")


@dataclass(frozen=True)
class DatasetSpec:
    name: str = _f("mnist", "dataset registry name")
    data_dir: Optional[str] = _f(
        None, "existing torchvision root (nothing is downloaded); default: the node's cache", key=False
    )
    validation: Optional[int] = _f(
        None, "examples carved from the training set for early stopping; default: the dataset's"
    )
    augment: bool = _f(True, "the dataset's standard augmentation (cifar10: crop+flip); others have none")


@dataclass(frozen=True)
class TrainSpec:
    optimizer: Literal["sgd", "adam"] = _f("sgd", "sgd (with momentum) or adam")
    lr: float = _f(0.1, "peak learning rate")
    momentum: float = _f(0.0, "SGD momentum; must be 0 with adam")
    weight_decay: float = _f(0.0, "L2 penalty (coupled, as torch.optim.SGD/Adam)")
    batch_size: int = _f(128, "examples per iteration")
    iterations: int = _f(1000, "optimizer steps per level (level 0 trains all of them)")
    warmup_iterations: int = _f(0, "linear learning-rate warmup from 0, in iterations")
    milestones: tuple[int, ...] = _f((), "iterations at which the learning rate is multiplied by gamma")
    gamma: float = _f(0.1, "learning-rate factor at each milestone")
    eval_interval: int = _f(100, "iterations between validation evaluations (early stopping)")
    precision: Literal["fp32", "bf16"] = _f("fp32", "bf16 = autocast matmuls/convs to bfloat16")
    fused: bool = _f(False, "torch's fused Adam/SGD kernels: faster on CPU (README, 'Speed'), but they round "
                            "differently, so records differ slightly from the default path's (CUDA uses "
                            "fused Adam either way)")


@dataclass(frozen=True)
class PruneSpec:
    kind: Literal["unstructured", "structured"] = _f(
        "unstructured", "unstructured = single weights by magnitude; structured = whole units by L1 norm"
    )
    scope: Literal["layerwise", "global"] = _f(
        "layerwise", "layerwise = each layer loses `rate`; global = one magnitude ranking over layers"
    )
    rate: float = _f(0.2, "fraction of the remaining weights (or units) removed per level")
    layer_rates: tuple[tuple[str, float], ...] = _f(
        (), "per-layer rates by module name, e.g. {fc1: 0.3}; these layers leave the global pool",
        expected="a mapping layer -> rate, e.g. {fc1: 0.3}",
    )
    output_rate: Optional[float] = _f(None, "rate of the output layer; default: rate. Structured pruning ignores it: classes stay")
    levels: int = _f(5, "pruning levels after the dense level 0")


@dataclass(frozen=True)
class SupermaskSpec:
    """Edge-popup (Ramanujan et al. 2020): which of the fixed random weights to keep is learned."""

    densities: tuple[float, ...] = _f(
        (0.5,), "k per level: fraction of each layer's weights kept (level i = densities[i], descending); "
        "each level is its own search from the same fixed weights"
    )
    scope: Literal["layerwise", "global"] = _f(
        "layerwise", "layerwise = each layer keeps its top k by |score|; global = one ranking over layers"
    )
    weight_init: Literal["signed_constant", "kaiming_normal"] = _f(
        "signed_constant", "fixed weights: +-sqrt(2/fan_in) with the signs of a Kaiming-normal draw, "
        "or the draw"
    )
    scaled: bool = _f(False, "the paper's scaled inits: weights x 1/sqrt(k), i.e. std sqrt(2/(k fan_in))")
    score_init: Literal["kaiming_uniform", "kaiming_normal"] = _f(
        "kaiming_uniform", "initial scores: U(+-1/sqrt(fan_in)) as torch's default (the reference code), "
        "or N(0, 2/fan_in)"
    )
    lr: float = _f(0.1, "peak learning rate of the scores (SGD)")
    momentum: float = _f(0.9, "SGD momentum of the scores")
    weight_decay: float = _f(1e-4, "L2 penalty on the scores (coupled, as torch.optim.SGD)")
    schedule: Literal["cosine", "constant"] = _f(
        "cosine", "learning rate of the scores: cosine from lr to 0 over train.iterations, or constant"
    )


@dataclass(frozen=True)
class AtInitSpec:
    """Pruning at initialization (trials/methods/at_init.py): how the methods other than imp and
    edge_popup score the network at its rewind point; each reads only its own fields."""

    scope: Literal["global", "layerwise"] = _f(
        "global", "global = one ranking over the layers without an explicit rate, at IMP's level-L "
        "count of them (the papers'); layerwise = each layer at IMP's level-L count of its own"
    )
    batches: int = _f(1, "training batches (train.batch_size) whose gradients score the weights (snip, grasp)")
    temperature: float = _f(200.0, "grasp: logits are divided by it (the paper's T = 200)")
    rounds: int = _f(100, "synflow: scoring rounds, at densities d^(r/rounds) (the paper's 100)")


@dataclass(frozen=True)
class EarlyBirdSpec:
    """Early-bird tickets (You et al. 2020; trials/methods/early_bird_watch.py): draw the mask the pruning rule
    would keep every `interval` iterations and stop training once it has stopped changing."""

    interval: int = _f(100, "iterations between mask draws (the paper draws once per epoch)")
    window: int = _f(5, "masks compared: the newest against each of the window-1 before it (the paper's 5)")
    epsilon: float = _f(0.1, "stop once every distance in the window is below it (normalised Hamming; the paper's 0.1)")
    criterion: Literal["magnitude", "bn_gamma"] = _f(
        "magnitude", "what ranks the draws: magnitude = the trial's pruning rule (|w|, or a unit's L1 norm when "
        "structured); bn_gamma = |gamma| of the BatchNorm after each unit (network slimming, the paper's; "
        "prune.kind=structured on a net whose pruned layers all have one)"
    )
    imp_levels: bool = _f(
        False, "method=imp: every level but the last stops once the next level's mask has stabilised "
        "(early-bird levels); method=early_bird ignores it"
    )


@dataclass(frozen=True)
class StabilitySpec:
    """Instability analysis (Frankle et al. 2020; trials/methods/stability.py): at the chosen levels,
    train `copies` more networks from the level's start with different SGD noise and
    measure the error barrier on the straight line between their final weights."""

    copies: int = _f(0, "networks trained per measured level, each with its own data-order and "
                        "augmentation seed; 0 = off, else >= 2 (every pair is measured)")
    points: int = _f(30, "evenly spaced points on the line between two copies, endpoints included (>= 2)")
    levels: tuple[int, ...] = _f((), "levels to measure (0 = the dense network, from the rewind "
                                     "iteration k); empty = every level 0..prune.levels")
    bn_batches: int = _f(10, "training batches (train.batch_size) that recompute BatchNorm statistics "
                             "at every point of the line; models without BatchNorm ignore it")


@dataclass(frozen=True)
class TrialSpec:
    method: MethodName = _f("imp", methods.help_text())
    model: ModelSpec = _f(ModelSpec(), "the network", shorthand="name")
    dataset: DatasetSpec = _f(DatasetSpec(), "the data", shorthand="name")
    train: TrainSpec = _f(TrainSpec(), "how each level trains")
    prune: PruneSpec = _f(PruneSpec(), "how each level prunes (method=imp); its counts per level (rate, "
                                       "layer_rates, output_rate, levels) are also those of pruning at init")
    supermask: SupermaskSpec = _f(SupermaskSpec(), "what each level searches (method=edge_popup)")
    at_init: AtInitSpec = _f(AtInitSpec(), "how a method that prunes at initialization scores (snip, grasp, "
                                           "synflow, magnitude_init, random_init)")
    early_bird: EarlyBirdSpec = _f(EarlyBirdSpec(), "when a run's mask has stabilised (method=early_bird, "
                                                    "or method=imp with early_bird.imp_levels)")
    rewind_iteration: int = _f(0, "k: survivors restart from level 0's weights after k iterations")
    retrain: Literal["weight_rewind", "lr_rewind", "finetune"] = _f(
        "weight_rewind", "how level L >= 1 retrains its survivors (Renda et al. 2020): weight_rewind = "
        "from level 0's weights at k, schedule from k; lr_rewind = from level L-1's final weights, "
        "learning-rate schedule and data order replayed from k; finetune = from level L-1's final "
        "weights at the final learning rate, for the same T-k iterations. control=reinit needs "
        "weight_rewind, and so do method=edge_popup and the methods that prune at init. method=early_bird: "
        "weight_rewind = from the dense weights at k; finetune = continue the dense run from its weights at "
        "the draw iteration t to the end of its schedule (the paper's 'continue'); lr_rewind is refused"
    )
    stability: StabilitySpec = _f(StabilitySpec(), "instability analysis of chosen levels (method=imp only)")
    control: Literal["none", "reinit", "random_prune", "shuffle", "invert"] = _f(
        "none", "reinit = the method's masks on a fresh init; random_prune = random masks at IMP's densities "
        "(edge_popup: at each level's per-layer density on the fixed weights, evaluated, not trained); "
        "shuffle = each layer's mask permuted within the layer, same start; invert = per layer the same "
        "count of the lowest scores (Frankle et al. 2021; not edge_popup)"
    )
    seed: int = _f(0, "init, data order and augmentation seed")
    device: str = _f("auto", "auto (cuda when available), cpu, cuda or cuda:N", key=False)

    def __post_init__(self):
        if not _VALIDATED.get():
            validate(self)

    @property
    def last_level(self) -> int:
        """Levels run 0..last_level: IMP's prunings, or one per supermask density."""
        return methods.of(self).last_level(self)

    @property
    def key(self) -> str:
        """Stable content key: hash of the non-default, key-relevant fields."""
        text = json.dumps(non_default(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, **changes) -> "TrialSpec":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------- dict <-> spec


def to_dict(spec) -> dict:
    return {f.name: _plain(f.name, getattr(spec, f.name)) for f in dataclasses.fields(spec)}


def _plain(name: str, value):
    """A field's value as plain data (to_dict)."""
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if name == "layer_rates":
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def non_default(spec) -> dict:
    out = {}
    for f in dataclasses.fields(spec):
        if not f.metadata.get("key", True):
            continue
        value, default = getattr(spec, f.name), f.default
        if dataclasses.is_dataclass(value):
            sub = non_default(value)
            if sub:
                out[f.name] = sub
        elif value != default:
            out[f.name] = _plain(f.name, value)
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """{"prune": {"rate": 0.2}} -> {"prune.rate": 0.2}; layer_rates stay one value."""
    out = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and k != "layer_rates":
            out.update(flatten(v, path + "."))
        else:
            out[path] = v
    return out


def from_dict(data: dict, cls=TrialSpec, path: str = ""):
    """Build a spec from plain data, rejecting unknown keys and wrong types by path
    (`path`: where `data` sits, e.g. "prune."). Only TrialSpec validates across fields."""
    return typed.build(cls, data, path.rstrip("."))


_VALIDATED = contextvars.ContextVar("spec_validated", default=False)  # set by validated() only


def validated(data: dict) -> TrialSpec:
    """A spec from the to_dict of one that was validated where it was made: its keys and
    types are checked as from_dict checks them, its rules across fields (trials/validate.py)
    are not run again. A sweep's driver ships its trials' specs so (ARCHITECTURE.md,
    "Packs in sweeps")."""
    token = _VALIDATED.set(True)
    try:
        return from_dict(data)
    finally:
        _VALIDATED.reset(token)


def field_paths(cls=TrialSpec, prefix: str = "") -> dict[str, Any]:
    """Every settable path -> its real type (for --set, sweep spaces and analysis columns)."""
    return typed.field_paths(cls, prefix)
