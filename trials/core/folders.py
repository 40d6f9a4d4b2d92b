"""Whether a local folder can be used, before anything is written: one line naming the key
otherwise. Without torch, so that a sweep's driver checks its storage without loading the
engine (trials/folder/store.py writes the trial folders)."""
from __future__ import annotations

import os
from pathlib import Path

from trials.core.errors import check

NAME_MAX = 255  # bytes in one folder name: ext4, XFS, APFS, NTFS alike


def check_folder(path: Path, key: str, write: bool) -> None:
    """`path` is a folder, or can be made one (its nearest existing parent is a folder),
    that we can write to when `write`; else one ConfigError on `key`. (As root, access
    checks pass: a read-only mount shows only when writing.)"""
    path = Path(path)
    for part in path.parts:  # a longer one is no folder name (and stat() fails on it)
        check(len(os.fsencode(part)) <= NAME_MAX, key, str(path),
              f"folder names of at most {NAME_MAX} bytes (one has {len(os.fsencode(part))})")
    existing = next(p for p in (path, *path.parents) if p.exists())
    check(existing.is_dir(), key, str(path), f"a folder ({existing} is a file)")
    check(not write or os.access(existing, os.W_OK | os.X_OK), key, str(path),
          f"a folder you can write to ({existing} is read-only)")
