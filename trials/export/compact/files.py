"""The compact folder's files: WEIGHTS and ARCH (trials/export/compact/network.py), TorchScript,
ONNX (checked in ONNX Runtime against the torch network) and the report."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from trials.export.compact.checks import NotExact, exact
from trials.export.compact.model import Compacted
from trials.export.compact.network import ARCH, WEIGHTS

TORCHSCRIPT, ONNX, REPORT = "model.ts", "model.onnx", "compact.json"
FILES = (WEIGHTS, ARCH, TORCHSCRIPT, ONNX, REPORT)
ONNX_TOLERANCE = 1e-4  # ONNX Runtime fuses and reorders (BatchNorm into convolutions)


def export(c: Compacted, out, example: torch.Tensor) -> Path:
    """Write the compact folder: WEIGHTS + ARCH (load_compact), TORCHSCRIPT, ONNX (run in ONNX
    Runtime on `example` against the torch network; the difference goes in the report) and
    REPORT. Each file is written under a temporary name and renamed."""
    from trials.folder.store import save_tensors, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = c.model.cpu().eval()
    example = example.cpu()
    save_tensors(out / WEIGHTS, model.state_dict())
    write_json(out / ARCH, c.arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; it still runs
        scripted = torch.jit.script(model)
    _atomic_path(out / TORCHSCRIPT, lambda tmp: scripted.save(str(tmp)))
    _atomic_path(out / ONNX, lambda tmp: to_onnx(model, example[:2], tmp))
    c.report["onnx_max_diff"] = onnx_difference(out / ONNX, model, example)
    with torch.no_grad():
        largest = float(model(example).abs().max())
    if not exact(c.report["onnx_max_diff"], largest, ONNX_TOLERANCE):
        raise NotExact(f"ONNX Runtime's logits differ from torch's by {c.report['onnx_max_diff']:.3g}")
    c.report["files"] = list(FILES)
    write_json(out / REPORT, c.report)
    return out


def _atomic_path(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def to_onnx(model: nn.Module, example: torch.Tensor, path) -> None:
    """ONNX through torch.export (torch's exporter since 2.9), the batch dimension dynamic."""
    import contextlib
    import io
    import logging

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["x"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(path))


def onnx_session(path, device="cpu", threads: Optional[int] = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider"] if str(device).startswith("cuda") else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


@torch.no_grad()
def onnx_difference(path, model: nn.Module, x: torch.Tensor) -> float:
    """The largest absolute difference of ONNX Runtime's logits and the torch network's."""
    session = onnx_session(path)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    return float((got - model(x)).abs().max())
