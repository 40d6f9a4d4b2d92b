"""A sweep's trial folders in storage (ARCHITECTURE.md, "The sweep runner"): each trial's
folder is kept at STORAGE/NAME/trials/<trial id>/ and is what resume, trials.csv, MLflow
replay and ticket export read. Imports neither ray nor mlflow.

A trial trains in a local folder (the engine's, trials/folder/layout.py); after each level the
trainable sends what changed (`Mirror.push`), so every file goes to storage once:

    spec.json, rewind.safetensors, scored.safetensors, nodes.json
    units.json                     the shared work units it used, with "root": where they are
    level_XX/mask.safetensors      every level not held by a unit (bits: trials/folder/store.py save_mask)
    level_XX/final.safetensors     keep_finals "last": the newest level's only (the next
                                   level starts from it; an older one is removed once a
                                   newer one is stored); "all": every level's
    levels.jsonl                   sent last: a level is stored once its line is here
    imp/                           a control's IMP run, by the same rules

A level that is a published work unit (units.json: trained or reused; a dense unit holds
level 0's final weights, a trunk unit an IMP level's mask and final weights) is not copied
into the trial folder: readers take its tensors from the unit (`unit_files`), which is
kept as long as the storage's units are. A level's record.json and DONE marker stay
local: levels.jsonl holds the records, and `pull` writes both back for every level it
lists (`restore_markers`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from orchestrator.sweeps.storage import filesystem, sweep_path
from trials.folder import layout
from trials.folder.record import read_lines

TRIALS = "trials"  # STORAGE/NAME/trials/<trial id>/
KEEP_FINALS = ("last", "all")
LOCAL_ONLY = (layout.RECORD, layout.DONE)  # in level folders: rebuilt from levels.jsonl


def trial_folder(storage: str, sweep: str, trial_id: str) -> str:
    """Where a trial's folder lives in storage (a path or an s3:// / gs:// URI)."""
    return f"{sweep_path(storage, sweep)}/{TRIALS}/{trial_id}"


def _done_levels(folder: Path) -> list[int]:
    return sorted(lv for d in folder.iterdir() if (lv := layout.level_of(d.name)) is not None
                  and (d / layout.DONE).exists()) if folder.is_dir() else []


def unit_levels(root: Path) -> dict:
    """Trial folder (relative: "" or "imp/") -> {level: names in the unit} of the levels that
    published work units hold (units.json). A ticket's levels are its dense unit's and its
    trunk's; a control's levels >= 1 are its own, its IMP run's (imp/) are units."""
    ledger = root / layout.UNITS
    spec = root / layout.SPEC
    if not ledger.exists() or not spec.exists():
        return {}
    used = json.loads(ledger.read_text())
    levels = set(used.get("trained", [])) | set(used.get("reused", []))
    held = {lv: ((layout.FINAL,) if lv == 0 else (layout.MASK, layout.FINAL)) for lv in levels
            if lv == 0 or "trunk" in used}
    control = json.loads(spec.read_text())["spec"].get("control", "none")
    if control in (None, "none"):
        return {"": held}
    # a control: its IMP run's levels are units; its own level 0 is the dense unit's too
    return {f"{layout.IMP}/": held, **({"": {0: held[0]}} if 0 in held else {})}


def wanted(local: Path, keep_finals: str = "last") -> tuple[list[str], list[str]]:
    """(files to have in storage, relative to `local`, levels.jsonl files last; finals
    that must not be there). Levels without DONE (in progress) are left out, and so are
    the tensors of levels that work units hold (unit_levels)."""
    first, last, dropped = [], [], []
    held = unit_levels(local)

    def walk(folder: Path, rel: str) -> None:
        done = _done_levels(folder)
        in_units = held.get(rel, {})
        for entry in sorted(folder.iterdir()):
            name = f"{rel}{entry.name}"
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                level = layout.level_of(entry.name)
                if level is None:
                    walk(entry, f"{name}/")
                elif level in done:
                    for f in sorted(entry.iterdir()):
                        if f.name in LOCAL_ONLY or f.name.startswith(".") or f.name in in_units.get(level, ()):
                            continue
                        if f.name == layout.FINAL and keep_finals == "last" and level != done[-1]:
                            dropped.append(f"{name}/{f.name}")
                        else:
                            first.append(f"{name}/{f.name}")
            elif entry.name == layout.LEVELS:
                last.append(name)
            else:
                first.append(name)

    walk(local, "")
    return first + last, dropped


