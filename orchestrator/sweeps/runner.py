"""The sweep runner: Ray Tune drives one trainable, each Tune trial a pack of one or more
trials (orchestrator/sweeps/trainable.py, packs.py); the driver's callbacks log progress and MLflow. STORAGE/NAME/ is Tune's
experiment folder, with lth's own files beside its state (see storage.py).
"""
from __future__ import annotations

import logging
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import yaml
from ray import tune

from orchestrator.sweep_spec import Sweep, parse_sweep
from orchestrator.sweeps import cluster, preflight, progress, results
from orchestrator.sweeps.preflight import ray_address
from orchestrator.sweeps.search import grid_space, make_searcher, num_trials
from orchestrator.sweeps.storage import (STUDY_FILE, SWEEP_FILE, check_usable, read_bytes, read_text, sweep_path,
                                         write_text)
from orchestrator.tracking import store
from trials.core.errors import ConfigError


def _local(path: str) -> Path | None:
    return None if "://" in path else Path(path)


def _study_file(sweep: Sweep, study_name: str) -> tuple[Path, str | None]:
    """(Optuna's SQLite file, the storage copy it is mirrored to, or None). On a local
    folder the file sits next to the sweep. An SQLite file cannot live on S3/GCS: the
    driver works on a file in the machine's temp folder, named by the study, and copies
    it to STORAGE/NAME/optuna.db at every searcher checkpoint; a resume on any machine
    starts from that copy when it has no file of its own."""
    local = _local(sweep_path(sweep.storage, sweep.name))
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        return local / STUDY_FILE, None
    path = Path(tempfile.gettempdir()) / "lth-studies" / f"{study_name}.db"
    mirror = sweep_path(sweep.storage, sweep.name) + "/" + STUDY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = read_bytes(mirror)
        if saved is not None:
            path.write_bytes(saved)
    return path, mirror


def save_sweep(sweep: Sweep, study_name: str) -> None:
    text = yaml.safe_dump({"study_name": study_name, "sweep": sweep.to_dict()}, sort_keys=False)
    write_text(sweep_path(sweep.storage, sweep.name) + "/" + SWEEP_FILE, text)


def load_saved(storage: str, name: str, sweep: Sweep | None = None) -> tuple[Sweep, str]:
    """The sweep saved under `name` and its study's name; `sweep`: the same sweep, loaded
    already (its trials built: not built again)."""
    from orchestrator.sweep_spec import NAME

    if not NAME.ok(name):
        raise ConfigError("NAME", name, NAME.allowed)
    check_usable(storage, write=False)
    path = sweep_path(storage, name) + "/" + SWEEP_FILE
    text = read_text(path)
    if text is None:
        raise ConfigError("NAME", name, f"no sweep of that name under {storage} (looked for {path})")
    saved = yaml.safe_load(text)
    return sweep or parse_sweep(saved["sweep"], Path("/")), saved["study_name"]


def connect(sweep: Sweep, address: str | None, dashboard: bool = False) -> None:
    """Ray for the sweep, and a cluster judged once connected: by its alive nodes, else by
    its autoscaler's answer (orchestrator/sweeps/cluster.py), before the sweep's folder,
    MLflow run or broker exist. A local Ray was judged before (cluster.check_local)."""
    init_ray(address, dashboard)
    if address:
        cluster.check_cluster(sweep)


def checked_connect(sweep: Sweep, address: str | None, dashboard: bool = False) -> None:
    """`connect`, while the tracking store is checked (store.check_reachable) on a thread of
    its own: MLflow's import and its store's opening (about 1.4 s on 2 cores) run while
    Ray's processes start, which leaves the driver mostly waiting (ARCHITECTURE.md, "The
    sweep runner"). A store that does not answer is still one line and exit 2, with nothing
    written: a Ray this call started is shut down first (a Ray it found running is left),
    and Ray's start line ("Started a local Ray instance") is held back until the store
    answered."""
    import threading

    import ray

    failed: list = []
    held: list = []
    worker_log = logging.getLogger("ray._private.worker")  # where ray.init logs its start

    def hold(record) -> bool:
        held.append(record)
        return False

    def check():
        try:
            store.check_reachable(sweep.tracking_uri)
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread below
            failed.append(e)

    checking = threading.Thread(target=check, name="lth-tracking-check", daemon=True)
    checking.start()
    fresh = not ray.is_initialized()
    worker_log.addFilter(hold)
    try:
        connect(sweep, address, dashboard)
    finally:
        worker_log.removeFilter(hold)
        checking.join()
        for record in held if not failed else ():  # as Ray wrote them, now that the store answered
            worker_log.handle(record)
    if failed:
        if fresh:
            ray.shutdown()
        raise failed[0]


def init_ray(address: str | None, dashboard: bool = False) -> None:
    """An explicit address (--address, or RAY_ADDRESS under `ray job submit`), or a fresh
    local instance (never someone else's running cluster by accident), started lean unless
    `dashboard` (lean_start)."""
    import ray

    if ray.is_initialized():
        return
    # a notice at every start on a machine with ~/.ray/auth_token, not news; errors still show
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        if dashboard:
            ray.init(address="local", include_dashboard=True)
        else:
            with lean_start():
                ray.init(address="local", include_dashboard=False)
        _reap_agents()


