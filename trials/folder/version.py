"""The code version a result came from (every result carries it): package version and git sha."""
from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    try:
        version = metadata.version("lth")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "git_sha": _git_sha()}


def _git_sha() -> str | None:
    """HEAD of the checkout this code runs from, '+dirty' when it has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")
