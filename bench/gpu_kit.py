"""Build the device kit: the wheels a lent GPU machine lacks to run `lth sweep run` (Ray,
MLflow, Optuna, the project), packed small enough to travel with the repository in one
device call (README, "A GPU for a day").

    python3 bench/gpu_kit.py                        # .kit/cp312: CPython 3.12, x86-64 (the device's)
    python3 bench/gpu_kit.py --python-version 3.11 --out .kit/cp311   # the same recipe for another Python

What it does, for any CPython version (--python-version; the ABI follows from it):
1. builds the project's wheel (pure Python);
2. resolves, with pip's resolver and only binary wheels for manylinux x86-64, what the
   project's dependencies need (constraints.txt's pins);
3. keeps what the device image lacks (bench/device_image.txt; the image's own versions of
   the rest are used there, whatever pip chose here), downloads it, and leaves out what a sweep never loads
   (LEFT_OUT below, each with its reason);
4. rewrites Ray's wheel without those parts and with its three native programs stripped of
   their symbol tables (RECORD rewritten), stores every wheel uncompressed and packs them
   all into one xz archive (one solid stream compresses the native code far better than
   each wheel's own zip);
5. checks that the kit, with the repository's tracked and untracked-not-ignored files
   (what a device call carries), stays under --limit-mib (56 MiB), and fails with one
   line if not.

Installing it (bench/gpu_day.sh does this; no registry is asked):
    mkdir -p /tmp/kit && tar -xJf .kit/cp312/kit.tar.xz -C /tmp/kit
    python3 -m pip install --no-index --no-deps --no-compile /tmp/kit/*.whl
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEVICE_IMAGE = REPO / "bench" / "device_image.txt"
MNIST_T10K = Path(os.environ.get("LTH_MNIST_T10K") or REPO.parent / "shared" / "data" / "mnist-t10k")
DEVICE_PYTHON = "3.12"  # the image's python3
PLATFORMS = ["manylinux_2_%d_x86_64" % n for n in range(39, 16, -1)] + [
    "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
    "manylinux1_x86_64"]

# The project's dependencies as the kit asks for them: Ray without its "default" extra (the
# dashboard and cluster-launcher packages; sweeps start Ray with include_dashboard=False, and
# Ray runs its minimal agent when they are missing), MLflow as mlflow-skinny (the same Python
# package without the tracking server's web UI and its Flask/gunicorn/docker stack) plus
# what its SQLite store needs.
INSTEAD = {"ray": ["ray[tune]"], "mlflow": ["mlflow-skinny", "sqlalchemy", "alembic"]}
PIN_AS = {"mlflow": "mlflow-skinny"}  # constraints.txt's mlflow pin holds for mlflow-skinny

# Ray's parts a sweep never loads: (path prefix inside the wheel, why).
RAY_LEFT_OUT = [
    ("ray/jars/", "Java workers (ray_dist.jar, 34.5 MB)"),
    ("ray/rllib/", "RLlib (reinforcement learning)"),
    ("ray/serve/", "Ray Serve (model serving)"),
    ("ray/llm/", "Ray's LLM libraries"),
    ("ray/dashboard/client/", "the dashboard's web build (sweeps start Ray without the dashboard)"),
]
# Declared dependencies a sweep never imports: (name, why).
# (databricks-sdk stays: `import mlflow` looks for the databricks namespace; cryptography
# stays: MLflow's SQL store imports it)
LEFT_OUT = {
    "google-auth": "databricks-sdk's Google login (databricks:// tracking URIs only)",
    "pyasn1": "needed by google-auth alone",
    "pyasn1-modules": "needed by google-auth alone",
    "rsa": "needed by google-auth alone",
}
STRIP = ["ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_image() -> dict:
    """name -> version seen on the device ('' where none was read; for information only:
    holding pip's resolver to them sent it backtracking for many minutes)."""
    out = {}
    for line in DEVICE_IMAGE.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[normal(name)] = version
    return out


def pins() -> dict:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[normal(PIN_AS.get(normal(name), name))] = version.strip()
    return out


# Not resolved: the image's own CUDA builds (resolving them here would ask for CUDA wheels
# of other platforms); everything else the project needs is, the image's packages included,
# so that the kit's packages are chosen to work with them.
NOT_RESOLVED = {"torch", "torchvision"}


def roots() -> list[str]:
    """The project's dependencies, as the kit asks for them."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        name = normal(re.match(r"[A-Za-z0-9_.-]+", dep).group(0))
        if name not in NOT_RESOLVED:
            out += INSTEAD.get(name, [re.split(r"[<>=!~; ]", dep)[0]])
    return out


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        tail = "\n".join(l for l in (done.stdout + done.stderr).splitlines() if "is ignored" not in l)[-3000:]
        sys.exit(f"gpu_kit: error: {' '.join(map(str, cmd[:6]))} ... failed:\n{tail}")
    return done


def target_flags(version: str) -> list[str]:
    abi = "cp" + version.replace(".", "")
    flags = ["--only-binary=:all:", "--python-version", version, "--implementation", "cp", "--abi", abi]
    for p in PLATFORMS:
        flags += ["--platform", p]
    return flags


def resolve(version: str, work: Path) -> list[dict]:
    """pip's resolution of the roots for the target: [{name, version}] (metadata only)."""
    constraints = pins()
    cfile = work / "constraints.txt"
    cfile.write_text("".join(f"{n}=={v}\n" for n, v in constraints.items()))
    report = work / "report.json"
    run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed", "--report", report,
         "--target", work / "never", *target_flags(version), "-c", cfile, *roots()])
    return [{"name": normal(i["metadata"]["name"]), "version": i["metadata"]["version"]}
            for i in json.loads(report.read_text())["install"]]


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def rewrite(wheel: Path, dest: Path, drop: list, strip: list, work: Path) -> dict:
    """The wheel without `drop`'s prefixes, `strip`'s binaries stripped, stored uncompressed,
    RECORD rewritten. Returns what it left out (bytes per prefix)."""
    dropped = {p: 0 for p, _ in drop}
    src = zipfile.ZipFile(wheel)
    record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
    rows = []
    out = dest / wheel.name
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            if info.filename == record_name:
                continue
            hit = next((p for p, _ in drop if info.filename.startswith(p)), None)
            if hit:
                dropped[hit] += info.file_size
                continue
            data = src.read(info)
            if info.filename in strip and shutil.which("strip"):
                tmp = work / "strip.bin"
                tmp.write_bytes(data)
                run(["strip", "--strip-unneeded", tmp])
                dropped.setdefault("symbol tables of " + info.filename, 0)
                dropped["symbol tables of " + info.filename] += len(data) - tmp.stat().st_size
                data = tmp.read_bytes()
            new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            new.external_attr = info.external_attr
            z.writestr(new, data)
            rows.append([info.filename, record_hash(data), str(len(data))])
        rows.append([record_name, "", ""])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        z.writestr(zipfile.ZipInfo(record_name, date_time=(2020, 1, 1, 0, 0, 0)), buf.getvalue())
    return dropped


