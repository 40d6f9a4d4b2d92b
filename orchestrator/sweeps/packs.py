"""A Tune trial's member trials (ARCHITECTURE.md, "Packs in sweeps").

A sweep with `pack: 1` runs one trial per Tune trial, its config the trial's (varied
paths and seed). With packs, a Tune trial's config is {"pack": [member config, ...]}: the
trainable runs its members together (trials/lottery.py run_pack) in folders m00, m01, ... of one
working folder and checkpoints them together, and everything downstream stays per
trial: each member is a trial with its own id `<tune trial id>_<index>`, MLflow run,
trials.csv rows and ticket. What the driver needs per member travels in each result:

    pack_members   per member: trial_key, seed, status (running / done / stopped /
                   failed), error, stopped_not_matching and its objectives so far
    pack_new       the level records reported for the first time, each with "member"

and in each checkpoint's PACK_FILE: the members' statuses, and the files the checkpoint
holds (a checkpoint counts as complete only when all of them are in storage).
"""
from __future__ import annotations

import json
from typing import Optional

PACK = "pack"  # the Tune config key of a pack's member configs
PACK_FILE = "pack.json"
RUNNING, DONE, STOPPED, FAILED = "running", "done", "stopped", "failed"
TUNE_STATUS = {DONE: "TERMINATED", STOPPED: "TERMINATED", FAILED: "ERROR"}  # member -> trials.csv status


def is_pack(config: dict) -> bool:
    return PACK in config


def member_dir(i: int) -> str:
    return f"m{i:02d}"


def members(trial_id: str, config: dict) -> list[tuple[str, dict, Optional[str]]]:
    """(trial id, trial config, folder in the Tune trial's checkpoints or None = the
    checkpoint itself) of each trial a Tune trial runs."""
    if not is_pack(config):
        return [(trial_id, config, None)]
    return [(f"{trial_id}_{i:02d}", c, member_dir(i)) for i, c in enumerate(config[PACK])]


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
