"""MLflow tracking against a real SQLite store and a real `mlflow server` on 127.0.0.1."""
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from orchestrator.sweeps import runner
from orchestrator.tracking import experiment_tickets
from lth.cli import main
from orchestrator.sweep_spec import load_sweep
from trials.nets import datasets
from trials import load_ticket
from trials.loop.arithmetic import evaluate
from tests.conftest import LTH, digits_base

BASE = digits_base(levels=2)


def sweep_file(tmp_path, name="tracked", **fields):
    data = {"name": name, "experiment": "exp", "base": BASE, "space": {"prune.kind": {"grid": [
        "unstructured", "structured"]}}, "seeds": 2, "resources": {"cpu": 1}, "max_concurrent": 2,
        "storage": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def runs_of(uri, experiment="exp"):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c, list(c.search_runs([exp.experiment_id]))


def assert_complete(uri, n_trials, levels, tensors=False):
    """`tensors`: a sweep with track_tensors (its tensors mirrored as ticket/...); else a
    trial run holds no file: metrics, params, tags and where its folder is (lth.folder)."""
    c, runs = runs_of(uri)
    parents = [r for r in runs if r.data.tags.get("lth.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("lth.kind") == "trial"]
    assert len(parents) == 1 and len(children) == n_trials
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        # named by what varies and the seed; the key is a tag; params: what IMP reads, no other method's
        assert r.info.run_name == f"prune.kind={r.data.params['prune.kind']} seed={r.data.tags['seed']}"
        assert len(r.data.tags["lth.trial_key"]) == 12 and r.info.status == "FINISHED"
        assert "prune.levels" in r.data.params and "train.lr" in r.data.params and "seed" in r.data.params
        assert not any(p.startswith(("supermask.", "at_init.")) for p in r.data.params), sorted(r.data.params)
        for metric in ("density", "effective_density", "test_acc", "early_stop_iteration", "test_acc_at_early_stop",
                       "val_loss", "seconds"):
            steps = [m.step for m in c.get_metric_history(r.info.run_id, metric)]
            assert sorted(steps) == list(range(levels + 1)), (metric, steps)
        folder = Path(r.data.tags["lth.folder"])
        assert [json.loads(line)["level"] for line in (folder / "levels.jsonl").read_text().splitlines()] == \
            list(range(levels + 1))
        if not tensors:
            assert not c.list_artifacts(r.info.run_id)
            continue
        files = {f.path for f in c.list_artifacts(r.info.run_id, "ticket")}
        assert "ticket/rewind.safetensors" in files
        assert {f"ticket/level_{lv:02d}" for lv in range(levels + 1)} <= files
        assert {f.path for f in c.list_artifacts(r.info.run_id, "ticket/level_01")} == {
            "ticket/level_01/mask.safetensors", "ticket/level_01/final.safetensors"}
        assert r.data.params["prune.rate"] == "0.3" and r.data.tags["seed"] in ("0", "1")
    return c, children


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("tracked")
    path = sweep_file(tmp)
    runner.run(load_sweep(path))
    return tmp, path, f"sqlite:///{tmp / 'mlflow.db'}"


def test_sqlite_store_holds_one_parent_and_a_child_per_trial(tracked_sweep):
    tmp, _, uri = tracked_sweep
    assert_complete(uri, n_trials=4, levels=2)
    assert (tmp / "mlartifacts" / "exp").is_dir()  # artifacts beside the database


def test_rerun_and_resume_add_no_run_and_no_step(tracked_sweep):
    tmp, path, uri = tracked_sweep
    runner.run(load_sweep(path))  # the same sweep again: continues (nothing left to do)
    runner.resume("tracked", str(tmp / "runs"))
    c, children = assert_complete(uri, n_trials=4, levels=2)
    for r in children:
        assert len(c.get_metric_history(r.info.run_id, "test_acc")) == 3


def test_exported_ticket_evaluates_to_its_recorded_accuracy(tracked_sweep, tmp_path, capsys):
    _, _, uri = tracked_sweep
    best = experiment_tickets.best("exp", uri, top=1)[0]
    out = tmp_path / "ticket"
    assert main(["tickets", "export", best["run_id"], "--level", str(best["level"]), "--out", str(out),
                 "--tracking-uri", uri]) == 0
    ticket = load_ticket(out)
    data = datasets.load(ticket.spec.dataset, torch.device("cpu"))
    _, acc = evaluate(ticket.model, data.test_x, data.test_y, lambda: torch.autocast("cpu", enabled=False))
    assert acc == ticket.record.test_acc == pytest.approx(best["test_acc"])
    for name, p in ticket.model.named_parameters():
        if name in ticket.mask:
            assert float((p.detach() * ~ticket.mask[name]).abs().sum()) == 0.0
    rewind = load_ticket(out, weights="rewind")
    assert not torch.equal(rewind.model.fc.weight, ticket.model.fc.weight)
    assert main(["tickets", "export", best["run_id"], "--level", "7", "--out", str(tmp_path / "x"),
                 "--tracking-uri", uri]) == 2
    assert "--level: 7 is not allowed; levels logged for this run: 0, 1, 2" in capsys.readouterr().err


def test_best_tickets_ranking_and_filters_on_known_data(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'known.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("known")
    known = {  # run -> [(density, test_acc_at_early_stop)] by level
        "a": [(1.0, 0.95), (0.5, 0.97), (0.25, 0.93)],
        "b": [(1.0, 0.96), (0.5, 0.96), (0.25, 0.98)],
    }
    ids = {}
    for name, levels in known.items():
        run = c.create_run(exp, run_name=name, tags={"lth.kind": "trial", "lth.trial_key": name,
                                                     "lth.sweep": "s", "lth.varied": "prune.rate"})
        c.log_param(run.info.run_id, "prune.rate", "0.2" if name == "a" else "0.4")
        for level, (density, acc) in enumerate(levels):
            c.log_batch(run.info.run_id, metrics=[
                Metric("density", density, 0, level), Metric("test_acc", acc - 0.01, 0, level),
                Metric("test_acc_at_early_stop", acc, 0, level), Metric("early_stop_iteration", 100 + level, 0, level)])
        ids[name] = run.info.run_id
    ranked = [(r["trial_key"], r["level"]) for r in experiment_tickets.best("known", uri, top=10)]
    assert ranked == [("b", 2), ("a", 1), ("b", 1), ("b", 0), ("a", 0), ("a", 2)]  # ties: sparser first
    assert [(r["trial_key"], r["level"]) for r in experiment_tickets.best("known", uri, max_density=0.5, min_acc=0.965)] == \
        [("b", 2), ("a", 1)]
    assert experiment_tickets.best("known", uri, top=1)[0]["prune.rate"] == 0.4
    assert [r["level"] for r in experiment_tickets.best("known", uri, metric="test_acc", top=2)] == [2, 1]
    assert main(["tickets", "best", "--experiment", "known", "--tracking-uri", uri, "--format", "json",
                 "--top", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in rows] == [ids["b"], ids["a"]] and rows[0]["early_stop_iteration"] == 102
    assert main(["tickets", "best", "--experiment", "known", "--tracking-uri", uri, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("run_id,")
    assert main(["tickets", "best", "--experiment", "nope", "--tracking-uri", uri]) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` subprocess: SQLite backend, artifacts in a temporary folder (or S3).
    One worker process unless asked for more (each worker imports MLflow before the
    server answers: mlflow's default of 4 about doubles a start on 2 cores)."""

    def __init__(self, folder: Path, port: int, artifacts: str | None = None, env: dict | None = None,
                 workers: int = 1):
        self.folder, self.port, self.proc, self.workers = folder, port, None, workers
        self.artifacts = artifacts or str(folder / "artifacts")  # a folder, or s3://bucket/prefix
        self.env = {**os.environ, **(env or {})}
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout=120):
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", self.artifacts, "--workers", str(self.workers)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=self.env)
        wait_until_up(f"{self.uri}/health", timeout, "mlflow server")
        return self

    def stop(self):
        kill_group(self.proc)


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server, never via a proxy


def wait_until_up(url: str, timeout: float, what: str) -> None:
    """Poll `url` until it answers (a server subprocess is ready), else fail naming `what`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            DIRECT.open(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not start within {timeout} s")


def kill_group(proc) -> None:
    """SIGKILL a server started with start_new_session=True, children included."""
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server", free_port())
    server.folder.mkdir()
    try:
        yield server.start()
    finally:
        server.stop()


def test_server_stopped_mid_sweep_and_restarted_loses_nothing(tmp_path, mlflow_server):
    base = {**BASE, "train": {**BASE["train"], "iterations": 300, "eval_interval": 50},
            "prune": {**BASE["prune"], "levels": 3}}
    path = sweep_file(tmp_path, base=base, tracking_uri=mlflow_server.uri, track_tensors=True)
    sweep = subprocess.Popen([LTH, "sweep", "run", str(path)], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    c = MlflowClient(mlflow_server.uri)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for the first logged level, then pull the plug
        exp = c.get_experiment_by_name("exp")
        if exp and any(r.data.metrics for r in c.search_runs([exp.experiment_id])):
            break
        time.sleep(0.5)
    mlflow_server.stop()
    time.sleep(3)
    mlflow_server.start()
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, out[-3000:]
    assert "MLflow unavailable" in out  # the outage really hit the live logging
    assert_complete(mlflow_server.uri, n_trials=4, levels=3, tensors=True)


def test_unreachable_server_one_line_exit_2_before_anything(tmp_path, capsys):
    path = sweep_file(tmp_path, tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert main(["sweep", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lth: error: tracking_uri: 'http://127.0.0.1:")
    assert "none answers there" in err and not (tmp_path / "runs").exists()


def test_a_driver_of_its_own_refuses_an_unreachable_store_in_one_line_and_stops_its_ray(tmp_path):
    """As a user runs it (a process of its own, no Ray up): the store is checked while Ray
    starts (runner.checked_connect), and one that does not answer is still one line and
    exit 2 with nothing written; Ray's start line is held back, and no process of the Ray
    it started is left."""
    import shutil
    import tempfile

    import psutil

    ray_tmp = tempfile.mkdtemp(prefix="lthr", dir="/tmp")  # Ray's sockets need a short path
    try:
        path = sweep_file(tmp_path, tracking_uri=f"http://127.0.0.1:{free_port()}")
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
        proc = subprocess.run([LTH, "sweep", "run", str(path)], cwd=tmp_path, capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("lth: error: tracking_uri: 'http://127.0.0.1:")
        assert not (tmp_path / "runs").exists()
        assert list(Path(ray_tmp).glob("ray/session_*")), "no Ray started: the check ran before Ray, not beside it"
        left = [p.info["name"] for p in psutil.process_iter(["name", "cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or ())]
        assert not left, f"left running: {left}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


class DyingProxy:
    """A real HTTP hop between lth and the `mlflow server`: it forwards every request, and
    at the first log-batch that carries metrics it lets the server store it, then kills
    the server and drops the connection before the answer reaches lth (a write that
    reached the store although the sender saw it fail). The server comes back on the
    same store `down_s` later."""

    def __init__(self, server: MlflowServer, down_s: float):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.server, self.down_s, self.killed = server, down_s, threading.Event()
        proxy = self

        class Hop(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                try:
                    up = http.client.HTTPConnection("127.0.0.1", proxy.server.port, timeout=60)
                    up.request(self.command, self.path, body=body, headers=headers)
                    answer = up.getresponse()
                    data = answer.read()
                except OSError:  # the server is down
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if (self.path.endswith("/runs/log-batch") and b'"metrics"' in body and answer.status == 200
                        and not proxy.killed.is_set()):
                    proxy.killed.set()
                    proxy.server.stop()  # stored, and now dead before it could answer
                    threading.Timer(proxy.down_s, proxy.server.start).start()
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Hop)
        self.uri = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()


def test_a_write_stored_before_the_server_died_is_not_logged_again(tmp_path, mlflow_server, ray_local,
                                                                  monkeypatch):
    """Exactly once in MLflow: the server stores a level's batch and dies before answering;
    it is restarted on the same store 2 s later. The sweep goes on, and at the end every
    metric of every trial holds each level once."""
    from orchestrator.tracking import store

    # the end-of-sweep replay waits for the server longer than its default minute: a
    # restart alone can take that long on a loaded 2-core machine
    monkeypatch.setattr(store, "sync", functools.partial(store.sync, attempts=60))
    proxy = DyingProxy(mlflow_server, down_s=2)
    try:
        path = sweep_file(tmp_path, name="outage", space={}, seeds=1, tracking_uri=proxy.uri,
                          base=digits_base(levels=2))
        runner.run(load_sweep(path))
    finally:
        proxy.close()
    assert proxy.killed.is_set()  # the outage really hit a stored write
    c, runs = runs_of(mlflow_server.uri)
    trial_runs = [r for r in runs if r.data.tags.get("lth.kind") == "trial"]
    assert len(trial_runs) == 1
    from trials.folder.record import OPTIONAL, TRACKED

    for metric in (m for m in TRACKED if m not in OPTIONAL):  # an optional one is not measured here
        steps = [m.step for m in c.get_metric_history(trial_runs[0].info.run_id, metric)]
        assert sorted(steps) == [0, 1, 2], (metric, steps)
