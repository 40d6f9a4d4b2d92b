"""Shared work units in the sweep's storage (ARCHITECTURE.md, "Shared work").

    STORAGE/_units/<unit name>/...      a unit's files (trials/runner/shared.py names them);
                                        DONE is written last: a unit counts only then
    STORAGE/_units/_log/<unit>--<id>.json   one file per unit trained: who, where, how long
                                        (written after DONE: a process killed in between
                                        leaves a published unit without one)
    STORAGE/_units/_packed/...          the same for sweeps with packs (units_root says why)

Units live beside the sweeps, not inside one, so every later sweep on the same storage
reuses them. Who trains a unit is decided by the sweep's `Broker`, a Ray actor on the
driver's node: it leases a unit to one trial process at a time; the holder renews its
leases from a heartbeat thread, and a lease not renewed for `LTH_UNIT_LEASE_S` seconds
(default 60: a lost node, a killed process) passes to the next trial that asks. A trial
that needs a unit someone else holds does not wait idle: it asks the broker for any
other unit whose inputs are published (breadth-first over the sweep's plan) and trains
that meanwhile. Storage alone cannot decide "exactly one holder" (S3 through pyarrow has
no create-if-absent), hence the actor; the files stay the truth: a unit published by an
earlier sweep or driver is used whatever the broker knows.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import ray

from orchestrator.sweeps.storage import filesystem, write_text
from trials.core.errors import env_number

UNITS_DIR = "_units"
LOG_DIR = "_log"
PACKED_DIR = "_packed"
DONE = "DONE"
NAMESPACE = "lth"
POLL_SECONDS = 0.25
CACHE_UNITS = 32  # units a process keeps fetched (a VGG trunk level is ~75 MB); older are fetched again
SCRATCH_PREFIX = "lth-units-"  # a process's own scratch folder in the node's temp folder, holding its pid
STALE_SCRATCH_SECONDS = 86400  # a scratch folder with no pid (written before pids were) this old is removed


def lease_seconds() -> float:
    return env_number("LTH_UNIT_LEASE_S", 60.0)


def units_root(storage: str, packed: bool = False) -> str:
    """Where a sweep's units live: packed sweeps keep theirs apart (PACKED_DIR), because a
    pack's numbers are close to a single trial's, not the same bits (ARCHITECTURE.md,
    "Packs in sweeps"): an unpacked sweep never reads them."""
    return f"{storage.rstrip('/')}/{UNITS_DIR}" + (f"/{PACKED_DIR}" if packed else "")


def broker_name(sweep_name: str) -> str:
    return f"lth-units-{sweep_name}"


@ray.remote(num_cpus=0)
class Broker:
    """Leases on units and the queue of work ready to be done (see module doc)."""

    def __init__(self, lease: float):
        from orchestrator.sweeps.workers import quiet_exit

        quiet_exit()  # no "SystemExit: 1" traceback when Ray stops this actor (workers.py)
        self.lease = lease
        self.units: dict = {}  # name -> {"deps", "spec", "data"}, in registration order
        self.points: dict = {}  # dense unit -> rewind points the sweep asks for
        self.published: set = set()
        self.failed: set = set()  # units whose training raised: not offered to helpers again
        self.leases: dict = {}  # name -> (owner, expiry on this actor's clock)
        self.takeovers: list = []  # (unit, previous holder): leases that expired

    def lease_seconds(self) -> float:
        return self.lease

    def register(self, units: list, published: list = ()) -> None:
        for u in units:
            self.units.setdefault(u["name"], u)
            self.points.setdefault(u["name"], set()).update(u.get("points", ()))
        self.published.update(published)

    def points_of(self, dense: str) -> list:
        return sorted(self.points.get(dense, ()))

    def claim(self, name: str, owner: str) -> str:
        """"published", "yours" (train it, then release) or "held" (someone alive is)."""
        if name in self.published:
            return "published"
        now = time.monotonic()
        holder = self.leases.get(name)
        if holder and holder[0] != owner:
            if holder[1] > now:
                return "held"
            self.takeovers.append((name, holder[0]))
        self.leases[name] = (owner, now + self.lease)
        return "yours"

    def renew(self, owner: str) -> None:
        expiry = time.monotonic() + self.lease
        for name, (holder, _) in list(self.leases.items()):
            if holder == owner:
                self.leases[name] = (owner, expiry)

    def release(self, name: str, owner: str, published: bool, failed: bool = False) -> None:
        if published:
            self.published.add(name)
        if failed:
            self.failed.add(name)
        if self.leases.get(name, (None,))[0] == owner:
            del self.leases[name]

    def unpublish(self, name: str) -> None:
        self.published.discard(name)

    def next_ready(self, owner: str, data: str) -> Optional[tuple]:
        """A unit nobody holds whose inputs are published (leased to `owner`), or None."""
        now = time.monotonic()
        for name, u in self.units.items():
            if name in self.published or name in self.failed or u["data"] != data:
                continue
            holder = self.leases.get(name)
            if holder and holder[1] > now:
                continue
            if all(d in self.published for d in u["deps"]):
                self.leases[name] = (owner, now + self.lease)
                return name, u["spec"]
        return None

    def state(self) -> dict:
        return {"published": len(self.published), "leases": len(self.leases), "takeovers": list(self.takeovers)}


def start_broker(sweep_name: str, units: list, published: list):
    """The sweep's broker on this (the driver's) node, holding the plan's units."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    broker = Broker.options(
        name=broker_name(sweep_name), namespace=NAMESPACE, get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(lease_seconds())
    ray.get(broker.register.remote(units, published))
    return broker


