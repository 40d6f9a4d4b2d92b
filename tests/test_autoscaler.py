"""Autoscaling as `ray up cluster.yaml` sets it up, on one machine, without a cloud.

Ray's fake multi-node provider starts and stops worker nodes as processes on this machine
(head: `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`), driven by the real
autoscaler (v2, what `ray up` runs since Ray 2.50). The test's autoscaling config is
derived by code from cluster.yaml's own `available_node_types`, head type,
min/max_workers and idle timeout (`fake_config`), so a change there changes what is
tested. Scaled to fit this 2-core machine, and said so: CPU counts are logical and scaled
so the largest worker type has 2; GPUs are logical (`--num-gpus`); at most 2 workers; the
idle timeout is 6 s. The Ray 2.60 wheel lacks the provider's example.yaml, which the v2
autoscaler reads for defaults of `type: fake_multinode`, so the provider is named as an
`external` module (whose defaults are built in) and the config is complete.

The sweep asks for GPUs on a head without any; the autoscaler starts GPU workers; trials
run there (trials.csv's node column); a worker killed mid-sweep (a vanished spot node)
costs no finished level and trains no unit twice; every trial finishes; the idle workers
are removed. A request no node type can hold is refused before anything starts.
"""
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import assert_each_level_trained_once, digits_base
from tests.test_cluster import BIN, ROOT, LocalCluster

FAKE_HEAD_ID = "f" * 51 + "00000"  # the fake provider's fixed head node id
REAL_CORES = 2  # what the fake nodes' logical CPUs are scaled to (this machine's cores)
MAX_WORKERS = 2
IDLE_MINUTES = 0.1


