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
ANSWER_SECONDS = 20.0  # how long a bucket may take to answer before the command gives up


def check_usable(storage: str, write: bool) -> None:
    """One line (ConfigError on `storage`) unless the sweep storage can be used, before
    anything is written: a local path must be (or be creatable as) a folder, writable when
    `write`; a bucket must answer within ANSWER_SECONDS (pyarrow's S3 client retries for
    long without a network, and its GCS client never gives up)."""
    import threading

    from trials.core.errors import check
    from trials.core.folders import check_folder

    if "://" not in storage:
        return check_folder(storage, "storage", write)
    outcome: dict = {}

    def probe() -> None:
        try:
            fs, p = filesystem(storage)
            fs.get_file_info(p)
            outcome["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            outcome["error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__

    thread = threading.Thread(target=probe, daemon=True)  # a hung client must not hold the process
    thread.start()
    thread.join(ANSWER_SECONDS)
    check("ok" in outcome, "storage", storage,
          f"a bucket that answers ({outcome['error']})" if "error" in outcome
          else f"a bucket that answers (none did within {ANSWER_SECONDS:.0f} s: no network, or no such endpoint?)")


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