def _reap_agents() -> None:
    """The local Ray's agents end with this process, even when it is killed (reaper.py)."""
    import ray
    from ray._private import ray_constants

    from orchestrator.sweeps import reaper

    try:
        node = ray._private.worker._global_node
        reaper.watch(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    except Exception as e:  # noqa: BLE001 - a sweep never fails for want of its reaper
        logging.getLogger(__name__).debug("no reaper for Ray's agents: %s", e)


@contextmanager
def lean_start():
    """A local Ray without the head processes a one-machine sweep never uses
    (ARCHITECTURE.md, "The sweep runner"): the dashboard's head process, which Ray 2.60
    starts even with include_dashboard=False (with its usage-stats module only) and waits
    for on the way, and the autoscaler's monitor (a local Ray cannot grow). The node's
    dashboard agent starts as in Ray's minimal install (`--minimal`: no metrics or
    dashboard modules, which serve only a dashboard), so the driver does not import the
    dashboard's dependencies to decide that (half a second on 2 cores). Ray's public
    `ray.init` offers no switch for any of these, so its head-node start is adjusted while
    ray.init runs; the node's own processes (raylet, its agents, the log monitor) are as
    Ray starts them."""
    from ray._private import utils
    from ray._private.node import Node

    start_api_server, start_head_processes = Node.start_api_server, Node.start_head_processes
    dependency_error = utils.get_dashboard_dependency_error

    def no_api_server(self, **_):
        self._webui_url = ""  # what Ray records when it starts no dashboard

    def head_processes(self):
        self._ray_params.no_monitor = True
        return start_head_processes(self)

    Node.start_api_server, Node.start_head_processes = no_api_server, head_processes
    utils.get_dashboard_dependency_error = lambda: ImportError("a lean start serves no dashboard")
    try:
        yield
    finally:
        Node.start_api_server, Node.start_head_processes = start_api_server, start_head_processes
        utils.get_dashboard_dependency_error = dependency_error


@contextmanager
def idle_workers_serve():
    """Tune's trial actors on the Ray workers that are already up (ARCHITECTURE.md, "The
    sweep runner"). Tune gives every trial actor a runtime environment of its own,
    `{"env_vars": {"PL_DISABLE_FORK": "1"}}` (a PyTorch Lightning switch; lth has no
    Lightning), plus the driver's values of a few variables it propagates (AWS keys, Tune's
    own switches). Ray serves an actor only from workers started with its runtime
    environment: the workers it prestarts with a local Ray (one per CPU) and the idle ones
    have none, so each trial actor waited for a worker process of its own to be started
    and import Ray, while a prestarted one stayed idle. Without Lightning's variable, a
    trial actor's environment is empty unless one of those variables is set (then as
    before), and an idle worker serves it."""
    from ray.tune.execution import class_cache

    saved = dict(class_cache.DEFAULT_ENV_VARS)
    class_cache.DEFAULT_ENV_VARS.pop("PL_DISABLE_FORK", None)
    try:
        yield
    finally:
        class_cache.DEFAULT_ENV_VARS.clear()
        class_cache.DEFAULT_ENV_VARS.update(saved)


def run(sweep: Sweep, address: str | None = None, dashboard: bool = False) -> list[dict]:
    """Start a sweep, or continue it when the same sweep already exists under its name.
    `dashboard`: a local Ray starts its dashboard too (a cluster's is the cluster's)."""
    if preflight.check(sweep, address):  # storage, name, a local Ray's size: before MLflow or Ray start
        return resume(sweep.name, sweep.storage, address, dashboard, sweep)
    quiet()
    address = ray_address(address)
    checked_connect(sweep, address, dashboard)  # before anything is written
    study_name = f"{sweep.name}-{uuid.uuid4().hex[:8]}"
    save_sweep(sweep, study_name)
    progress.planned(sweep, save=True)  # `lth sweep status` reads it instead of planning again
    from orchestrator.sweeps.callbacks import TRACKERS  # here: readers (`lth sweep status`) load no engine

    TRACKERS[sweep.name] = store.SweepTracker(sweep)
    _share(sweep)
    with idle_workers_serve():
        _tuner(sweep, study_name).fit()
    return _finish(sweep)


def resume(name: str, storage: str, address: str | None = None, dashboard: bool = False,
           sweep: Sweep | None = None) -> list[dict]:
    """Finish a sweep whose driver stopped: finished trials and levels are not rerun.
    `sweep`: the saved sweep, loaded already (by `run` or the CLI)."""
    sweep, study_name = load_saved(storage, name, sweep)
    quiet()
    address = ray_address(address)
    if not address:
        cluster.check_local(sweep)
    checked_connect(sweep, address, dashboard)
    progress.planned(sweep, save=True)  # saved again where the code changed since
    from orchestrator.sweeps.callbacks import TRACKERS

    TRACKERS[sweep.name] = store.SweepTracker(sweep)
    _share(sweep)
    path = sweep_path(sweep.storage, sweep.name)
    if sweep.search.algorithm != "grid":
        _study_file(sweep, study_name)  # the restored searcher reopens it: bring it back first
    with idle_workers_serve():
        if not tune.Tuner.can_restore(path):  # the driver died before Tune saved any state
            _tuner(sweep, study_name).fit()
        else:  # the restored Tuner brings back its pickled callbacks (progress, MLflow)
            tune.Tuner.restore(path, trainable=_trainable(sweep), resume_unfinished=True,
                               resume_errored=False, restart_errored=False,
                               param_space=grid_space(sweep) if sweep.search.algorithm == "grid" else None).fit()
    return _finish(sweep)


BROKERS: dict = {}  # sweep name -> its unit broker (a Ray actor lives while a handle does)


def _share(sweep: Sweep) -> int:
    """Start the sweep's unit broker with every planned unit (ARCHITECTURE.md, "Shared
    work"); how many of them are published already."""
    if not sweep.share:
        return 0
    from orchestrator import plan
    from orchestrator.sweeps.units import published_names, start_broker

    p = progress.full_plan(sweep)  # planned once per driver (the progress line asks too)
    on_storage = published_names(sweep.storage, sweep.packed)
    published = [name for name in p.units if name in on_storage]
    BROKERS[sweep.name] = start_broker(sweep.name, plan.registrations(p.units), published)  # alive while held
    print(f"lth: {len(p.units)} shared work units, {len(published)} already in {sweep.storage}",
          file=sys.stderr, flush=True)
    return len(published)


def _trainable(sweep: Sweep):
    from orchestrator.sweeps.trainable import lottery

    share = dict(storage=sweep.storage, sweep=sweep.name, packed=sweep.packed) if sweep.share else None
    stored = dict(storage=sweep.storage, sweep=sweep.name, keep_finals=sweep.keep_finals)
    fn = tune.with_parameters(lottery, tolerance=sweep.tolerance,
                              stop_when_not_matching=sweep.stop_when_not_matching, share=share, stored=stored)
    return tune.with_resources(fn, {"cpu": sweep.resources["cpu"], "gpu": sweep.resources["gpu"]})


def quiet() -> None:
    """Only lth's own output when a sweep goes well (README, "What a sweep that goes well
    prints"): set before a first run and before a resume alike (a restored Tuner is built
    by Tune, not by `_tuner`). A user's own environment settings win."""
    import os

    # Tune's new output engine prints a configuration table, the results path and a
    # TensorBoard hint to stdout (where lth's tables go) even at verbose=0; the legacy
    # reporter prints nothing at verbose=0. Trial errors still reach LevelProgress and
    # Ray's worker logs.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # the "(lottery pid=...)" prefix of worker lines Ray copies to the driver is coloured
    # unless RAY_COLOR_PREFIX=0 (read by Ray at every line): colour codes only at a terminal
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for name, level in (
            ("ray.tune.tune", logging.WARNING),  # "Wrote the latest version of all result files"
            ("ray.tune.execution.tune_controller", logging.WARNING),  # "Restoring the run from ..."
            # a restored run's trials that had reported nothing yet (results.collect reads checkpoints)
            ("ray.tune.analysis.experiment_analysis", logging.ERROR),
            # a pack's per-member lists in its results are no TensorBoard scalars
            ("ray.tune.logger.tensorboardx", logging.ERROR)):
        logging.getLogger(name).setLevel(level)


def _tuner(sweep: Sweep, study_name: str):
    from orchestrator.sweeps.callbacks import LevelProgress, MlflowLogger, NoTensorBoard

    study, mirror = (None, None) if sweep.search.algorithm == "grid" else _study_file(sweep, study_name)
    searcher = make_searcher(sweep, study_name, study, mirror)  # grid writes nothing locally
    return tune.Tuner(
        _trainable(sweep),
        param_space=grid_space(sweep) if searcher is None else {},
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=num_trials(sweep),
            max_concurrent_trials=sweep.max_concurrent,
            trial_dirname_creator=lambda trial: trial.trial_id,
            reuse_actors=True,  # a worker keeps torch imported and its dataset loaded
        ),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=sweep.storage, verbose=0,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures, fail_fast=False),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # the pack's states (tiny; older layouts: tensors)
            callbacks=[LevelProgress(sweep), MlflowLogger(sweep), NoTensorBoard()],
        ),
    )


def _finish(sweep: Sweep) -> list[dict]:
    """trials.csv, then MLflow reconciled with everything stored (cheap when nothing is
    missing: the tracker knows what it logged; a dead driver's gaps are filled here)."""
    from orchestrator.sweeps.callbacks import TRACKERS, drain, replay

    drain(sweep.name)  # the live writes made (Tune's end did, unless fit() raised)
    rows = results.collect(sweep)
    results.write_csv(sweep, rows)
    if not replay(sweep, lambda: TRACKERS[sweep.name], sweep_path(sweep.storage, sweep.name)):
        print(f"lth: MLflow at {sweep.tracking_uri} stayed unreachable; the results are safe in "
              f"{sweep_path(sweep.storage, sweep.name)}: `lth sweep resume {sweep.name}` replays them",
              file=sys.stderr)
    return rows
