"""bench/sweep_bookkeeping.py's timer in every Python process of its sweep (Ray's workers
included: they inherit PYTHONPATH). Active only where LTH_BENCH_TIMES names a folder.
When one of the modules below is imported, the named functions are wrapped; a process
writes its seconds per category to LTH_BENCH_TIMES/<pid>.json after each Tune trial (and
the driver at its end). A timed call inside another timed call counts for the outer one.
The driver's MLflow writer thread (callbacks.Writer) reports its busy seconds as
"mlflow writer": overlapped with the sweep, so not part of the wall's split. Nothing in
lth is changed."""
import os

if os.environ.get("LTH_BENCH_TIMES"):
    import functools
    import importlib.abc
    import importlib.machinery
    import json
    import sys
    import time

    TIMES: dict = {}
    DEPTH = [0]
    TARGETS = {
        "trials.folder.store": [("TrialDir.begin", "folder"), ("TrialDir.finish", "folder"),
                                ("TrialDir.copy_level_from", "folder"), ("TrialDir.save_rewind", "folder")],
        "orchestrator.sweeps.trainable": [("note_node", "folder"), ("_Pack.flush", "checkpoints"),
                                          ("restore", "checkpoints"), ("persisted_after", "checkpoints"),
                                          ("_unit_store", "units"), ("lottery", "worker total")],
        "orchestrator.sweeps.units": [("UnitStore.claim", "units"), ("UnitStore.publish", "units"),
                                      ("UnitStore.published_names", "units"), ("UnitStore.register", "units"),
                                      ("UnitStore.points", "units")],
        "orchestrator.sweeps.callbacks": [("MlflowLogger.on_trial_start", "mlflow"),
                                          ("MlflowLogger.on_trial_result", "mlflow"),
                                          ("MlflowLogger.on_trial_complete", "mlflow"),
                                          ("MlflowLogger.on_trial_error", "mlflow"), ("replay", "mlflow end"),
                                          ("drain", "mlflow end")],
        "orchestrator.sweeps.runner": [("_finish", "tables and end")],
    }
    TARGETS["trials.store"] = TARGETS["trials.folder.store"]  # a commit before trials/ in wings (--ref)

    def dump():
        with open(os.path.join(os.environ["LTH_BENCH_TIMES"], f"{os.getpid()}.json"), "w") as f:
            json.dump(TIMES, f)

    def wrap(fn, category):
        outer = category == "worker total"

        def timed(*a, **k):
            start = time.perf_counter()
            top = outer or DEPTH[0] == 0
            DEPTH[0] += 0 if outer else 1
            try:
                return fn(*a, **k)
            finally:
                DEPTH[0] -= 0 if outer else 1
                if top:
                    TIMES[category] = TIMES.get(category, 0.0) + time.perf_counter() - start
                if outer:
                    dump()

        return functools.wraps(fn)(timed)  # pickled by reference, as the function it wraps

    def patch(module):
        for dotted, category in TARGETS[module.__name__]:
            owner, name = module, dotted
            if "." in dotted:
                cls, name = dotted.split(".")
                owner = getattr(module, cls)
            if getattr(owner, name, None) is not None:  # an older lth may lack it (--ref)
                setattr(owner, name, wrap(getattr(owner, name), category))
        writer = getattr(module, "Writer", None)
        if writer is not None:  # the MLflow writes off Tune's loop: their own thread's seconds
            close = writer.close

            def closed(self):
                close(self)
                TIMES["mlflow writer"] = TIMES.get("mlflow writer", 0.0) + self.busy

            writer.close = closed

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in TARGETS:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None:
                return None
            loader = spec.loader
            run = loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())
    import atexit

    atexit.register(dump)
