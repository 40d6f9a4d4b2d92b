"""A cluster that shares nothing but S3: three Ray nodes on 127.0.0.1, each with its own
temp folder (so no node can read another's local files), Tune storage and MLflow
artifacts in an S3 bucket served by moto on 127.0.0.1. A worker is lost mid-sweep and
the driver is killed; `lth sweep resume` finishes it from S3 alone."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import LTH, digits_base
from tests.test_cluster import LocalCluster
from tests.test_tracking import MlflowServer, free_port, kill_group, wait_until_up

BUCKET = "lth"


class S3Server:
    """moto's S3 server as a subprocess; `env` points boto3, pyarrow and MLflow at it."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url,
                    "MLFLOW_S3_ENDPOINT_URL": self.url}
        self.proc = None

    def start(self, timeout=60):
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until_up(self.url, timeout, "moto S3 server")
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self):
        kill_group(self.proc)


@pytest.fixture
def s3_world(tmp_path):
    """(S3 server, MLflow server with S3 artifacts, three-node cluster with separate temps)."""
    s3 = S3Server().start()
    server = MlflowServer(tmp_path / "mlflow", free_port(), artifacts=f"s3://{BUCKET}/mlartifacts", env=s3.env)
    server.folder.mkdir()
    cluster = LocalCluster(separate_temp=True, env=s3.env)
    try:
        server.start()
        yield s3, server, cluster.start(workers=2, gpus_per_worker=1, cpus_per_worker=1)
    finally:
        cluster.stop()
        server.stop()
        s3.stop()
        assert not cluster.pids(), "Ray processes survived the test"


def level_lines(lines: list) -> int:
    return sum(" level " in s and "density" in s for s in lines)


