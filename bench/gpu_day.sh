#!/usr/bin/env bash
# The GPU day in one call (README, "A GPU for a day"): on a lent device machine (16 cores,
# an H100 or H200, no network, python3 3.12 with torch), from the repository root, with the
# kit built here by `make gpu-kit` and carried along:
#     bash bench/gpu_day.sh                  # writes $OUT/gpu_day.json, prints a summary
# Steps, most valuable first, each under `timeout` and all under GPU_DAY_S (default 510 s):
# a step that would not fit in what is left is cut to it or skipped, and says so.
#   install      the kit's wheels into $PYTHON's environment (pip --no-index --no-deps), pip check
#   data         MNIST-shaped IDX files (the kit's t10k copy, else generated)
#   sweep-pack128  `lth sweep run` through Ray on the GPU: LeNet-300-100, 3 levels x 300
#                iterations, TRIALS (256) trials as packs of 128 at resources.gpu 0.25 (up to
#                four packs share the GPU), shared units, MLflow on a local SQLite store,
#                timed by phase (bench/gpu_day.py sweep)
#   sweep-single the same job, SINGLE (32) trials one per Tune trial (gpu 1/16, 16 at a time)
#   cuda-tests   bench/gpu_check.sh's CUDA tests (tests/test_cuda.py and the CUDA trials)
#   sweep-pack64 as sweep-pack128 with packs of 64
#   memory       a real pack's torch.cuda.max_memory_allocated against the planner's estimate
#   cpu-tests    tests/test_golden.py, test_packed.py, test_shared.py on the machine's CPU
#   packed       bench/gpu_check.sh's in-process packs (trials per GPU-hour without Ray)
# STEPS="install sweep-pack128" runs some steps only (a fresh machine needs install first).
# GPU_DAY_CPU=1 runs the same on a machine without a GPU, smaller and with 5x the time
# limits (GPU_DAY_SCALE), the CUDA steps left out (bench/gpu_kit_check.sh does so here to
# prove the script and the kit). It exits 1 when a step failed or timed out. KIT (default .kit/cp312), PYTHON (python3),
# GPU_DAY_WORK (/tmp/gpu_day), STEPS (which steps, by name) override.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
KIT=${KIT:-.kit/cp312}
PY=${PYTHON:-python3}
CPU=${GPU_DAY_CPU:-0}
SCALE=1; [[ $CPU == 1 ]] && SCALE=${GPU_DAY_SCALE:-5}  # the CPU proof runs on a small, shared machine
BUDGET=${GPU_DAY_S:-$((510 * SCALE))}
WORK=${GPU_DAY_WORK:-/tmp/gpu_day}
RESULTS=${OUT:-$WORK/out}/gpu_day.json
rm -rf "$WORK" && mkdir -p "$WORK/logs"
: > "$WORK/steps.tsv"

step() {  # name, limit in seconds, command...: run it under timeout, record it, show its tail
    local name=$1 limit=$(($2 * SCALE)); shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    local left=$((BUDGET - SECONDS - 15)) log="$WORK/logs/$name.log"
    if ((left < 20)); then
        printf '%s\t-1\t0\t%s\t\n' "$name" "$limit" >> "$WORK/steps.tsv"
        echo "=== $name: skipped, ${left}s left of GPU_DAY_S=$BUDGET"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s, at ${SECONDS}s)"
    local t0=$SECONDS
    timeout -k 10 "$limit" bash -c '"$@"' step "$@" > "$log" 2>&1  # bash: the steps' functions are exported
    local rc=$?
    tail -n "${TAIL:-12}" "$log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" "$log" >> "$WORK/steps.tsv"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

