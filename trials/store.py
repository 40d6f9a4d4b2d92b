"""The trial folder: the file contract other parts of lth read (see DESIGN.md).

    OUT/spec.json                  resolved spec + key + package version + git sha
    OUT/levels.jsonl               one record per finished level, rebuilt from level_XX/record.json
    OUT/rewind.safetensors         the ticket's starting weights (level 0 after k iterations)
    OUT/level_XX/mask.safetensors  the mask that trained level XX
    OUT/level_XX/final.safetensors trained weights at the end of level XX
    OUT/level_XX/record.json       that level's record
    OUT/level_XX/DONE              written last

Every file is written to a temporary name and renamed, so a killed trial leaves no
half-written file. Tensors are safetensors: loading never unpickles.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trials.errors import ConfigError
from trials.version import code_version


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(cpu, str(tmp)))


def load_tensors(path: Path, device="cpu") -> dict:
    return load_file(str(path), device=str(device))


def write_json(path: Path, obj) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n"))


class TrialDir:
    def __init__(self, path, spec):
        self.path = Path(path)
        self.spec = spec

    # ------------------------------------------------------------ lifecycle
    def check(self) -> None:
        """Refuse a folder that holds another spec's trial (before anything is written)."""
        f = self.path / "spec.json"
        if f.exists():
            key = json.loads(f.read_text()).get("key")
            if key != self.spec.key:
                raise ConfigError("--out", str(self.path),
                                  f"it holds trial {key}, not {self.spec.key}; use another folder")

    def begin(self) -> None:
        self.check()
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "spec.json").exists():
            write_json(self.path / "spec.json",
                       {"key": self.spec.key, "spec": self.spec.to_dict(), **code_version()})

    def first_missing(self, levels: int) -> int:
        return next((lv for lv in range(levels + 1) if not self.done(lv)), levels + 1)

    def reopen_from(self, level: int) -> None:
        """Levels after a missing one derive from it: mark them not done so they are redone."""
        for d in sorted(self.path.glob("level_*")):
            if int(d.name.split("_")[1]) >= level and (d / "DONE").exists():
                (d / "DONE").unlink()

    # ------------------------------------------------------------ levels
    def level_dir(self, level: int) -> Path:
        return self.path / f"level_{level:02d}"

    def done(self, level: int) -> bool:
        return (self.level_dir(level) / "DONE").exists()

    def finish(self, level: int, mask: dict, final: dict, record: dict) -> None:
        d = self.level_dir(level)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(d / "mask.safetensors", mask)
        save_tensors(d / "final.safetensors", final)
        write_json(d / "record.json", record)
        self._write_levels(extra=level)
        (d / "DONE").write_text("")

    def copy_level(self, source: "TrialDir", level: int, record: dict) -> None:
        d = self.level_dir(level)
        d.mkdir(parents=True, exist_ok=True)
        for name in ("mask.safetensors", "final.safetensors"):
            shutil.copyfile(source.level_dir(level) / name, d / name)
        write_json(d / "record.json", record)
        self._write_levels(extra=level)
        (d / "DONE").write_text("")

    def record(self, level: int) -> dict:
        return json.loads((self.level_dir(level) / "record.json").read_text())

    def records(self) -> list[dict]:
        return [self.record(lv) for lv in range(self.spec.prune.levels + 1) if self.done(lv)]

    def _write_levels(self, extra: int) -> None:
        levels = [lv for lv in range(self.spec.prune.levels + 1) if self.done(lv) or lv == extra]
        text = "".join(json.dumps(self.record(lv), sort_keys=True) + "\n" for lv in levels)
        _atomic(self.path / "levels.jsonl", lambda tmp: tmp.write_text(text))

    def mask(self, level: int) -> dict:
        return load_tensors(self.level_dir(level) / "mask.safetensors")

    def final(self, level: int) -> dict:
        return load_tensors(self.level_dir(level) / "final.safetensors")

    # ------------------------------------------------------------ rewind point
    def save_rewind(self, state: dict) -> None:
        save_tensors(self.path / "rewind.safetensors", state)

    def rewind(self, device="cpu") -> dict:
        return load_tensors(self.path / "rewind.safetensors", device)


def state_of(net: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
