"""A Tune trial's member trials (ARCHITECTURE.md, "Packs in sweeps").

Every Tune trial runs a pack of one or more trials, and its config says everything the
worker needs (orchestrator/plan.py tune_config builds it on the driver, once; the worker
decides nothing and imports no planner):

    {"pack": {"trials": [{"config": varied values and seed, "spec": TrialSpec.to_dict()
                          of a spec the driver validated, "key": the spec's key}, ...],
              "groups": [{"members": [index, ...], "arithmetic": "alone" | "stacked",
                          "data": data_key of the members' data,
                          "units": [{"name", "deps", "member": the member whose spec, as
                                     IMP, trains it, "points"}, ...]: what the worker
                                     registers with the broker (registrations; a searched
                                     pack's; [] in a grid, whose driver registered every
                                     unit up front)}, ...]}}

A Tune trial made by an lth before "data" and "units" (a sweep resumed across the change)
has groups without them: its worker validates its specs and finds the data key itself
(member_specs, group_data), and registers no units (a grid's driver registered them all;
a search's other trials then help with them less, and nothing is trained twice).

The trainable (trainable.py) runs each group's members together, in folders m00, m01, ...
of one working folder, and checkpoints them together; everything downstream stays per
trial: each member is a trial with its own id (the Tune trial's when it is alone,
`<tune trial id>_<index>` in a pack of several), MLflow run, trials.csv rows and ticket.
What the driver needs per member travels in each result:

    pack_members   per member: trial_key, seed, status (running / done / stopped /
                   failed), error, stopped_not_matching and its objectives so far
    pack_new       the level records reported for the first time, each with "member"

and in each checkpoint's PACK_FILE: the members' statuses, and the files the checkpoint
holds (a checkpoint counts as complete only when all of them are in storage).
"""
from __future__ import annotations

import json
from typing import Optional

PACK = "pack"  # the Tune config key of a pack
PACK_FILE = "pack.json"
RUNNING, DONE, STOPPED, FAILED = "running", "done", "stopped", "failed"
TUNE_STATUS = {DONE: "TERMINATED", STOPPED: "TERMINATED", FAILED: "ERROR"}  # member -> trials.csv status


def data_key(spec) -> str:
    """Which trial processes can train a unit: those holding the same data on the same device."""
    return json.dumps([spec.dataset.__dict__, spec.train.batch_size, spec.device], sort_keys=True, default=str)


def planned_here(config: dict) -> bool:
    """Whether the pack's config was made by this lth's planner (its groups name their
    data), not by one before it (module doc)."""
    return all("data" in group for group in config[PACK]["groups"])


def member_specs(config: dict) -> list:
    """The members' TrialSpecs from the pack's config: the driver validated them
    (trials.spec.validated: typed again, not validated again); a config from an lth
    before this one is validated (module doc)."""
    from trials.spec import from_dict, validated

    build = validated if planned_here(config) else from_dict
    return [build(t["spec"]) for t in config[PACK]["trials"]]


def group_data(group: dict, specs: list) -> str:
    """The group's data key: its config's, or (a config from an lth before it) its first member's."""
    return group.get("data") or data_key(specs[group["members"][0]])


def registrations(config: dict, group: dict) -> list[dict]:
    """The group's units as the broker takes them (orchestrator/plan.py registrations):
    each unit's spec is its member's with control none (the unit is IMP's), as the driver
    named it."""
    trials = config[PACK]["trials"]
    return [{"name": u["name"], "deps": u["deps"], "spec": {**trials[u["member"]]["spec"], "control": "none"},
             "data": group["data"], "points": u["points"]} for u in group.get("units", [])]


def member_dir(i: int) -> str:
    return f"m{i:02d}"


def members(trial_id: str, config: dict) -> list[tuple[str, dict, str]]:
    """(trial id, the member's {"config", "spec", "key"}, its folder in the Tune trial's
    checkpoints) of each trial a Tune trial runs."""
    trials = config[PACK]["trials"]
    if len(trials) == 1:
        return [(trial_id, trials[0], member_dir(0))]
    return [(f"{trial_id}_{i:02d}", t, member_dir(i)) for i, t in enumerate(trials)]


def statuses(result: Optional[dict], n: int) -> list[dict]:
    """Each member's last reported state ({} where the pack reported nothing yet)."""
    reported = (result or {}).get("pack_members") or []
    return [reported[i] if i < len(reported) else {} for i in range(n)]


def member_status(state: dict, tune_status: str) -> str:
    """A member's trials.csv status: its own once ended, else its Tune trial's (RUNNING,
    PENDING, or ERROR when the whole pack failed for good)."""
    return TUNE_STATUS.get(state.get("status"), tune_status)


def read_pack_file(fs, path: str) -> Optional[dict]:
    try:
        with fs.open_input_stream(f"{path}/{PACK_FILE}") as f:
            return json.loads(f.readall().decode())
    except (OSError, ValueError):
        return None


def complete(fs, path: str, info: dict) -> bool:
    """Whether every file the checkpoint's pack file `info` lists is in storage."""
    import pyarrow.fs

    found = fs.get_file_info([f"{path}/{f}" for f in info["files"]])
    return all(i.type == pyarrow.fs.FileType.File for i in found)
