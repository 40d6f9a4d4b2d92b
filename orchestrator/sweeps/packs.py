"""A Tune trial's member trials (ARCHITECTURE.md, "Packs in sweeps").

Every Tune trial runs a pack of one or more trials, and its config says everything the
worker needs (orchestrator/plan.py tune_config builds it on the driver, once):

    {"pack": {"trials": [{"config": varied values and seed, "spec": TrialSpec.to_dict(),
                          "key": the spec's key}, ...],
              "groups": [{"members": [index, ...], "arithmetic": "alone" | "stacked"}, ...]}}

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
