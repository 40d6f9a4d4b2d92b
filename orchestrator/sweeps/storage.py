"""Where a sweep lives: STORAGE/NAME/ on a local/NFS folder or s3:// / gs:// (through
pyarrow's filesystems). Imports neither ray nor the rest of the runner, so every module of
the sweep layer can use it. lth's files beside Tune's experiment state:

    lth_sweep.yaml   the validated sweep (absolute paths, study name): `resume` reads it
    optuna.db        the Optuna study (random/optuna search): the file itself on a local
                     folder; on s3:// / gs:// a copy the driver refreshes at every searcher
                     checkpoint and a resume (on any machine) starts from
    trials.csv       one row per trial x level, written at the end and by `status`
"""
from __future__ import annotations

from typing import Optional

SWEEP_FILE = "lth_sweep.yaml"
STUDY_FILE = "optuna.db"
TRIALS_CSV = "trials.csv"


def sweep_path(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def filesystem(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path if "://" in path else f"file://{path}")


def read_bytes(path: str) -> Optional[bytes]:
    import pyarrow.fs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.readall()


def read_text(path: str) -> Optional[str]:
    data = read_bytes(path)
    return None if data is None else data.decode()


def write_bytes(path: str, data: bytes) -> None:
    """Write whole (temporary name, then move) so no reader sees half a file."""
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p + ".tmp") as f:
        f.write(data)
    fs.move(p + ".tmp", p)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def checkpoint_dirs(fs, base: str) -> list[str]:
    """A trial's checkpoint folders in storage, oldest first."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                  and i.base_name.startswith("checkpoint_"))
