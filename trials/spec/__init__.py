"""The spec wing: a trial's typed description (trial_spec.py), its checks (validate.py) and
what may share a pack (packing.py). It imports no training loop: building and validating
a spec, or planning packs, stays light (ARCHITECTURE.md, "Layers").

`from trials.spec import TrialSpec, from_dict, ...` is the front door; old pickles that
name `trials.spec.TrialSpec` and its groups resolve here too."""
from trials.spec.trial_spec import (  # noqa: F401
    AtInitSpec, DatasetSpec, EarlyBirdSpec, ModelSpec, PruneSpec, StabilitySpec, SupermaskSpec, TrainSpec,
    TrialSpec, field_paths, flatten, from_dict, non_default, to_dict, validated,
)
