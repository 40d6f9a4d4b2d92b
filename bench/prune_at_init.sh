#!/usr/bin/env bash
# The README's "Pruning at initialization" reproductions, IMP and four methods that prune at
# init, each ticket and its shuffle control, seeds 0-2, densities 45% -> 2.1% (5 levels at
# rate 0.55, output layer 0.1), one sweep each, packed:
#   mnist  LeNet-300-100 on real MNIST (the 10,000 t10k images: first 8,000 train, of which
#          1,000 validation, last 2,000 test), 1,000 iterations a level. Needs the t10k files
#          in $LTH_MNIST_T10K (default ../shared/data/mnist-t10k).
#   conv2  Conv-2 on the bundled digits, 400 iterations a level.
# Usage: bash bench/prune_at_init.sh [mnist|conv2|all]; writes mlflow.db, runs/, reports/ here.
set -euo pipefail
which=${1:-all}
METHODS='space.method={grid: [imp, snip, grasp, synflow, random_init]}'
CONTROLS='space.control={grid: [none, shuffle]}'
if [ "$which" != conv2 ]; then
  python -c 'from pathlib import Path; from bench.trial_speed import mnist_root, MNIST_T10K
if mnist_root(Path("/tmp/mnist8k")) is None: raise SystemExit(f"no t10k files in {MNIST_T10K}: set LTH_MNIST_T10K")'
  lth sweep run sweeps/prune_at_init.yaml --name prune-at-init-mnist --set experiment=prune-at-init-mnist \
    --set base.dataset='{name: mnist, data_dir: /tmp/mnist8k, validation: 1000}' \
    --set base.train.iterations=1000 --set base.train.eval_interval=100 --set "$METHODS" --set "$CONTROLS"
  lth report table --experiment prune-at-init-mnist --rows method,control --format markdown
  lth report plot --experiment prune-at-init-mnist --rows method,control --out reports/prune_at_init_mnist.png
fi
if [ "$which" != mnist ]; then
  lth sweep run sweeps/prune_at_init.yaml --name prune-at-init-conv2 --set experiment=prune-at-init-conv2 \
    --set base.model=conv2 --set base.train.iterations=400 --set base.train.eval_interval=40 \
    --set "$METHODS" --set "$CONTROLS"
  lth report table --experiment prune-at-init-conv2 --rows method,control --format markdown
  lth report plot --experiment prune-at-init-conv2 --rows method,control --out reports/prune_at_init_conv2.png
fi
