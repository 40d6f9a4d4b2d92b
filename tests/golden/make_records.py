"""Golden records: the level records of a few small trials, saved with the fingerprint of
the machine that wrote them (tests/golden/records.json). tests/test_golden.py reruns the
specs: on a machine with the same fingerprint the records must be equal bit for bit;
against a recording from another machine, counts and iterations must be equal and
floats within TOLERANCE (relative). Record this machine (replacing its earlier recording,
keeping the others) only when numbers are meant to change, or to add a kind of machine:

    make golden          (= .venv/bin/python tests/golden/make_records.py)

    .venv/bin/python tests/golden/make_records.py --sensitivity

reruns every case with its initial weights moved by ~1e-7 relative (what another CPU's
rounding does to a first step) and prints how far each case's floats move: a case that
moves more than TOLERANCE / 10 is ill-conditioned and cannot be compared across machines.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trials.nets import models  # noqa: E402
from trials.folder.environment import MACHINE, environment  # noqa: E402
from trials.runner.levels import run_lottery  # noqa: E402
from trials.folder.record import OPTIONAL  # noqa: E402
from trials.spec import from_dict  # noqa: E402

FILE = Path(__file__).parent / "records.json"
THREADS = 2
# floats across machines: measured drift between an Intel (the first recording) and an
# AMD EPYC (AVX-512) CPU is <= 4.3e-7 relative; --sensitivity bounds each case's own
TOLERANCE = 1e-5
NOT_COMPARED = ("seconds", "environment")  # wall clock; where it ran (the fingerprint says)

BASE = {"model": {"name": "lenet_300_100"}, "dataset": {"name": "digits"},
        "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 60, "iterations": 120, "eval_interval": 20},
        "prune": {"rate": 0.3, "output_rate": 0.1, "levels": 2}, "device": "cpu"}
CASES = {
    "unstructured": {},
    "structured_rewind": {"prune": {"kind": "structured"}, "rewind_iteration": 20},
    "global_sgd": {"prune": {"scope": "global"}, "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                                                            "milestones": [60], "warmup_iterations": 10}},
    "reinit_rewind": {"control": "reinit", "rewind_iteration": 20, "seed": 1},
    "random_prune_structured": {"control": "random_prune", "prune": {"kind": "structured"}},
    "conv2_synthetic": {"model": {"name": "conv2"}, "dataset": {"name": "synthetic"},
                        "train": {"iterations": 40, "eval_interval": 20}, "prune": {"levels": 1}},
}
# Cases whose floats cannot be compared across machines: Conv-2's ReLUs and max-pooling
# switches turn a 1e-7 difference into 1e-2 within a level (--sensitivity: 0.68; an Intel
# and an AMD EPYC CPU parted by 150% at level 1), and its 200k-weight layer has neighbours
# within 1e-7 at the pruning threshold. Across machines they compare COUNTS only.
COUNTS_ONLY = {"conv2_synthetic"}
COUNTS = ("level", "density", "layer_density", "remaining_params", "effective_density", "start_iteration",
          "iterations")


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def spec_data(name: str) -> dict:
    return merge(BASE, CASES[name])


def fingerprint() -> dict:
    """What decides the bits here (trials.folder.environment.MACHINE), at the records' thread count."""
    env = environment("cpu", THREADS)
    return {k: env[k] for k in MACHINE}


def records(name: str, nudge: float = 0.0) -> list:
    """The case's level records, less NOT_COMPARED; `nudge`: move every initial weight by
    that relative amount (a fixed random sign each), for --sensitivity."""
    torch.set_num_threads(THREADS)
    build = models.build
    if nudge:
        def nudged(*args, **kwargs):
            net = build(*args, **kwargs)
            gen = torch.Generator().manual_seed(12345)
            with torch.no_grad():
                for p in net.parameters():
                    p.mul_(1 + nudge * (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1))
            return net
        models.build = nudged
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = run_lottery(from_dict(spec_data(name)), Path(tmp) / "trial")
    finally:
        models.build = build
    return [{k: v for k, v in r.to_dict().items() if k not in NOT_COMPARED} for r in rows]


def differences(got: list, want: list, tolerance: float, keys=None) -> list:
    """Where `got` parts from `want` (in `keys`, default all): floats by more than
    `tolerance` relative (0: exactly), anything else unless equal. Empty when they agree.
    An optional record field that `want` lacks (the recording predates it, e.g.
    effective_density) is not compared; every field `want` holds is."""
    out = []
    if len(got) != len(want):
        return [f"{len(got)} levels, {len(want)} saved"]
    for level, (g, w) in enumerate(zip(got, want)):
        later = {k for k in set(g) - set(w) if k in OPTIONAL}
        for key in sorted((set(g) - later | set(w)) & set(keys or set(g) | set(w))):
            a, b = g.get(key), w.get(key)
            if isinstance(a, float) and isinstance(b, float) and not (isinstance(a, bool) or isinstance(b, bool)):
                if abs(a - b) > tolerance * max(abs(a), abs(b)):
                    out.append(f"level {level} {key}: {a!r} here, {b!r} saved ({abs(a - b) / max(abs(b), 1e-30):.1e})")
            elif a != b:
                out.append(f"level {level} {key}: {a!r} here, {b!r} saved")
    return out


def drift(got: list, want: list) -> float:
    """The largest relative difference between the floats of two runs of one case."""
    worst = 0.0
    for g, w in zip(got, want):
        for key, a in g.items():
            b = w.get(key)
            if isinstance(a, float) and isinstance(b, float) and a != b:
                worst = max(worst, abs(a - b) / max(abs(a), abs(b)))
    return worst


def load() -> dict:
    return json.loads(FILE.read_text()) if FILE.exists() else {"recordings": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sensitivity", action="store_true", help="print each case's drift under a 1e-7 nudge")
    parser.add_argument("--nudge", type=float, default=1e-7)
    args = parser.parse_args()
    if args.sensitivity:
        for name in CASES:
            d = drift(records(name, args.nudge), records(name))
            verdict = "ok" if d <= TOLERANCE / 10 else "counts only" if name in COUNTS_ONLY else "ILL-CONDITIONED"
            print(f"{name:26s} drift {d:.2e}  {verdict}")
        return
    here = fingerprint()
    saved = load()
    kept = [r for r in saved["recordings"] if r["fingerprint"] != here]
    mine = {"fingerprint": here, "cases": {name: {"spec": spec_data(name), "records": records(name)} for name in CASES}}
    FILE.write_text(json.dumps({"tolerance": TOLERANCE, "recordings": [mine, *kept]}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FILE}: this machine ({here['cpu']}, {here['cpu_capability']}) and {len(kept)} other recording(s)")


if __name__ == "__main__":
    main()
