"""What `lth sweep run` refuses before Ray starts or anything is written, in one place, so
that `lth sweep plan` refuses the same (ARCHITECTURE.md, "The sweep runner"). Imports no
Ray: planning starts nothing.

    the file          load_sweep (orchestrator/sweep_spec.py), before either command gets here
    storage           a folder that is (or can be made) writable, or a bucket that answers
    the name          no different sweep of that name in the storage (the same one resumes)
    resources         a local Ray (no --address, no RAY_ADDRESS) must hold one Tune trial's
                      request (cluster.check_local); a cluster is judged once connected
    tracking_uri      a store that answers (`plan`: a server that answers, or an SQLite
                      file that exists or can be made; it opens no database). `run` opens
                      it while Ray starts (runner.checked_connect), still before anything
                      is written
"""
from __future__ import annotations

import os
from pathlib import Path

from orchestrator.sweeps import cluster
from orchestrator.sweeps.storage import SWEEP_FILE, check_usable, read_text, sweep_path
from trials.core.errors import ConfigError


def ray_address(address: str | None) -> str | None:
    """--address, else RAY_ADDRESS (set by `ray job submit`), else None: a local Ray."""
    return address or os.environ.get("RAY_ADDRESS")


def check(sweep, address: str | None) -> bool:
    """Refuse (ConfigError) what the sweep cannot start with; whether the same sweep exists
    already under its name (`run` then resumes it)."""
    import yaml

    from orchestrator.sweep_spec import parse_sweep

    check_usable(sweep.storage, write=True)
    text = read_text(sweep_path(sweep.storage, sweep.name) + "/" + SWEEP_FILE)
    if text is not None and parse_sweep(yaml.safe_load(text)["sweep"], Path("/"), trials=False).to_dict() != sweep.to_dict():
        raise ConfigError("name", sweep.name, f"a different sweep of that name exists in {sweep.storage}; "
                          f"continue it with `lth sweep resume {sweep.name}` or choose another --name")
    if not ray_address(address):
        cluster.check_local(sweep)
    return text is not None


def check_tracking(uri: str) -> None:
    """`plan`'s look at the tracking store, creating nothing: a server must answer; an
    SQLite file must exist or its folder take it; other databases are checked by `run`."""
    from orchestrator.tracking import store
    from trials.core.folders import check_folder

    if uri.startswith(("http://", "https://")):
        store.check_reachable(uri)
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        check_folder(path.parent, "tracking_uri", write=True)
        if path.exists() and not path.is_file():
            raise ConfigError("tracking_uri", uri, "an SQLite file (that path is a folder)")
