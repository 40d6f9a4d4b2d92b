"""Does `pack: auto`'s memory estimate (orchestrator/plan.py member_bytes) hold? For each
case, a fresh process builds a pack of K members on the synthetic dataset, runs three
training steps and one evaluation (K x 1000 examples, as the engine's evaluation), and
reports its peak resident memory above what it held before the steps (/proc's VmHWM, so
Linux only), against K x member_bytes. The estimate should be the larger: it sizes packs.

    .venv/bin/python bench/pack_memory.py
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = [("lenet_300_100", 1.0, 8, 60), ("conv2", 1.0, 4, 60), ("resnet20", 0.5, 4, 64),
         ("resnet20", 1.0, 2, 128), ("vgg11", 0.5, 2, 64)]  # model, width, K, batch size

ONE = """
import json, re, sys
import torch
import torch.nn.functional as F
from orchestrator.plan import member_bytes
from trials.nets import datasets, models
from trials.loop.stacked import PackedNet
from trials.spec import DatasetSpec, ModelSpec, TrainSpec, TrialSpec

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

name, width, k, batch = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
spec = TrialSpec(model=ModelSpec(name=name, width=width), dataset=DatasetSpec(name="synthetic"),
                 train=TrainSpec(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=batch, iterations=10,
                                 eval_interval=10))
data = datasets.load(spec.dataset, torch.device("cpu"))
pnet = PackedNet(models.build(spec.model, data.info, seed=0), k, "cpu")
params = list(pnet.params.values())
x, y = data.train_x[: k * batch], data.train_y[: k * batch]
evaluation = data.val_x[:1000].repeat(k, 1, 1, 1)
before = max(status("VmRSS"), status("VmHWM"))
for _ in range(3):
    for p in params:
        p.grad = None
    F.cross_entropy(pnet.net(x), y, reduction="none").view(k, -1).mean(1).sum().backward()
with torch.no_grad():
    pnet.net.eval()(evaluation)
print(json.dumps({"peak": status("VmHWM") - before, "estimate": k * member_bytes(spec)}))
"""


def main() -> None:
    print(f"{'model':14s} {'width':>5s} {'K':>3s} {'batch':>5s} {'peak MB':>8s} {'estimate MB':>11s} {'estimate/peak':>13s}")
    for name, width, k, batch in CASES:
        done = subprocess.run([sys.executable, "-c", ONE, name, str(width), str(k), str(batch)], cwd=REPO,
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
        got = json.loads(done.stdout.strip().splitlines()[-1])
        mb = lambda b: b / 2**20  # noqa: E731
        print(f"{name:14s} {width:5.2f} {k:3d} {batch:5d} {mb(got['peak']):8.1f} {mb(got['estimate']):11.1f} "
              f"{got['estimate'] / max(got['peak'], 1):13.2f}x", flush=True)


if __name__ == "__main__":
    main()
