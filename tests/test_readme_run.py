"""The README followed as written, shrunk: every ```bash block runs in bash and every
```python block in Python, in README order, in a fresh folder with HOME, the MLflow store
and the data of its own; `lth` is the real command line with the shrinking of
tests/readme_lth.py (one seed, one level, short training; nothing else changed) and the
text replacements of REPLACED (a loop over seeds runs for one). A block is skipped only
for a reason listed in SKIPPED (a cloud account, a server that runs until stopped, a
bench); a new block that neither runs nor has a reason fails the test.

The data the README assumes: `~/data` (a torchvision MNIST root) and the t10k files of
`$LTH_MNIST_T10K` hold scikit-learn's digits (real handwriting, 8x8) scaled to 16x16 and
placed at shifting offsets in 28x28, written as MNIST's IDX files."""
import gzip
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

SKIPPED = {  # a block's first line (prefix) -> why the test does not run it
    "make demo": "CI runs `make test`; `make demo` is the demo itself",
    "mlflow ui": "a server that runs until stopped",
    ".venv/bin/python bench/read_scale.py": "a bench (minutes), run by hand",
    ".venv/bin/python bench/compact.py": "a bench (minutes, on a quiet machine), run by hand",
    ".venv/bin/python bench/early_bird.py": "a reproduction (tens of minutes on 2 shared cores), run by hand",
    "bash bench/prune_at_init.sh": "reproductions (MNIST ~16 min, Conv-2 on digits ~15 min, 2 cores), run by hand",
    "pip install -e . 'boto3": "needs an AWS account (`ray up`)",
    "HEAD=$(ray get-head-ip": "needs the cluster of `ray up`",
}

# A block's text -> what runs instead, before it runs (each must still be in the README):
# the README's scratch folder kept inside the test's; its loop over three seeds shrunk to
# the last one, as tests/readme_lth.py shrinks a sweep's seeds (the loop's body, the
# README's commands, runs as written).
REPLACED = {"/tmp/mnist8k": "{tmp}/mnist8k", "for seed in 0 1 2; do": "for seed in 2; do"}


def blocks() -> list[tuple[str, str]]:
    """(language, text) of each ```bash and ```python block, in README order."""
    return re.findall(r"```(bash|python)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def skipped(text: str) -> str | None:
    first = text.strip().splitlines()[0]
    return next((why for prefix, why in SKIPPED.items() if first.startswith(prefix)), None)


def trial_yaml() -> str:
    """The README's example trial file (the ```yaml block after `lth trial show my_trial.yaml`)."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"lth trial show my_trial\.yaml.*?```\n\n```yaml\n(.*?)```", text, re.S).group(1)


def digits_as_mnist(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = np.random.default_rng(seed)
    pick = g.integers(0, len(digits.target), n)
    small = (digits.images[pick] * (255 / 16)).astype(np.uint8).repeat(2, 1).repeat(2, 2)  # 16x16
    images = np.zeros((n, 28, 28), np.uint8)
    for i, (dy, dx) in enumerate(g.integers(0, 13, (n, 2))):
        images[i, dy:dy + 16, dx:dx + 16] = small[i]
    return images, digits.target[pick].astype(np.uint8)


def idx(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    n, h, w = images.shape
    return (struct.pack(">iiii", 2051, n, h, w) + images.tobytes(), struct.pack(">ii", 2049, n) + labels.tobytes())


def sandbox(tmp: Path) -> dict:
    """The folder the README is followed in, and its environment."""
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 7000), ("t10k", 1000)):
        images, labels = idx(*digits_as_mnist(n, seed=len(split)))
        (raw / f"{split}-images-idx3-ubyte").write_bytes(images)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(labels)
    t10k = tmp / "t10k"
    t10k.mkdir()
    images, labels = idx(*digits_as_mnist(10_000, seed=2))
    (t10k / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images, compresslevel=1))
    (t10k / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels, compresslevel=1))
    for name in ("sweeps", "bench"):
        (tmp / name).symlink_to(ROOT / name)
    (tmp / "my_trial.yaml").write_text(trial_yaml())
    shim = tmp / "bin"
    shim.mkdir()
    (shim / "lth").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "readme_lth.py"}" "$@"\n')
    (shim / "lth").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "LTH_"))}
    env.update(HOME=str(tmp), PATH=f"{shim}:{BIN}:{env['PATH']}", LTH_MNIST_T10K=str(t10k),
               LTH_README_LOG=str(tmp / "lth-calls.jsonl"), PYTHONPATH=str(tmp))
    return env


def run_block(lang: str, text: str, tmp: Path, env: dict) -> None:
    for written, shrunk in REPLACED.items():
        text = text.replace(written, shrunk.format(tmp=tmp))
    command = ["bash", "-euo", "pipefail", "-c", text] if lang == "bash" else [sys.executable, "-c", text]
    proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{text}\n--- stderr:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, f"{text}\n{proc.stderr[-4000:]}"


def test_every_block_runs_or_says_why_not():
    for lang, text in blocks():
        if lang == "bash" and not skipped(text):
            assert "lth " in text or "python" in text, f"a block the test would run but that runs nothing: {text}"
    assert all(any(skipped(t) == why for _, t in blocks()) for why in SKIPPED.values()), "a reason for no block"
    for written in REPLACED:
        assert any(written in t for _, t in blocks() if not skipped(t)), f"no block runs {written!r} any more"


@pytest.mark.slow
def test_the_readme_runs_as_written(tmp_path):
    env = sandbox(tmp_path)
    ran = 0
    for lang, text in blocks():
        if skipped(text):
            continue
        run_block(lang, text, tmp_path, env)
        ran += 1
    calls = [json.loads(line) for line in (tmp_path / "lth-calls.jsonl").read_text().splitlines()]
    assert all(c["code"] == 0 for c in calls), [c for c in calls if c["code"]]
    commands = {tuple(c["argv"][:2]) for c in calls}
    assert {("sweep", "run"), ("sweep", "resume"), ("sweep", "status"), ("tickets", "export"), ("report", "table"),
            ("report", "plot"), ("trial", "run"), ("stability", "find")} <= commands, commands
    # what the blocks say they make
    assert (tmp_path / "ticket7" / "spec.json").is_file()
    assert (tmp_path / "tickets.csv").read_text().startswith("run_id,")  # a header even with no ticket that good
    for made in ("table.tex", "imp.pdf", "inst.png", "cost.png", "runs/lenet/levels.jsonl", "runs/mine/levels.jsonl",
                 "runs/edge_popup/2/levels.jsonl", "runs/random_mask/2/levels.jsonl", "runs/imp_dense/2/levels.jsonl"):
        assert (tmp_path / made).is_file(), made
    assert ran >= 10
