#!/usr/bin/env bash
# The device kit proved on this CPU (`make gpu-kit-check`; README, "A GPU for a day"):
# 1. builds the kit for this machine's Python with the same recipe as the device's
#    (bench/gpu_kit.py --python-version X.Y; reuses .kit/cpXY unless REBUILD=1);
# 2. makes a stand-in for the device's image: a venv holding only what the kit takes from
#    the image (.kit/cpXY/assumed.txt, installed --no-deps), torch and torchvision (from
#    pip's cache: the image has its own CUDA build) and the image's test tools, and over it
#    a fresh venv that sees it through a .pth file (nothing of the kit's in either);
# 3. runs bench/gpu_day.sh on this CPU (GPU_DAY_CPU=1) with that venv's python: the kit
#    installed with --no-index --no-deps, real packed sweeps through Ray with MLflow,
#    one trial per Tune trial, the CPU tests. Its results: $OUT/gpu_day.json (OUT default
#    /tmp/gpu_day/out).
set -eu
cd "$(dirname "$0")/.."
t0=$SECONDS
V=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
KIT=.kit/cp${V/./}
BASE=${KIT_IMAGE:-/tmp/lth-kit-image}
ENV=${KIT_ENV:-/tmp/lth-kit-env}
if [[ ! -f $KIT/kit.tar.xz || -n ${REBUILD:-} ]]; then
    python3 bench/gpu_kit.py --python-version "$V" --out "$KIT"
fi
echo "gpu_kit_check: kit ready at $((SECONDS - t0)) s"
# The image's stand-in, built once (IMAGE=1 builds it anew) and never written to after; each
# check gets a fresh venv that sees it through a .pth file, as a venv on the device would.
if [[ ! -f $BASE/.complete || -n ${IMAGE:-} ]]; then
    rm -rf "$BASE"
    python3 -m venv "$BASE"
    "$BASE/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt torch torchvision \
        pytest pytest-timeout hypothesis 2>&1 | grep -v "is ignored" || true
    "$BASE/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$KIT/assumed.txt" 2>&1 \
        | grep -v "is ignored" || true
    touch "$BASE/.complete"
fi
rm -rf "$ENV"
python3 -m venv "$ENV"
site=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base_site=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$base_site')" > "$site/_image.pth"
for m in ray mlflow optuna lth; do  # nothing of the kit's may be there before it is installed
    if (cd / && "$ENV/bin/python" -c "import $m" 2>/dev/null); then echo "gpu_kit_check: $m is in the stand-in already"; exit 1; fi
done
echo "gpu_kit_check: stand-in ready at $((SECONDS - t0)) s: $ENV over $BASE ($(cd / && "$ENV/bin/python" -m pip list 2>/dev/null | tail -n +3 | wc -l) packages)"
GPU_DAY_CPU=1 KIT=$KIT PYTHON="$ENV/bin/python" bash bench/gpu_day.sh
echo "gpu_kit_check: done in $((SECONDS - t0)) s"