def find_broker(sweep_name: str):
    try:
        return ray.get_actor(broker_name(sweep_name), namespace=NAMESPACE)
    except ValueError:
        return None


def remove_dead_scratch(folder: Optional[str] = None) -> list:
    """Remove the scratch folders (cached units, up to CACHE_UNITS of them) of UnitStores
    whose process is gone: Ray ends its workers without running atexit, so each worker
    process of each sweep used to leave one in the node's temp folder (682 of up to 42 MB
    on the development machine, which filled its disk). A folder whose pid file names a
    live process, or that has no pid file yet (being created), stays; one with no pid file
    older than STALE_SCRATCH_SECONDS is from before pid files and goes. Returns those removed."""
    removed = []
    for d in Path(folder or tempfile.gettempdir()).glob(SCRATCH_PREFIX + "*"):
        pid_file = d / "pid"
        try:
            if pid_file.exists():
                dead = not _alive(int(pid_file.read_text()))
            else:
                dead = time.time() - d.stat().st_mtime > STALE_SCRATCH_SECONDS
        except (OSError, ValueError):  # gone meanwhile, or not a pid: leave it
            continue
        if dead:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True  # or PermissionError: another user's process


class UnitStore:
    """trials.runner.shared.Units on the sweep's storage, with the broker's leases (module doc).
    `helper(name, spec_dict)` trains another unit while this one waits; `data` says which
    units it can train (those on the same dataset and device)."""

    def __init__(self, storage: str, broker=None, scratch: Optional[Path] = None, packed: bool = False):
        self.root = units_root(storage, packed)
        self.fs, self.base = filesystem(self.root)
        # the arithmetic of its units: its folder's kind of numbers (units_root)
        from trials.runner.levels import Producer
        from trials.loop.stacked import Stacked
        from trials.loop.arithmetic import Alone

        self.producer = Producer(Stacked if packed else Alone)
        self.broker = broker
        self.owner = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if scratch is None:
            remove_dead_scratch()
            scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
            (scratch / "pid").write_text(str(os.getpid()))
            atexit.register(shutil.rmtree, scratch, True)  # not run where Ray kills a worker: see remove_dead_scratch
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.cache = self.scratch / "cache"
        # the units in the cache, oldest first (a scratch folder given may hold some already)
        found = sorted(self.cache.rglob(DONE), key=lambda f: f.stat().st_mtime) if self.cache.is_dir() else []
        self.cached: dict = dict.fromkeys(marker.parent for marker in found)
        self.helper: Optional[Callable] = None
        self.data = ""
        self.helping = False
        self.waited = 0.0  # seconds spent with nothing to do
        self.unseen: Counter = Counter()  # unit -> claims the broker called published that storage did not show
        self.stopped = threading.Event()  # set: the heartbeat ends (close, or this store collected)
        self.heartbeat: Optional[threading.Thread] = None
        if broker is not None:
            self.lease = self._call("lease_seconds") or lease_seconds()
            weakref.finalize(self, self.stopped.set)
            self.heartbeat = threading.Thread(target=_heartbeat, args=(weakref.ref(self), self.stopped, self.lease / 4),
                                              name="lth-units-heartbeat", daemon=True)
            self.heartbeat.start()

    def close(self) -> None:
        """Stop renewing leases (the heartbeat ends within a beat)."""
        self.stopped.set()

    # ------------------------------------------------------------ trials.runner.shared.Units
    def points(self, dense: str) -> set:
        return set(self._call("points_of", dense) or ())

    def claim(self, name: str) -> tuple[str, Optional[Path]]:
        local = self.cache / name
        if (local / DONE).exists():
            return "published", local
        if self.published(name):
            self._download(name, local)
            self._tell("release", name, self.owner, True)
            return "published", local
        verdict = "yours" if self.broker is None else self._call("claim", name, self.owner) or "yours"
        if verdict == "published":  # the broker says so, storage does not (yet): held until it does,
            self.unseen[name] += 1  # and after a while believe storage (files removed by hand)
            if self.unseen[name] > 20:
                self._tell("unpublish", name)
            return "held", None
        return verdict, None

    def obtain(self, name: str, produce: Callable[[Path], None], pack: int = 1) -> tuple[Path, bool]:
        while True:
            verdict, local = self.claim(name)
            if verdict == "published":
                return local, False
            if verdict == "yours":
                return self.publish(name, produce, pack), True
            if self.helping or not self._help():
                time.sleep(POLL_SECONDS)
                self.waited += POLL_SECONDS

    def register(self, units: list) -> None:
        """Tell the broker about units (plan.registrations) it may hand to helpers."""
        self._tell("register", units)

    # ------------------------------------------------------------ storage
    def published_names(self) -> set:
        """Every unit published in this storage (one recursive listing)."""
        return _published(self.fs, self.base)

    def published(self, name: str) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(f"{self.base}/{name}/{DONE}").type == pyarrow.fs.FileType.File

    def _download(self, name: str, local: Path) -> None:
        import pyarrow.fs

        tmp = Path(tempfile.mkdtemp(dir=self.scratch, prefix=".fetch-"))
        (tmp / "unit").mkdir()
        pyarrow.fs.copy_files(f"{self.base}/{name}", str(tmp / "unit"), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        local.parent.mkdir(parents=True, exist_ok=True)
        if not local.exists():  # else another thread of this process fetched it first
            os.replace(tmp / "unit", local)
        shutil.rmtree(tmp, ignore_errors=True)
        self._evict(local)

    def publish(self, name: str, produce: Callable[[Path], None], pack: int = 1,
                seconds: Optional[float] = None) -> Path:
        import pyarrow.fs

        local = self.cache / name
        tmp = Path(tempfile.mkdtemp(dir=self.scratch, prefix=".unit-"))
        unit, started, ok = tmp / "unit", time.perf_counter(), False
        try:
            unit.mkdir()
            produce(unit)
            seconds = time.perf_counter() - started if seconds is None else seconds
            target = f"{self.base}/{name}"
            self.fs.create_dir(target, recursive=True)
            pyarrow.fs.copy_files(str(unit), target, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=self.fs)
            with self.fs.open_output_stream(f"{target}/{DONE}") as f:  # published: written last
                f.write(b"")
            ok = True
            self._log(name, unit, seconds, pack)
            (unit / DONE).write_text("")
            local.parent.mkdir(parents=True, exist_ok=True)
            if local.exists():
                shutil.rmtree(local)
            os.replace(unit, local)
            self._evict(local)
            return local
        finally:
            self._tell("release", name, self.owner, ok, not ok)
            shutil.rmtree(tmp, ignore_errors=True)

    def _evict(self, keep: Path) -> None:
        """Bound the cache: `keep` (just added) is the newest unit; the least recently added
        beyond CACHE_UNITS go, and so do the folders they leave empty. The store keeps the
        list (a walk of the cache per unit grew with every unit the process had seen)."""
        self.cached.pop(keep, None)
        self.cached[keep] = None
        while len(self.cached) > CACHE_UNITS:
            old = next(iter(self.cached))
            del self.cached[old]
            shutil.rmtree(old, ignore_errors=True)
            for parent in old.parents:
                if parent == self.cache or self.cache not in parent.parents:
                    break
                try:
                    parent.rmdir()  # only when empty
                except OSError:
                    break

    def _log(self, name: str, unit: Path, seconds: float, pack: int) -> None:
        """`pack`: how many trials trained together (1: alone); `seconds`: this unit's share."""
        record = unit / "record.json"
        iterations = json.loads(record.read_text())["iterations"] if record.exists() else None
        if name.startswith("point/"):
            iterations = int(name.rsplit("-", 1)[1])
        entry = {"unit": name, "owner": self.owner, "node": _node(), "seconds": seconds,
                 "iterations": iterations, "pack": pack, "time": time.time()}
        write_text(f"{self.root}/{LOG_DIR}/{name.replace('/', '~')}--{uuid.uuid4().hex[:8]}.json",
                   json.dumps(entry))

    # ------------------------------------------------------------ broker
    def _help(self) -> bool:
        """Train one other ready unit (True), or say there is none (False)."""
        if self.broker is None or self.helper is None:
            return False
        found = self._call("next_ready", self.owner, self.data)
        if not found:
            return False
        name, spec = found
        self.helping = True
        try:
            self.helper(name, spec)
        except Exception as e:  # noqa: BLE001 - another trial's unit: that trial reports it
            print(f"lth: helping with unit {name} failed ({e}); its own trial will say why",
                  file=sys.stderr, flush=True)
        finally:
            self.helping = False
        return True

    def _call(self, method: str, *args):
        if self.broker is None:
            return None
        try:
            return ray.get(getattr(self.broker, method).remote(*args))
        except Exception as e:  # noqa: BLE001 - the broker gone: train what is needed unleased
            print(f"lth: unit broker unreachable ({type(e).__name__}); training shared units "
                  "without leases", file=sys.stderr, flush=True)
            self.broker = None
            return None

    def _tell(self, method: str, *args) -> None:
        if self.broker is not None:
            try:
                getattr(self.broker, method).remote(*args)
            except Exception:  # noqa: BLE001 - best effort; a lease then simply expires
                pass



def _heartbeat(ref: weakref.ref, stopped: threading.Event, every: float) -> None:
    """Renew a store's leases while the store lives, is not closed and Ray is up. It holds
    the store weakly, so it ends with it; and it never calls the broker once Ray is shut
    down: an actor call then starts a new Ray instance (at a process's exit, logging to
    closed streams)."""
    while not stopped.wait(every):
        store = ref()
        if store is None or not ray.is_initialized():
            return
        store._tell("renew", store.owner)
        del store


def _node() -> Optional[str]:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def published_names(storage: str, packed: bool = False) -> set:
    """Every unit published in `storage` (UnitStore.published_names without a store: a
    reader such as `lth sweep status` loads no engine)."""
    return _published(*filesystem(units_root(storage, packed)))


def _published(fs, base: str) -> set:
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
    prefix = base.rstrip("/") + "/"
    return {i.path[len(prefix):].rsplit("/", 1)[0] for i in infos
            if i.type == pyarrow.fs.FileType.File and i.base_name == DONE}


def trained_log(storage: str, packed: bool = False) -> list[dict]:
    """Every unit training logged in this storage (for tests, plans and benchmarks)."""
    import pyarrow.fs

    fs, base = filesystem(f"{units_root(storage, packed)}/{LOG_DIR}")
    entries = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.File and info.base_name.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                entries.append(json.loads(f.readall().decode()))
    return entries