install_kit() {
    mkdir -p "$WORK/wheels" || return 1
    tar -xJf "$KIT/kit.tar.xz" -C "$WORK/wheels" 2>/dev/null \
        || $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$KIT/kit.tar.xz" "$WORK/wheels" \
        || return 1  # (Python's tarfile where the image has no xz)
    $PY -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check "$WORK"/wheels/*.whl || return 1
    rm -rf "$WORK/wheels"
    $PY -m pip check > "$WORK/pip_check.txt" 2>&1  # the kit's declared needs against the image's versions: recorded
    $PY -c "import ray, ray.tune, mlflow, optuna, sqlalchemy, alembic, lth.cli, orchestrator.sweeps.runner
print('ray', ray.__version__, 'mlflow', mlflow.__version__, 'optuna', optuna.__version__)"
}

machine() {
    $PY - > "$WORK/machine.json" <<'EOF'
import json, os, platform, subprocess, sys
import torch
m = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
     "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
try:
    m["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    pass
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    m.update(gpu=p.name, gpu_memory_mib=p.total_memory // 2**20)
    try:
        m["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
print(json.dumps(m))
EOF
    cat "$WORK/machine.json"
}

if [[ $CPU == 1 ]]; then  # a proof of the script on a CPU: small sweeps, no CUDA steps
    DEVICE=cpu TRIALS=${TRIALS:-16} SINGLE=${SINGLE:-4} ITER=${ITER:-100} GPU=0 NC=2
    GPU_ONE=0 SINGLE_NC=2 PACK_CPU=1
    CPU_TESTS=${CPU_TESTS:-tests/test_golden.py tests/test_shared.py::test_two_trials_needing_one_unit_train_it_once
        tests/test_packed.py::test_lenet_pack_matches_each_trial_alone}
    PACK_A=${PACK_A:-8} PACK_B=${PACK_B:-4}
    STEPS=" ${STEPS:-install data sweep-pack$PACK_A sweep-single sweep-pack$PACK_B cpu-tests} "
else
    DEVICE=cuda TRIALS=${TRIALS:-256} SINGLE=${SINGLE:-32} ITER=${ITER:-300} GPU=0.25 NC=4
    GPU_ONE=0.0625 SINGLE_NC=16 PACK_CPU=2
    CPU_TESTS=${CPU_TESTS:-tests/test_golden.py tests/test_packed.py tests/test_shared.py}
    PACK_A=${PACK_A:-128} PACK_B=${PACK_B:-64}
    STEPS=" ${STEPS:-install data sweep-pack$PACK_A sweep-single cuda-tests sweep-pack$PACK_B memory cpu-tests packed} "
fi
[[ -z ${LTH_MNIST_T10K:-} && -d $KIT/mnist-t10k ]] && export LTH_MNIST_T10K=$(cd "$KIT/mnist-t10k" && pwd)
XDIST=""
$PY -c "import xdist" 2>/dev/null && (( $(nproc) >= 8 )) && XDIST="-n 6"

echo "gpu_day: kit $KIT, python $PY, device $DEVICE, budget ${BUDGET}s, results $RESULTS"
sweep() {  # name, pack, trials, gpu per Tune trial, Tune trials at once
    $PY bench/gpu_day.py sweep --name "$1" --pack "$2" --trials "$3" --gpu "$4" --concurrent "$5" --cpu "$PACK_CPU" \
        --device $DEVICE --iterations "$ITER" --data "$WORK/data" --work "$WORK/$1" --out "$WORK/sweep-$1.json"
}
export -f install_kit sweep
export WORK KIT PY DEVICE ITER PACK_CPU
step install 150 install_kit || { echo "gpu_day: the kit did not install; nothing else can run"; }
machine
step data 60 $PY bench/gpu_day.py data "$WORK/data"
step sweep-pack$PACK_A 130 sweep pack$PACK_A "$PACK_A" "$TRIALS" $GPU $NC
PACK_CPU=1 step sweep-single 90 sweep single 1 "$SINGLE" $GPU_ONE $SINGLE_NC
step cuda-tests 150 env OUT="$WORK/logs" PYTHON="$PY" PARTS=tests TESTS_S=140 bash bench/gpu_check.sh
step sweep-pack$PACK_B 110 sweep pack$PACK_B "$PACK_B" "$TRIALS" $GPU $NC
step memory 40 $PY bench/gpu_day.py memory --packs "$PACK_B" "$PACK_A" --data "$WORK/data" --out "$WORK/memory.json"
step cpu-tests 120 env CUDA_VISIBLE_DEVICES= $PY -m pytest -q -p no:cacheprovider -o addopts= $XDIST $CPU_TESTS
step packed 90 env OUT="$WORK/logs" PYTHON="$PY" PARTS=packed PACKED_S=80 PACKS="1 128" SAMPLE=2 bash bench/gpu_check.sh
$PY bench/gpu_day.py report "$WORK" "$RESULTS"
failed=$(awk -F'\t' '$2 != 0 && $2 != -1' "$WORK/steps.tsv" | cut -f1 | tr '\n' ' ')
echo "gpu_day: done in ${SECONDS}s${failed:+; failed: $failed}"
[[ -z $failed ]]
