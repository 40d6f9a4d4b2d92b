#!/usr/bin/env bash
# The GPU checks of one lent-device call (ARCHITECTURE.md, "Numerics"; the README's speed
# table), most valuable first, each part under its own time limit so that one part
# running long leaves the rest their turn. Run from the repository root on a CUDA machine
# whose python3 has torch, numpy, pandas, pyyaml, safetensors, scikit-learn and pytest:
#     LTH_MNIST_T10K=DIR bash bench/gpu_check.sh        (logs also under $OUT when it is set)
# PARTS="tests packed" runs some parts only; TESTS_S, PACKED_S, OPTIONS_S set their limits.
# Parts: CUDA tests; trials per GPU-hour (bench/packed.py); what pays for one step
# (bench/cuda_options.py).
set -u
export PYTHONUNBUFFERED=1  # (not PYTHONDONTWRITEBYTECODE: each process would compile torch's lazily imported modules again)
log=${OUT:-/tmp}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
part() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$log/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-25}" "$log/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}
parts=" ${PARTS:-tests packed options} "
[[ $parts == *" tests "* ]] && part tests "${TESTS_S:-170}" $py -m pytest -q -p no:cacheprovider -o addopts= tests/test_cuda.py \
    tests/test_lottery.py::test_cuda_trial tests/test_supermask.py::test_cuda_trial
[[ $parts == *" packed "* ]] && part packed "${PACKED_S:-170}" $py bench/packed.py --device cuda --skip head --trials 128 --packs ${PACKS:-1 16 64 128} --sample ${SAMPLE:-4}
[[ $parts == *" options "* ]] && part options "${OPTIONS_S:-150}" $py bench/cuda_options.py --pack 64 --compile lenet_300_100 conv2