def travelling_bytes() -> int:
    """What a device call carries besides the kit: tracked and untracked-not-ignored files."""
    names = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    return sum((REPO / n).stat().st_size for n in names.split("\0") if n and (REPO / n).is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python-version", default=DEVICE_PYTHON, help="CPython X.Y the kit is for (default: the device's)")
    ap.add_argument("--out", type=Path, help="the kit's folder (default .kit/cpXY)")
    ap.add_argument("--limit-mib", type=float, default=56.0, help="kit + carried repository files at most")
    ap.add_argument("--xz", default="-9", help="xz's level (default -9)")
    args = ap.parse_args()
    version = args.python_version
    if not re.fullmatch(r"3\.\d+", version):
        sys.exit(f"gpu_kit: error: --python-version: {version!r} is not allowed; allowed: a CPython version X.Y")
    out = (args.out or REPO / ".kit" / ("cp" + version.replace(".", ""))).resolve()
    t0 = time.time()
    image = device_image()
    with tempfile.TemporaryDirectory(prefix="lth-kit-") as tmp:
        work = Path(tmp)
        wheels, stored = work / "wheels", work / "stored"
        wheels.mkdir()
        stored.mkdir()
        print(f"gpu_kit: CPython {version} x86-64, roots: {' '.join(roots())}", flush=True)
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, REPO])
        resolved = resolve(version, work)
        kit = [r for r in resolved if r["name"] not in image and r["name"] not in LEFT_OUT]
        left = [r for r in resolved if r["name"] in LEFT_OUT]
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *target_flags(version), "-d", wheels,
             *[f"{r['name']}=={r['version']}" for r in kit]])
        lines, dropped_total = [], 0
        for wheel in sorted(wheels.glob("*.whl")):
            is_ray = normal(wheel.name.split("-")[0]) == "ray"
            dropped = rewrite(wheel, stored, RAY_LEFT_OUT if is_ray else [], STRIP if is_ray else [], work)
            dropped_total += sum(dropped.values())
            lines.append(f"{wheel.name}  {wheel.stat().st_size / 2**20:.1f} MiB as published")
            for what, size in dropped.items():
                why = dict(RAY_LEFT_OUT).get(what, "not needed to run it (C++ symbol names in Ray's crash traces)")
                lines.append(f"    left out {what} ({size / 2**20:.1f} MiB unpacked): {why}")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if MNIST_T10K.is_dir():  # real digits for the device's sweeps (bench/gpu_day.sh), else it makes some
            shutil.copytree(MNIST_T10K, out / "mnist-t10k", copy_function=shutil.copyfile)
            (out / "mnist-t10k").chmod(0o755)  # the shared copy is read-only; a rebuild removes this one
            lines.append(f"mnist-t10k/: the MNIST t10k files from {MNIST_T10K} (1.6 MiB)")
        archive = out / "kit.tar.xz"
        env = dict(os.environ, XZ_OPT=f"{args.xz} -T2")
        run(["tar", "-cJf", archive, "-C", stored, *sorted(p.name for p in stored.glob("*.whl"))], env=env)
    count = sum(line.endswith("as published") for line in lines)
    manifest = [f"lth device kit for CPython {version} x86-64 (bench/gpu_kit.py), {time.strftime('%Y-%m-%d')}",
                f"{count} wheels; the device image's packages (bench/device_image.txt) are not in it", *lines]
    manifest += [f"left out {r['name']} {r['version']}: {LEFT_OUT[r['name']]}" for r in left]
    (out / "MANIFEST.txt").write_text("\n".join(manifest) + "\n")
    # what the kit takes from the image, at the versions pip chose here (bench/gpu_kit_check.sh
    # builds its stand-in for the image from this list)
    (out / "assumed.txt").write_text("".join(f"{r['name']}=={r['version']}\n" for r in resolved
                                             if r["name"] in image))
    kit_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    repo_bytes = travelling_bytes()
    total = (kit_bytes + repo_bytes) / 2**20
    print("\n".join(manifest[1:]))
    print(f"gpu_kit: {archive.relative_to(REPO) if archive.is_relative_to(REPO) else archive}: "
          f"{kit_bytes / 2**20:.1f} MiB, with the repository's {repo_bytes / 2**20:.1f} MiB: {total:.1f} MiB "
          f"(limit {args.limit_mib:g} MiB); built in {time.time() - t0:.0f} s")
    if total > args.limit_mib:
        sys.exit(f"gpu_kit: error: kit + repository = {total:.1f} MiB is over the limit of {args.limit_mib:g} MiB "
                 f"(one device call carries 64 MiB); leave more out (bench/gpu_kit.py LEFT_OUT)")


if __name__ == "__main__":
    main()
