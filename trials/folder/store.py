"""The trial folder (names in trials/folder/layout.py; contract in ARCHITECTURE.md, "The trial
folder"). Every file is written to a temporary name and renamed, so a killed trial leaves
no half-written file. Tensors are safetensors: loading never unpickles.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trials.core.errors import check
from trials.core.folders import NAME_MAX, check_folder
from trials.folder import layout
from trials.folder.record import LevelRecord
from trials.folder.version import code_version


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# a new file's mode under this process's umask (0644 under the usual 022), read once
FILE_MODE = 0o666 & ~_umask()


def save_tensors(path: Path, tensors: dict) -> None:
    """safetensors writes its file 0600 (a private temporary file, renamed): given the mode
    of every other file here, so a ticket's tensors are as readable as its JSON."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp):
        save_file(cpu, str(tmp))
        os.chmod(tmp, FILE_MODE)

    _atomic(Path(path), write)


# A mask file's tensors as bits (ARCHITECTURE.md, "The trial folder"): safetensors has no
# bit dtype, so each bool tensor is stored flattened as uint8 (8 weights a byte, little-endian
# bit order) and the file's metadata names the format and each tensor's shape.
MASK_FORMAT, MASK_BITS, MASK_SHAPES = "lth.mask", "bits/1", "lth.shapes"


def save_mask(path: Path, mask: dict) -> None:
    """A mask (name -> bool tensor) as bits: 1/8 of the bytes of one byte per weight."""
    import numpy as np

    shapes, packed = {}, {}
    for name, t in mask.items():
        t = t.detach().to("cpu")
        if t.dtype != torch.bool:
            raise ValueError(f"mask {name}: dtype {t.dtype}, a mask is bool")
        shapes[name] = list(t.shape)
        packed[name] = torch.from_numpy(np.packbits(t.reshape(-1).numpy(), bitorder="little"))
    meta = {MASK_FORMAT: MASK_BITS, MASK_SHAPES: json.dumps(shapes, sort_keys=True)}

    def write(tmp):
        save_file(packed, str(tmp), metadata=meta)
        os.chmod(tmp, FILE_MODE)

    _atomic(Path(path), write)


def load_tensors(path: Path, device="cpu") -> dict:
    """A safetensors file's tensors; a mask stored as bits (save_mask) comes back as bool
    tensors of its shapes, so every reader takes both forms (one byte per weight before)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get(MASK_FORMAT) != MASK_BITS:
            return load_file(str(path), device=str(device))
        import numpy as np

        shapes = json.loads(meta[MASK_SHAPES])
        out = {}
        for name in f.keys():
            n = int(np.prod(shapes[name])) if shapes[name] else 1
            bits = np.unpackbits(f.get_tensor(name).numpy(), count=n, bitorder="little").astype(bool)
            out[name] = torch.from_numpy(bits).reshape(shapes[name]).to(device)
        return out


def write_json(path: Path, obj) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n"))


class TrialDir:
    def __init__(self, path, spec):
        self.path = Path(path)
        self.spec = spec

    # ------------------------------------------------------------ lifecycle
    def check(self) -> None:
        """Refuse, before anything is written, a folder this trial cannot use: a file, a
        name too long, one we cannot create or write to, or one that holds another spec's
        trial (or a spec.json that is not a trial's)."""
        where = str(self.path)
        for part in self.path.parts:
            check(len(os.fsencode(part)) <= NAME_MAX, "--out", where,
                  f"folder names of at most {NAME_MAX} bytes (one has {len(os.fsencode(part))})")
        check_folder(self.path, "--out", write=True)
        f = self.path / layout.SPEC
        if f.exists():
            try:
                key = json.loads(f.read_text()).get("key")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                key = None
            check(key is not None, "--out", where, f"its {layout.SPEC} is not a trial's; use another folder")
            check(key == self.spec.key, "--out", where, f"it holds trial {key}, not {self.spec.key}; use another folder")

    def begin(self) -> None:
        self.check()
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / layout.SPEC).exists():
            write_json(self.path / layout.SPEC,
                       {"key": self.spec.key, "spec": self.spec.to_dict(), **code_version()})

    def first_missing(self, levels: int) -> int:
        return next((lv for lv in range(levels + 1) if not self.done(lv)), levels + 1)

    def reopen_from(self, level: int) -> None:
        """Levels after a missing one derive from it: mark them not done so they are redone."""
        for d in sorted(self.path.iterdir()) if self.path.exists() else ():
            found = layout.level_of(d.name)
            if found is not None and found >= level and (d / layout.DONE).exists():
                (d / layout.DONE).unlink()

    # ------------------------------------------------------------ levels
    def level_dir(self, level: int) -> Path:
        return self.path / layout.level_dir(level)

    def done(self, level: int) -> bool:
        return (self.level_dir(level) / layout.DONE).exists()

    def finish(self, level: int, mask: dict, final: dict, record: LevelRecord) -> None:
        d = self.level_dir(level)
        d.mkdir(parents=True, exist_ok=True)
        save_mask(d / layout.MASK, mask)
        save_tensors(d / layout.FINAL, final)
        self._close(level, record)

    def _close(self, level: int, record: LevelRecord) -> None:
        """The record, levels.jsonl, then DONE last (the level counts only once DONE exists)."""
        d = self.level_dir(level)
        write_json(d / layout.RECORD, record.to_dict())
        self._write_levels(extra=level)
        (d / layout.DONE).write_text("")

    def copy_level(self, source: "TrialDir", level: int, record: LevelRecord) -> None:
        self.copy_level_from(source.level_dir(level), level, record)

    def copy_level_from(self, folder: Path, level: int, record: LevelRecord) -> None:
        """Level `level` from a folder holding its mask and final weights (another trial's
        level, or a shared work unit), with `record` as its record."""
        d = self.level_dir(level)
        d.mkdir(parents=True, exist_ok=True)
        for name in (layout.MASK, layout.FINAL):
            shutil.copyfile(Path(folder) / name, d / name)
        copy_draws(folder, d)
        self._close(level, record)

    def record(self, level: int) -> LevelRecord:
        return LevelRecord.from_dict(json.loads((self.level_dir(level) / layout.RECORD).read_text()))

    def _write_levels(self, extra: int) -> None:
        levels = [lv for lv in range(self.spec.last_level + 1) if self.done(lv) or lv == extra]
        text = "".join(self.record(lv).json_line() + "\n" for lv in levels)
        _atomic(self.path / layout.LEVELS, lambda tmp: tmp.write_text(text))

    def mask(self, level: int) -> dict:
        return load_tensors(self.level_dir(level) / layout.MASK)

    def final(self, level: int) -> dict:
        return load_tensors(self.level_dir(level) / layout.FINAL)

    # ------------------------------------------------------------ rewind point
    def save_rewind(self, state: dict) -> None:
        save_tensors(self.path / layout.REWIND, state)

    def rewind(self, device="cpu") -> dict:
        return load_tensors(self.path / layout.REWIND, device)


def copy_draws(source: Path, dest: Path) -> None:
    """A level's early-bird draws (layout.draw) travel with it."""
    for f in sorted(Path(source).iterdir()):
        if layout.is_draw(f.name):
            shutil.copyfile(f, Path(dest) / f.name)


def state_of(net: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
