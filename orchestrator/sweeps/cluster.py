"""Whether the Ray cluster can ever run a sweep's Tune trials, checked before anything
is started or written (ARCHITECTURE.md, "The sweep runner").

Every Tune trial (one trial, or one pack) asks for the sweep's `resources` as one bundle
on one node. Ray never refuses a bundle no node can hold: Tune waits forever, and Ray
repeats "No available node types can fulfill resource request" every 35 s. So:

- a local Ray (no address) is this machine and nothing else: the request must fit its
  CPUs and CUDA devices, checked before Ray starts;
- on a cluster, a request some alive node can hold (its total resources) passes;
- otherwise the autoscaler decides. Ray 2.60 publishes no list of node types a running
  cluster can start (`ray._private.state.state.get_cluster_config()` stays empty under
  autoscaler v1 and v2), so lth asks the autoscaler itself: the public
  `ray.autoscaler.sdk.request_resources` puts the bundle in as a cluster constraint, and
  the v2 autoscaler (what `ray up` runs since Ray 2.50) reports within one update, in
  the GCS's cluster status (the reply `ray.autoscaler.v2.sdk.get_cluster_status`
  parses), either that the constraint is infeasible or which node type it is launching.
  The constraint is cleared again once answered (Tune's own pending trials then keep
  the demand); it replaces any other `request_resources` constraint on the cluster
  meanwhile. Autoscaler v1 (`RAY_UP_enable_autoscaler_v2=0`) gives no verdict: the sweep
  says it waits and cannot tell. A cluster without an autoscaler (`ray start` by hand:
  v1's monitor in read-only mode, whose node types are "node_<node id>") is fixed: its
  alive nodes are all it has.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from trials.core.errors import ConfigError

VERDICT_S = 60.0  # at most this long for the autoscaler's answer (one update is ~5 s)


def request(sweep) -> dict:
    """The bundle one Tune trial asks for, as Ray names resources."""
    bundle = {"CPU": float(sweep.resources["cpu"])}
    if sweep.resources["gpu"] > 0:
        bundle["GPU"] = float(sweep.resources["gpu"])
    return bundle


def fits(bundle: dict, total: dict) -> bool:
    return all(total.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _shape(total: dict) -> str:
    return ", ".join(f"{k} {total.get(k, 0.0):g}" for k in ("CPU", "GPU"))


def refusal(sweep, offers: str) -> ConfigError:
    return ConfigError("resources", dict(sweep.resources),
                       f"allowed: a request one node can hold (this cluster offers {offers})")


def check_local(sweep) -> None:
    """A local Ray is this machine: refuse what it cannot hold, before Ray starts. Its GPUs
    are counted (by torch: a second's import) only where they matter: a request for GPUs,
    or a refusal, which names them."""
    bundle, machine = request(sweep), {"CPU": float(os.cpu_count() or 1)}
    if "GPU" in bundle or not fits(bundle, machine):
        import torch

        machine["GPU"] = float(torch.cuda.device_count())
    if not fits(bundle, machine):
        raise refusal(sweep, f"one node, this machine: {_shape(machine)}, for a local Ray; "
                             "no autoscaler; ask for at most that, or run on a cluster with --address")


def alive_nodes() -> list[tuple[str, dict]]:
    """(node type or id, total resources) of each alive node of the connected cluster."""
    import ray

    out = []
    for n in ray.nodes():
        if n.get("Alive"):
            labels = n.get("Labels") or {}
            out.append((labels.get("ray.io/node-group") or n["NodeID"][:8], n.get("Resources") or {}))
    return out


def _offers(nodes: list) -> str:
    shapes: dict = {}
    for name, total in nodes:
        shapes.setdefault(_shape(total), []).append(name)
    return "; ".join(f"{len(names)} node{'s' * (len(names) > 1)} with {shape}"
                     for shape, names in sorted(shapes.items()))  # ray.nodes() has no fixed order


def check_cluster(sweep, verdict_s: float = VERDICT_S) -> Optional[list]:
    """On the connected cluster: None when an alive node holds the request; the node
    types the autoscaler is starting for it (the sweep then waits, and says so); a
    ConfigError when nothing can hold it."""
    bundle = request(sweep)
    nodes = alive_nodes()
    if any(fits(bundle, total) for _, total in nodes):
        return None
    offers = _offers(nodes)
    answer = _ask_autoscaler(bundle, verdict_s)
    if answer is None and _v1_autoscaling():
        print(f"lth: waiting for nodes: no node has {bundle} yet; this cluster's autoscaler (v1) does not "
              "report whether it can start one (if not, Ray repeats 'No available node types can fulfill')",
              file=sys.stderr, flush=True)
        return []
    if answer is None:
        raise refusal(sweep, f"{offers}; no autoscaler")
    if answer == "infeasible":
        raise refusal(sweep, f"{offers}; its autoscaler can start no node type that holds it")
    what = ", ".join(answer) or "nodes"
    print(f"lth: waiting for nodes: no node has {bundle} yet; the autoscaler is starting {what}",
          file=sys.stderr, flush=True)
    return answer


def _ask_autoscaler(bundle: dict, verdict_s: float):
    """None (no v2 autoscaler), "infeasible", or the node types it launches for `bundle`
    (an empty list: it accepted the request without naming a launch within verdict_s)."""
    import ray
    from ray._raylet import GcsClient
    from ray.autoscaler.sdk import request_resources
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    if not is_autoscaler_v2(fetch_from_server=True):
        return None
    gcs = GcsClient(ray.get_runtime_context().gcs_address)
    request_resources(bundles=[bundle])
    try:
        deadline = time.monotonic() + verdict_s
        while time.monotonic() < deadline:
            reply = GetClusterStatusReply.FromString(gcs.get_cluster_status(timeout_s=10))
            state, asked = reply.autoscaling_state, reply.cluster_resource_state
            mine = [c for c in state.infeasible_cluster_resource_constraints
                    if any(_same(r.request.resources_bundle, bundle) for r in c.resource_requests)]
            if mine:
                return "infeasible"
            launching = sorted({p.ray_node_type_name for p in state.pending_instance_requests}
                               | {p.ray_node_type_name for p in state.pending_instances})
            if launching:
                return launching
            if any(fits(bundle, total) for _, total in alive_nodes()):
                return []
            seen = state.last_seen_cluster_resource_state_version
            if seen and seen >= asked.cluster_resource_state_version and any(
                    _same(r.request.resources_bundle, bundle) for c in asked.cluster_resource_constraints
                    for r in c.resource_requests):
                return []  # processed with our constraint in, and not infeasible
            time.sleep(0.5)
        return []
    finally:
        request_resources(bundles=[])


def _v1_autoscaling() -> bool:
    """Whether autoscaler v1 runs with node types of a config: its status report (the
    internal KV entry `ray status` reads) names node types other than the read-only
    monitor's "node_<node id>"."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    report = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or "{}").get("autoscaler_report")
    mapping = (report or {}).get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def _same(proto_bundle, bundle: dict) -> bool:
    return {k: float(v) for k, v in dict(proto_bundle).items()} == bundle
