"""The environment a number came from: the code, the library versions and the machine.

Bits are reproducible only on one machine with the same versions (ARCHITECTURE.md,
"Numerics"): another CPU runs other kernels (vector width, MKL's code paths), a GPU others
again. So every level record carries `environment()` (trials/folder/record.py), the sweep
tools warn when one sweep's numbers came from more than one `machine`, and golden
records say where they were written (tests/golden/make_records.py).
"""
from __future__ import annotations

import functools
import json
import platform
from pathlib import Path
from typing import Optional

from trials.folder.version import code_version

# the keys of environment() that decide a trial's bits (the rest names the code)
MACHINE = ("torch", "cuda", "cpu", "cpu_capability", "device", "threads")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's vendor and model name, as the kernel reports it (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device) -> str:
    import torch  # here, not at the top: readers of records (`lth report`) never load torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def environment(device="cpu", threads: Optional[int] = None) -> dict:
    """lth version and commit, torch and CUDA versions, CPU model and the kernels torch
    picked for it, the device and the thread count a trial ran with."""
    import torch

    code = code_version()
    return {"lth": code["version"], "commit": code["git_sha"], "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": device_name(device), "threads": threads if threads is not None else torch.get_num_threads()}


def machine(env: Optional[dict]) -> Optional[str]:
    """One line naming what decides the bits of `env` (None: a record from before lth
    recorded its environment)."""
    if not env:
        return None
    cuda = f" cuda {env['cuda']}" if env.get("cuda") and env.get("device") != "cpu" else ""
    return (f"{env.get('device')} on {env.get('cpu')} ({env.get('cpu_capability')}, {env.get('threads')} threads), "
            f"torch {env.get('torch')}{cuda}")


def listed(envs) -> Optional[str]:
    """Environments (dicts, or their JSON text; None skipped) as one JSON list, each once,
    in a fixed order: a trial run's MLflow tag `lth.environment` and what the readers show."""
    texts = sorted({e if isinstance(e, str) else json.dumps(e, sort_keys=True) for e in envs if e})
    return "[" + ", ".join(texts) + "]" if texts else None


def mixed(values) -> Optional[str]:
    """A warning when `values` (environments as dicts, their JSON text or JSON lists of
    them, None for records from before lth recorded them) name more than one machine;
    None when they name one."""
    seen: dict = {}
    for value in values:
        found = json.loads(value) if isinstance(value, str) else value
        for env in found if isinstance(found, list) else [found]:
            line = machine(env) if isinstance(env, dict) else None
            if line:
                seen[line] = seen.get(line, 0) + 1
    if len(seen) < 2:
        return None
    parts = "; ".join(f"{n} on {line}" for line, n in sorted(seen.items(), key=lambda kv: -kv[1]))
    return (f"warning: these numbers came from {len(seen)} kinds of machine ({parts}): floats may differ "
            "in their last bits between them (README, 'What is exact where')")
