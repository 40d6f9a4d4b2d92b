"""A local Ray's agents go when the `lth sweep` process that started them goes, killed
or not (ARCHITECTURE.md, "The sweep runner").

The raylet starts two agents (ray::DashboardAgent, ray::RuntimeEnvAgent). A driver that
is killed takes the raylet with it (Ray ties its direct children to it), but the agents
are the raylet's children: they notice it is gone, try to tell its dead control store
so, and wait there a minute before they exit, orphaned. So the driver hands their ids to
this small process, which outlives the driver (its own session) and reads a pipe from it:
at the pipe's end (the driver exited or was killed) it ends whichever of them still runs.
Ids are checked with their start time, so a reused id is never hit.

    python -m orchestrator.sweeps.reaper PID:START ...   (stdin: the driver's pipe)
"""
from __future__ import annotations

import os
import signal
import sys
import time

AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def agents(raylet_pid: int) -> list[str]:
    """PID:START of the raylet's agents."""
    import psutil

    out = []
    for child in psutil.Process(raylet_pid).children():
        try:
            if " ".join(child.cmdline()).startswith(AGENTS):
                out.append(f"{child.pid}:{start_time(child.pid)}")
        except psutil.Error:
            pass
    return out


def watch(raylet_pid: int) -> None:
    """Start the reaper for this driver's local Ray (Linux only: /proc)."""
    import subprocess

    if not sys.platform.startswith("linux"):
        return
    targets = agents(raylet_pid)
    if not targets:
        return
    r, w = os.pipe()
    subprocess.Popen([sys.executable, "-m", "orchestrator.sweeps.reaper", *targets], stdin=r,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                     close_fds=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    os.close(r)
    os.set_inheritable(w, False)
    _HELD.append(w)  # open until this process ends, however it ends


_HELD: list = []


def main(targets: list[str]) -> None:
    while os.read(0, 1 << 16):  # until the driver's end of the pipe closes
        pass
    alive = [(int(p), s) for p, s in (t.split(":") for t in targets) if start_time(int(p)) == s]
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.0)):
        for pid, _ in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(start_time(pid) == s for pid, s in alive):
            time.sleep(0.1)
        alive = [(pid, s) for pid, s in alive if start_time(pid) == s]


if __name__ == "__main__":
    main(sys.argv[1:])