def read_until(proc, lines: list, count: int, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and level_lines(lines) < count:
        line = proc.stdout.readline()
        if not line:
            return
        lines.append(line)


def test_s3_only_cluster_loses_a_worker_and_the_driver_then_resume_finishes(tmp_path, s3_world):
    s3, mlflow_server, cluster = s3_world
    storage, name = f"s3://{BUCKET}/sweeps", "s3-sweep"
    driver_dir = tmp_path / "driver"  # the driver's own folder: nothing of the sweep may land here
    driver_dir.mkdir()
    sweep_file = driver_dir / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": name, "experiment": "s3", "base": digits_base(levels=3, iterations=600, eval_interval=50),
        # a control and its ticket: the control's IMP trunk is the ticket's, shared through S3
        "space": {"control": {"grid": ["none", "reinit"]}}, "seeds": 2,
        "resources": {"cpu": 0.5, "gpu": 0.5}, "max_failures": 3, "storage": storage,
        "tracking_uri": mlflow_server.uri}))
    env = {**cluster.env, "PYTHONUNBUFFERED": "1", "LTH_UNIT_LEASE_S": "10"}  # a lost holder's lease: 10 s
    driver = subprocess.Popen([LTH, "sweep", "run", str(sweep_file), "--address", cluster.address], cwd=driver_dir,
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list = []
    read_until(driver, lines, 4, 400)  # trials running on both workers: lose one
    os.kill(cluster.worker_raylets[0], signal.SIGKILL)
    read_until(driver, lines, 7, 400)  # the survivors go on; then the driver dies too
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert level_lines(lines) < 16, "the sweep finished before the driver was killed:\n" + "".join(lines)[-3000:]

    time.sleep(3)
    resumed = subprocess.run([LTH, "sweep", "resume", name, "--storage", storage, "--address", cluster.address],
                             cwd=driver_dir, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]

    status = subprocess.run([LTH, "sweep", "status", name, "--storage", storage], cwd=driver_dir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "4 done, 0 running, 0 pending of 4 trials" in status.stdout, status.stdout + status.stderr
    csv_key = f"sweeps/{name}/trials.csv"
    assert csv_key in s3.keys(f"sweeps/{name}/")
    body = s3.client().get_object(Bucket=BUCKET, Key=csv_key)["Body"]
    df = pd.read_csv(body)
    assert df.trial_id.nunique() == 4 and len(df) == 4 * 4 and set(df.status) == {"TERMINATED"}
    assert sorted(os.listdir(driver_dir)) == ["sweep.yaml"], "the driver wrote sweep files locally"
    # every shared unit (2 dense runs, 2 trunks x 3 levels) was published, none twice, although
    # a worker and the driver died while trials held some (a process killed between a unit's
    # DONE and its log entry leaves it without one: at most once, not exactly once)
    published = {k.removeprefix("sweeps/_units/").removesuffix("/DONE") for k in s3.keys("sweeps/_units/")
                 if k.endswith("/DONE")}
    trained = Counter(k.rsplit("/", 1)[1].split("--")[0] for k in s3.keys("sweeps/_units/_log/")
                      if k.endswith(".json"))
    assert len(published) == 8 and set(trained.values()) <= {1}, (published, trained)
    assert set(trained) <= {u.replace("/", "~") for u in published}
    assert len(published) - len(trained) <= 2  # unlogged: at most one per process killed (2 trials per worker)

    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_server.uri)
    exp = c.get_experiment_by_name("s3")
    children = c.search_runs([exp.experiment_id], filter_string="tags.`lth.kind` = 'trial'")
    assert len(children) == 4 and len({r.data.tags["lth.trial_key"] for r in children}) == 4
    for run in children:
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "test_acc")) == [0, 1, 2, 3]
    assert s3.keys("mlartifacts/"), "MLflow artifacts are not in S3"
    assert not (mlflow_server.folder / "artifacts").exists()

    best = subprocess.run([LTH, "tickets", "best", "--experiment", "s3", "--tracking-uri", mlflow_server.uri,
                           "--max-density", "0.6", "--top", "1", "--format", "json"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert best.returncode == 0, best.stderr
    top = json.loads(best.stdout)[0]
    out = tmp_path / "ticket"
    exported = subprocess.run([LTH, "tickets", "export", top["run_id"], "--level", str(top["level"]), "--out",
                               str(out), "--tracking-uri", mlflow_server.uri], env=env, capture_output=True,
                              text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr

    import torch

    from trials.nets import datasets
    from trials import load_ticket
    from trials.loop.arithmetic import evaluate

    ticket = load_ticket(out)
    assert ticket.record.level == top["level"] and ticket.source["run_id"] == top["run_id"]
    data = datasets.load(ticket.spec.dataset, torch.device("cpu"))
    _, acc = evaluate(ticket.model, data.test_x, data.test_y, lambda: torch.autocast("cpu", enabled=False))
    assert acc == pytest.approx(ticket.record.test_acc, abs=1e-6)
    assert Path(out / "mask.safetensors").exists()


def test_an_optuna_study_on_s3_is_mirrored_and_a_resume_elsewhere_starts_from_it(tmp_path, monkeypatch):
    """An SQLite study cannot live on S3: the driver's copy goes to STORAGE/NAME/optuna.db at
    every searcher save, and a driver on another machine (another temp folder) resumes from it."""
    import tempfile

    import optuna

    from orchestrator.sweep_spec import parse_sweep
    from orchestrator.sweeps import runner
    from orchestrator.sweeps.search import make_searcher

    s3 = S3Server().start()
    try:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "machine-a"))
        sweep = parse_sweep({"name": "tpe", "experiment": "s3", "base": digits_base(levels=1),
                             "space": {"prune.rate": {"uniform": [0.1, 0.3]}},
                             "search": {"algorithm": "optuna", "num_samples": 2},
                             "storage": f"s3://{BUCKET}/sweeps"}, tmp_path)
        study, mirror = runner._study_file(sweep, "tpe-study")
        assert mirror == f"s3://{BUCKET}/sweeps/tpe/optuna.db" and str(study).startswith(str(tmp_path / "machine-a"))
        searcher = make_searcher(sweep, "tpe-study", study, mirror)
        searcher.suggest("t1")
        searcher.on_trial_complete("t1", {"pack_members": [{"status": "done", "final_test_acc": 0.9}]})  # a pack of one
        searcher.save(str(tmp_path / "searcher.pkl"))
        assert f"sweeps/tpe/{'optuna.db'}" in s3.keys("sweeps/tpe/")

        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "machine-b"))  # another driver machine
        again, _ = runner._study_file(sweep, "tpe-study")
        assert again != study and again.exists()
        trials = optuna.load_study(study_name="tpe-study", storage=f"sqlite:///{again}").trials
        assert [t.value for t in trials] == [0.9]
    finally:
        s3.stop()