def fake_config(cluster_yaml: Path, gcs_address: str) -> dict:
    """The fake provider's autoscaling config from cluster.yaml's node types (see module doc)."""
    real = yaml.safe_load(cluster_yaml.read_text())
    types = real["available_node_types"]
    workers = {n: t for n, t in types.items() if n != real["head_node_type"]}
    most = max(t["resources"].get("CPU", 1) for t in workers.values())

    def scaled(resources: dict) -> dict:
        out = dict(resources)
        if out.get("CPU"):
            out["CPU"] = max(1, round(out["CPU"] * REAL_CORES / most))
        return out

    nodes = {"ray.head.default": {"resources": scaled(types[real["head_node_type"]]["resources"]),
                                  "node_config": {}, "max_workers": 0}}  # the provider's head type name
    for name, t in workers.items():
        nodes[name] = {"resources": {**scaled(t["resources"]), "object_store_memory": 200 * 2**20},
                       "node_config": {}, "min_workers": t.get("min_workers", 0),
                       "max_workers": min(t.get("max_workers", MAX_WORKERS), MAX_WORKERS)}
    return {
        "cluster_name": real["cluster_name"], "max_workers": min(real["max_workers"], MAX_WORKERS),
        "upscaling_speed": real.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": min(real["idle_timeout_minutes"], IDLE_MINUTES),
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": gcs_address, "head_node_id": FAKE_HEAD_ID, "launch_multiple": True,
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": nodes, "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [],
        "rsync_filter": [], "file_mounts_sync_continuously": False, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def test_fake_config_follows_cluster_yaml(tmp_path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = fake_config(ROOT / "cluster.yaml", "127.0.0.1:1")
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own schema, defaults filled
    workers = {n for n in real["available_node_types"] if n != real["head_node_type"]}
    assert set(config["available_node_types"]) == workers | {"ray.head.default"}
    for name in workers:
        have, want = config["available_node_types"][name], real["available_node_types"][name]
        assert have["resources"].get("GPU") == want["resources"].get("GPU")
        assert have["min_workers"] == want.get("min_workers", 0)
    head = real["available_node_types"][real["head_node_type"]]["resources"]
    assert config["available_node_types"]["ray.head.default"]["resources"] == head
    bigger = copy.deepcopy(real)  # a change in cluster.yaml is a change in what is tested
    bigger["available_node_types"]["gpu_spot"]["resources"]["GPU"] = 4
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(bigger))
    assert fake_config(path, "127.0.0.1:1")["available_node_types"]["gpu_spot"]["resources"]["GPU"] == 4


WATCH = """
import json, sys, time
from ray._raylet import GcsClient
from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply
gcs, seen, t0 = GcsClient(sys.argv[1]), None, time.time()
while True:
    try:
        reply = GetClusterStatusReply.FromString(gcs.get_cluster_status(timeout_s=10))
    except Exception as e:
        print(json.dumps({"t": time.time(), "error": str(e)[:200]}), flush=True)
        time.sleep(1)
        continue
    nodes = sorted((n.node_id.hex(), n.ray_node_type_name, n.status, dict(n.total_resources))
                   for n in reply.cluster_resource_state.node_states)
    if nodes != seen:
        seen = nodes
        print(json.dumps({"t": time.time(), "nodes": nodes}), flush=True)
    time.sleep(0.25)
"""
DEAD = 2  # autoscaler.proto's NodeStatus (RUNNING 1, IDLE 3)


class Watcher:
    """The autoscaler's view of the nodes (the GCS's cluster status), each change with its time."""

    def __init__(self, cluster):
        self.events: list = []
        self.proc = subprocess.Popen([sys.executable, "-c", WATCH, cluster.address], env=cluster.env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            event = json.loads(line)
            if "nodes" in event:
                self.events.append(event)

    def alive_workers(self) -> list:
        nodes = self.events[-1]["nodes"] if self.events else []
        return [n for n in nodes if n[0] != FAKE_HEAD_ID and n[2] != DEAD]

    def wait(self, what, condition, timeout: float):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return time.time()
            time.sleep(0.25)
        raise AssertionError(f"not within {timeout:.0f} s: {what}; last: {self.events[-1:]}")

    def stop(self):
        self.proc.kill()


class AutoscalingCluster(LocalCluster):
    def start_autoscaling(self, v2: bool = True):
        """The head with the autoscaler (v2 as `ray up` runs it; v1 with v2=False)."""
        config = Path(self.temp) / "autoscaling.yaml"
        config.write_text(yaml.safe_dump(fake_config(ROOT / "cluster.yaml", self.address)))
        head = yaml.safe_load(config.read_text())["available_node_types"]["ray.head.default"]
        self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                         "RAY_enable_autoscaler_v2": "1" if v2 else "0", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID,
                         "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID})
        self._ray("--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                  f"--num-cpus={head['resources'].get('CPU', 0)}", f"--num-gpus={head['resources'].get('GPU', 0)}",
                  "--include-dashboard=false", f"--dashboard-port={self.ports.one()}",
                  f"--ray-client-server-port={self.ports.one()}", f"--autoscaling-config={config}")
        for name in ("RAY_FAKE_CLUSTER", "RAY_CLOUD_INSTANCE_ID", "RAY_OVERRIDE_NODE_ID_FOR_TESTING"):
            del self.env[name]  # the nodes have theirs; the drivers need none
        return self

    def busy_raylet(self):
        """The pid of a worker node's raylet whose worker processes run a Tune trial, or None."""
        import psutil

        for pid in self.pids("raylet"):
            try:
                raylet = psutil.Process(pid)
                if f"--node_id={FAKE_HEAD_ID}" in raylet.cmdline():
                    continue
                if any("ImplicitFunc" in " ".join(c.cmdline()) for c in raylet.children()):
                    return pid
            except psutil.Error:
                continue
        return None

    def vanish(self, raylet: int) -> None:
        """Kill a node as a lost machine goes: its raylet and every process under it at once."""
        import psutil

        node = psutil.Process(raylet)
        for p in [node, *node.children(recursive=True)]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass


@pytest.fixture
def autoscaling():
    c = AutoscalingCluster()
    try:
        yield c.start_autoscaling()
    finally:
        c.stop()
        assert not c.pids(), "Ray processes survived the test"


def _sweep_file(tmp_path, **changes) -> Path:
    path = tmp_path / "autoscale.yaml"
    path.write_text(yaml.safe_dump({
        "name": "autoscale", "experiment": "autoscale", "base": digits_base(levels=3, iterations=300, eval_interval=50),
        "space": {"prune.kind": {"grid": ["unstructured", "structured"]}}, "seeds": 2,
        "resources": {"cpu": 1, "gpu": 0.5}, "max_failures": 3,
        "storage": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **changes}))
    return path


def test_autoscaled_gpu_workers_run_a_sweep_lose_one_and_go_idle(tmp_path, autoscaling):
    cluster, t0 = autoscaling, time.time()
    watch = Watcher(cluster)
    timeline: dict = {}
    try:
        watch.wait("the head in the autoscaler's view", lambda: bool(watch.events), 60)
        assert watch.alive_workers() == []  # nothing but the head (no GPU) before the sweep

        # a request no node type holds: one line, exit 2, nothing made, nothing started
        sweep_file = _sweep_file(tmp_path)
        refused = subprocess.run([str(BIN / "lth"), "sweep", "run", str(sweep_file), "--address", cluster.address,
                                  "--set", "resources.gpu=2"], cwd=tmp_path, env=cluster.env, text=True,
                                 capture_output=True, timeout=300)
        errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("lth: error")]
        assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-3000:]
        assert "resources: {'cpu': 1.0, 'gpu': 2.0} is not allowed" in errors[0]
        assert "its autoscaler can start no node type that holds it" in errors[0], errors[0]
        assert not (tmp_path / "runs").exists()
        timeline["refused_s"] = time.time() - t0
        assert watch.alive_workers() == [], "a refused request started a node"

        start = time.time()
        driver = subprocess.Popen([str(BIN / "lth"), "sweep", "run", str(sweep_file), "--address", cluster.address],
                                  cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={**cluster.env, "PYTHONUNBUFFERED": "1", "LTH_UNIT_LEASE_S": "10"})
        lines: list = []
        threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True).start()
        up = watch.wait("a GPU worker", lambda: any(n[3].get("GPU") for n in watch.alive_workers()), 240)
        timeline["first_gpu_worker_s"] = up - start
        watch.wait("two levels reported", lambda: sum(" level " in s and "density" in s for s in lines) >= 2, 400)
        watch.wait("a worker running trials", lambda: cluster.busy_raylet(), 120)
        cluster.vanish(cluster.busy_raylet())  # a spot node vanishes mid-sweep
        timeline["killed_s"] = time.time() - start
        status = subprocess.run([str(BIN / "lth"), "sweep", "status", "autoscale", "--storage", str(tmp_path / "runs")],
                                cwd=tmp_path, env=cluster.env, text=True, capture_output=True, timeout=300)
        counts = [s for s in status.stdout.splitlines() if s.startswith("progress: ")]  # from another shell
        assert status.returncode == 0 and len(counts) == 1 and counts[0].startswith("progress: levels "), status
        assert status.stdout.splitlines()[0].endswith(" of 4 trials"), status  # the trials: counted once, above
        timeline["status_while_running"] = counts[0]
        driver.wait(timeout=900)
        out = "".join(lines)
        timeline["sweep_s"] = time.time() - start
        assert driver.returncode == 0, out[-4000:]
        assert "lth: waiting for nodes" in out and "the autoscaler is starting gpu_" in out, out[:3000]

        df = pd.read_csv(tmp_path / "runs" / "autoscale" / "trials.csv")
        assert set(df.status) == {"TERMINATED"} and df.trial_id.nunique() == 4
        gpu_nodes = {n[0] for e in watch.events for n in e["nodes"] if n[3].get("GPU")}
        assert set(df.node_id) <= gpu_nodes and FAKE_HEAD_ID not in set(df.node_id), (set(df.node_id), gpu_nodes)
        types = {n[1] for e in watch.events for n in e["nodes"] if n[0] != FAKE_HEAD_ID}
        real = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
        assert types and all(real[t]["resources"].get("GPU") for t in types), types
        for trial_dir in (tmp_path / "runs" / "autoscale").glob("*_0000*"):
            assert_each_level_trained_once(trial_dir, levels=3)
        from ray.tune import ExperimentAnalysis

        from orchestrator.sweeps.units import UnitStore, trained_log

        trials = ExperimentAnalysis(str(tmp_path / "runs" / "autoscale")).trials
        assert any(t.run_metadata.num_failures > 0 for t in trials), "no trial was interrupted"
        published = UnitStore(str(tmp_path / "runs")).published_names()
        trained = Counter(e["unit"] for e in trained_log(str(tmp_path / "runs")))
        assert len(published) == 14 and set(trained.values()) <= {1}, (published, trained)

        # the idle workers are removed (idle_timeout_minutes), the killed one too
        gone = watch.wait("idle workers removed", lambda: watch.alive_workers() == [], 240)
        timeline["idle_removed_after_sweep_s"] = gone - start - timeline["sweep_s"]
        started = {n[0] for e in watch.events for n in e["nodes"] if n[0] != FAKE_HEAD_ID}
        timeline["workers_started"] = len(started)
        assert len(started) >= 2  # the first ones, and at least one after the loss or for more trials
    finally:
        watch.stop()
        timeline["test_s"] = time.time() - t0
        print("autoscaler timeline:", json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                                  for k, v in timeline.items()}))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_local_ray_refuses_a_gpu_this_machine_lacks(tmp_path):
    """No --address: a local Ray is this machine, a fixed cluster; refused before Ray starts."""
    sweep_file = _sweep_file(tmp_path, resources={"cpu": 1, "gpu": 1})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([str(BIN / "lth"), "sweep", "run", str(sweep_file)], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(
        "lth: error: resources: {'cpu': 1.0, 'gpu': 1.0} is not allowed; allowed: a request one node can hold "
        "(this cluster offers one node, this machine: CPU "), done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def _first_lines(cluster, sweep_file, until: str, timeout: float = 300) -> tuple[int, str]:
    """Run the sweep on the cluster until a line holds `until` (then stop it) or it exits."""
    driver = subprocess.Popen([str(BIN / "lth"), "sweep", "run", str(sweep_file), "--address", cluster.address],
                              cwd=sweep_file.parent, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**cluster.env, "PYTHONUNBUFFERED": "1"})
    lines, deadline = [], time.time() + timeout
    try:
        for line in driver.stdout:
            lines.append(line)
            if until in line or time.time() > deadline:
                break
    finally:
        driver.kill()
    return driver.wait(), "".join(lines)


def test_a_fixed_cluster_refuses_and_autoscaler_v1_is_waited_for(tmp_path):
    """`ray start` by hand (no autoscaler): what no node holds is refused. Autoscaler v1
    reports no verdict: the sweep says so and waits."""
    fixed = LocalCluster()
    try:
        fixed.start(workers=1, gpus_per_worker=0, cpus_per_worker=1)
        code, out = _first_lines(fixed, _sweep_file(tmp_path), "lth: error")
        assert "lth: error: resources: {'cpu': 1.0, 'gpu': 0.5} is not allowed; allowed: a request one node can " \
               "hold (this cluster offers 1 node with CPU 0, GPU 0; 1 node with CPU 1, GPU 0; no autoscaler)" in out, out
        assert not (tmp_path / "runs").exists()
    finally:
        fixed.stop()
    v1 = AutoscalingCluster()
    try:
        v1.start_autoscaling(v2=False)
        code, out = _first_lines(v1, _sweep_file(tmp_path), "lth: waiting for nodes")
        assert "this cluster's autoscaler (v1) does not report whether it can start one" in out, out
    finally:
        v1.stop()
        assert not v1.pids(), "Ray processes survived the test"