class Mirror:
    """One trial's folder in storage, kept up to date with its local folder."""

    def __init__(self, local: Path, remote: str, keep_finals: str = "last", units: Optional[str] = None):
        """`units`: where the sweep's work units are (units.py units_root), None: not shared."""
        self.local, self.remote, self.keep, self.units = Path(local), remote.rstrip("/"), keep_finals, units
        self.fs, self.base = filesystem(self.remote)
        self.sent: dict = {}  # relative path -> stamp (_stamp) of the local file last sent
        self.gone: set = set()  # dropped finals already removed from storage

    def push(self) -> int:
        """Send new and changed files, levels.jsonl last, then remove dropped finals; the
        count of files sent."""
        if not self.local.is_dir():
            return 0
        send, dropped = wanted(self.local, self.keep)
        count = 0
        for rel in send:
            stamp = _stamp(self.local / rel)
            if self.sent.get(rel) == stamp:
                continue
            target = f"{self.base}/{rel}"
            if "/" in rel:
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            else:
                self.fs.create_dir(self.base, recursive=True)
            data = (self.local / rel).read_bytes()
            if rel == layout.UNITS and self.units:  # readers find the units' tensors from the folder alone
                data = json.dumps({**json.loads(data), "root": self.units}, indent=1, sort_keys=True).encode()
            with self.fs.open_output_stream(target) as f:  # on S3 an object appears whole, on close
                f.write(data)
            self.sent[rel] = stamp
            count += 1
        for rel in dropped:
            if rel not in self.gone:
                try:
                    self.fs.delete_file(f"{self.base}/{rel}")
                except (FileNotFoundError, OSError):
                    pass
                self.sent.pop(rel, None)
                self.gone.add(rel)
        return count

    def pull(self) -> bool:
        """Copy the stored folder into the (empty or missing) local folder and write back
        each stored level's record and DONE marker; whether storage held it."""
        import pyarrow.fs

        if self.fs.get_file_info(f"{self.base}/{layout.SPEC}").type != pyarrow.fs.FileType.File:
            return False
        if self.local.exists():
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True)
        pyarrow.fs.copy_files(self.base, str(self.local), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        from_units(self.local)
        restore_markers(self.local)
        for rel in wanted(self.local, self.keep)[0]:  # in storage already: not sent again
            self.sent[rel] = _stamp(self.local / rel)
        return True


def _stamp(path: Path):
    """What says a file changed: a tensor file is written once (size and time); the small
    JSON files are rewritten with the same content after every level (their bytes)."""
    if path.name.endswith(layout.TENSOR_SUFFIX):
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    return path.read_bytes()


def unit_files(root: Path, rel: str, level: int) -> dict:
    """{name: where it is in storage} of a unit-held level's tensors (unit_levels), {} when
    no unit holds the level."""
    held = unit_levels(root).get(rel, {})
    if level not in held:
        return {}
    used = json.loads((root / layout.UNITS).read_text())
    if "root" not in used:
        return {}
    unit = used["dense"] if level == 0 else f"{used['trunk']}/{layout.level_dir(level)}"
    return {name: f"{used['root'].rstrip('/')}/{unit}/{name}" for name in held[level]}


def from_units(root: Path) -> list[str]:
    """Copy into the pulled trial folder `root` the tensors of its levels that units hold;
    the files no unit had any more (those levels are then redone)."""
    missing = []
    for rel, held in unit_levels(root).items():
        levels = root / rel / layout.LEVELS
        stored = {r.level for r in read_lines(levels.read_text())} if levels.exists() else set()
        for level in sorted(set(held) & stored):
            for name, where in unit_files(root, rel, level).items():
                target = root / rel / layout.level_dir(level) / name
                if target.exists():
                    continue
                data = _read(where)
                if data is None:
                    missing.append(where)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    return missing


def _read(where: str) -> Optional[bytes]:
    fs, p = filesystem(where)
    try:
        with fs.open_input_stream(p) as f:
            return f.readall()
    except (FileNotFoundError, OSError):
        return None


def restore_markers(folder: Path) -> None:
    """Each level levels.jsonl lists gets its record.json and DONE (in `folder` and its
    imp/); a level folder it does not list was cut short and goes (the engine redoes it)."""
    from trials.folder.store import write_json

    for levels in [folder / layout.LEVELS, *folder.glob(f"*/{layout.LEVELS}")]:
        root = levels.parent
        records = {r.level: r for r in read_lines(levels.read_text())} if levels.exists() else {}
        for d in sorted(root.iterdir()):
            level = layout.level_of(d.name)
            if level is None or not d.is_dir():
                continue
            if level not in records or not (d / layout.MASK).exists() or (
                    level == max(records) and not (d / layout.FINAL).exists()):
                shutil.rmtree(d)  # cut short, or its unit is gone: redone
                continue
            write_json(d / layout.RECORD, records[level].to_dict())
            (d / layout.DONE).write_text("")


def read_file(remote: str, name: str) -> Optional[bytes]:
    """One file of a stored trial folder (None: not there)."""
    fs, base = filesystem(remote)
    try:
        with fs.open_input_stream(f"{base}/{name}") as f:
            return f.readall()
    except (FileNotFoundError, OSError):
        return None


def stored_records(remote: str, units: bool = True) -> Optional[tuple[list, dict, Optional[dict]]]:
    """(level records, level -> node id, units ledger or None) of a stored trial folder;
    None when storage holds no folder for it (a sweep of the previous layout). `units`:
    False leaves the ledger unread (None)."""
    levels = read_file(remote, layout.LEVELS)
    if levels is None:
        return None
    nodes = read_file(remote, layout.NODES)
    units = read_file(remote, layout.UNITS) if units else None
    return (read_lines(levels.decode()), json.loads(nodes) if nodes else {},
            json.loads(units) if units else None)


def download(remote: str, local: Path, names: list[str]) -> list[str]:
    """Copy the named files of a stored trial folder into `local`; the names not found."""
    missing = []
    for name in names:
        data = read_file(remote, name)
        if data is None:
            missing.append(name)
            continue
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    return missing
