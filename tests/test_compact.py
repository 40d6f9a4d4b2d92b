"""Compaction (trials/export/compact/): per model family, tickets made by the project's own
structured and unstructured pruning compact to smaller dense networks whose logits equal
the masked network's on real inputs; residual channels go only when removed everywhere;
the exported files rebuild without unpickling and agree in TorchScript and ONNX Runtime;
`lth tickets compact` from a ticket folder and from a run of a real SQLite MLflow store."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from lth.cli import main
from tests.conftest import quick_spec
from trials.export import compact
from trials.nets import datasets, masks, models
from trials import load_ticket
from trials.methods import pruning
from trials.runner.levels import run_lottery
from trials.spec import DatasetSpec, ModelSpec, PruneSpec, TrainSpec

INFO = type("Info", (), {})


def info(shape):
    i = INFO()
    i.shape, i.num_classes = shape, 10
    return i


@pytest.fixture(scope="module")
def inputs():
    """Real inputs per shape: digits' test set (1x8x8), synthetic's (1x28x28), and synthetic's
    zero-padded to 1x32x32 (ResNet-18 needs 32)."""
    digits = datasets.load(DatasetSpec(name="digits"), torch.device("cpu")).test_x
    synthetic = datasets.load(DatasetSpec(name="synthetic"), torch.device("cpu")).test_x[:200]
    return {(1, 8, 8): digits, (1, 28, 28): synthetic, (1, 32, 32): F.pad(synthetic, (2, 2, 2, 2))}


def ticket_net(name, shape, prune: PruneSpec, width=1.0, seed=0):
    """A masked network as a ticket holds it: random weights, biases and BatchNorm state (as
    after some training: nonzero biases, running statistics), pruned by trials.methods.pruning."""
    net = models.build(ModelSpec(name=name, width=width), info(shape), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    layers = masks.Layers.of(net)
    weights = {k: v.detach() for k, v in net.state_dict().items()}
    mask = pruning.prune(prune, weights, masks.ones(layers), layers)
    masks.Masker(net, mask).apply()
    return net.eval(), mask, layers


STRUCTURED = PruneSpec(kind="structured", rate=0.7)
# unstructured, with some layers so sparse that whole units lose every incoming weight
CASES = [
    ("lenet_300_100", (1, 8, 8), 1.0, {"hidden.1": 0.995}),
    ("conv2", (1, 8, 8), 1.0, {"features.0": 0.99, "features.2": 0.999}),
    ("conv4", (1, 8, 8), 0.5, {"features.7": 0.999}),
    ("conv6", (1, 8, 8), 0.5, {"features.12": 0.999}),
    ("vgg11", (1, 28, 28), 0.25, {"features.25": 0.999, "features.4": 0.99}),
    ("resnet20", (1, 8, 8), 1.0, {"blocks.0.conv1": 0.995, "blocks.4.conv1": 0.995}),
    ("resnet18", (1, 32, 32), 1.0, {"layer1.0.conv1": 0.9995}),
]


def exact(net, c, x, margin=1.0):
    """The command's exactness check (float64), passed with `margin` to spare."""
    r = compact.check(net, c, x)
    return r["max_logit_diff_fp64"] * margin <= compact.TOLERANCE * max(1.0, r["max_abs_logit"])


def kept_units(mask, layers, names):
    """Units a structured mask keeps in the union of these layers' outputs."""
    return int(torch.stack([pruning.alive(mask, layers, n, units=True) for n in names]).any(0).sum())


@pytest.mark.parametrize("name, shape, width, sparse", CASES, ids=[c[0] for c in CASES])
def test_structured_ticket_compacts_exactly(name, shape, width, sparse, inputs):
    net, mask, layers = ticket_net(name, shape, STRUCTURED, width)
    c = compact.compact_model(net, shape)
    assert exact(net, c, inputs[shape])
    r = c.report
    for space in r["spaces"]:  # each space keeps exactly the units some producer kept
        assert space["kept"] == kept_units(mask, layers, space["layers"]), space
        assert space["kept_constant"] == 0 and space["removed_dead_out"] == 0
        assert (space["kept_tied"] > 0) <= (len(space["layers"]) > 1)  # only residual streams keep tied channels
    assert r["params"]["after"] < r["params"]["before"] / 3 and r["mac_ratio"] > 3
    assert r["effective_density"] <= r["density"]
    assert r["macs_per_example"]["before"] == compact.macs(net, shape)


@pytest.mark.parametrize("name, shape, width, sparse", CASES, ids=[c[0] for c in CASES])
def test_unstructured_ticket_folds_dead_units_exactly(name, shape, width, sparse, inputs):
    """Units with no incoming weight go, their constant output folded into the next layer where
    that is exact; a padded convolution's constant inputs stay."""
    net, mask, layers = ticket_net(name, shape, PruneSpec(kind="unstructured", rate=0.5,
                                                          layer_rates=tuple(sparse.items())), width)
    c = compact.compact_model(net, shape)
    assert exact(net, c, inputs[shape])
    r = c.report
    assert sum(s["removed_dead_in"] for s in r["spaces"]) > 0
    assert r["params"]["after"] < r["params"]["before"] and r["units"]["after"] < r["units"]["before"]
    assert r["nonzero_weights"]["after"] <= r["nonzero_weights"]["before"]
    if name in ("lenet_300_100", "conv2", "conv4", "conv6", "vgg11"):  # a Linear reads the sparse layer's units
        assert r["folded"] > 0
    if name in ("conv2", "vgg11", "resnet20"):  # a padded convolution reads dead units with a nonzero constant
        assert r["kept_constant"] > 0


def test_residual_channel_goes_only_when_removed_everywhere(inputs):
    """ResNet-20's first stream (stem, every first-segment block's conv2 and bn2, the second
    segment's shortcut reads it): a channel removed in the stem alone stays; removed in every
    producer it goes."""
    net, mask, layers = ticket_net("resnet20", (1, 8, 8), PruneSpec(kind="structured", rate=0.01))
    producers = ["conv", "blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv2"]
    norms = ["bn", "blocks.0.bn2", "blocks.1.bn2", "blocks.2.bn2"]
    with torch.no_grad():
        for conv, bn in zip(producers, norms):  # channel 3 removed everywhere, channel 5 in the stem only
            for ch in ([3, 5] if conv == "conv" else [3]):
                net.get_submodule(conv).weight[ch] = 0
                net.get_submodule(bn).weight[ch] = 0
                net.get_submodule(bn).bias[ch] = 0
    c = compact.compact_model(net, (1, 8, 8))
    stream = next(s for s in c.report["spaces"] if s["layers"][0] == "conv")
    assert sorted(stream["layers"]) == sorted(producers)
    assert stream["units"] == 16 and stream["kept"] == 15 and stream["kept_tied"] == 1
    assert c.arch["ops"][0]["out"] == 15
    assert exact(net, c, inputs[(1, 8, 8)], margin=1000)  # float noise: < TOLERANCE / 1000 on any machine


def test_the_check_fails_a_real_mistake(inputs, monkeypatch):
    """The exactness check tells float noise from a wrong compaction: a tied channel that
    must stay (channel 5 of ResNet-20's first stream: only the stem removed it), removed, and
    an unstructured LeNet whose dead units go without their constants folded, both fail it
    by orders of magnitude, on the networks whose right compaction passes with a margin of 1000."""
    net, _, _ = ticket_net("resnet20", (1, 8, 8), PruneSpec(kind="structured", rate=0.01))
    with torch.no_grad():
        net.conv.weight[5] = 0
        net.bn.weight[5] = 0
        net.bn.bias[5] = 0
    x = inputs[(1, 8, 8)]
    assert exact(net, compact.compact_model(net, (1, 8, 8)), x, margin=1000)
    decide = compact.units.decide

    def drop_channel_5(graph):
        decide(graph)
        stream = next(s for s in graph.spaces if s.keep is not None and any(p.op["module"] == "conv"
                                                                              for p in s.producers))
        stream.keep[5] = False

    monkeypatch.setattr(compact.units, "decide", drop_channel_5)
    wrong = compact.compact_model(net, (1, 8, 8))
    assert wrong.arch["ops"][0]["out"] == 15
    r = compact.check(net, wrong, x)
    assert r["max_logit_diff_fp64"] > 1e4 * compact.TOLERANCE * max(1.0, r["max_abs_logit"])
    monkeypatch.undo()

    net, _, _ = ticket_net("lenet_300_100", (1, 8, 8), PruneSpec(kind="unstructured", rate=0.5,
                                                                 layer_rates=(("hidden.1", 0.995),)))
    x = inputs[(1, 8, 8)]
    right = compact.compact_model(net, (1, 8, 8))
    assert right.report["folded"] > 0 and exact(net, right, x, margin=1000)
    monkeypatch.setattr(compact.units.Layer, "fold", property(lambda self: None, lambda self, value: None))
    r = compact.check(net, compact.compact_model(net, (1, 8, 8)), x)
    assert r["max_logit_diff_fp64"] > 1e4 * compact.TOLERANCE * max(1.0, r["max_abs_logit"])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_export_rebuilds_without_unpickling_and_runs_in_torchscript_and_onnx(tmp_path, inputs, monkeypatch):
    net, _, _ = ticket_net("resnet20", (1, 8, 8), STRUCTURED)
    x = inputs[(1, 8, 8)]
    c = compact.compact_model(net, (1, 8, 8))
    out = compact.export(c, tmp_path / "c", x[:64])
    assert sorted(p.name for p in out.iterdir()) == sorted(compact.FILES)
    report = json.loads((out / compact.REPORT).read_text())
    assert report["onnx_max_diff"] <= compact.ONNX_TOLERANCE
    arch = json.loads((out / compact.ARCH).read_text())
    assert arch["ops"][0] == {**c.arch["ops"][0]} and arch["input_shape"] == [1, 8, 8]

    def no_pickle(*a, **k):
        raise AssertionError("loading a compact network unpickled something")

    monkeypatch.setattr(torch, "load", no_pickle)
    rebuilt = compact.load_compact(out)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), c.model(x))
        assert exact(net, c, x)  # so the rebuilt network passes the check
        scripted = torch.jit.load(str(out / compact.TORCHSCRIPT))
        assert torch.equal(scripted(x), c.model(x))
    session = compact.onnx_session(out / compact.ONNX)
    for batch in (1, 7):  # the batch dimension is dynamic
        got = torch.from_numpy(session.run(None, {"x": x[:batch].numpy()})[0])
        assert (got - net(x[:batch])).abs().max() <= compact.ONNX_TOLERANCE


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    """A real structured Conv-2 IMP trial on digits: two levels."""
    spec = quick_spec(model=ModelSpec(name="conv2"), prune=PruneSpec(kind="structured", rate=0.5, levels=1),
                      train=TrainSpec(optimizer="adam", lr=1e-3, batch_size=60, iterations=60, eval_interval=30))
    out = tmp_path_factory.mktemp("conv2")
    return spec, out, run_lottery(spec, out)


def exported(out, level, dest):
    """The flat folder `lth tickets export` writes (trials/folder/layout.py)."""
    dest.mkdir()
    for name in ("spec.json", "rewind.safetensors"):
        shutil.copyfile(out / name, dest / name)
    for name in ("mask.safetensors", "final.safetensors", "record.json"):
        shutil.copyfile(out / f"level_{level:02d}" / name, dest / name)
    return dest


def test_cli_compacts_a_ticket_folder(trial, tmp_path, capsys):
    spec, out, records = trial
    folder = exported(out, 1, tmp_path / "ticket")
    assert main(["tickets", "compact", str(folder), "--out", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    assert "exact: largest logit difference" in printed and "fewer)" in printed
    report = json.loads((tmp_path / "c" / compact.REPORT).read_text())
    assert compact.exact(report["max_logit_diff_fp64"], report["max_abs_logit"])
    assert report["examples"] == 360 and report["level"] == 1
    assert report["units"]["after"] < report["units"]["before"]
    # every file as readable as its neighbours (safetensors alone wrote 0600), the trial's tensors too
    modes = {f.name: f.stat().st_mode & 0o777 for f in [*(tmp_path / "c").iterdir(), *out.rglob("*.safetensors")]}
    assert compact.WEIGHTS in modes and set(modes.values()) == {modes[compact.ARCH]}, modes
    ticket = load_ticket(folder)
    data = datasets.load(spec.dataset, torch.device("cpu"))
    net = compact.load_compact(tmp_path / "c")
    with torch.no_grad():
        acc = float((net(data.test_x).argmax(1) == data.test_y).float().mean())
    assert acc == pytest.approx(ticket.evaluate(data)[1], abs=1e-9) == pytest.approx(records[1].test_acc, abs=1e-9)


def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(trial, tmp_path, capsys):
    _, out, _ = trial
    folder = exported(out, 1, tmp_path / "ticket")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases = {
        ("--out", str(full)): "--out: '" + str(full) + "' is not allowed; allowed: a new or empty folder",
        ("--level", "0"): "--level: 0 is not allowed; allowed: the folder's level (1), or none",
    }
    for extra, message in cases.items():
        args = ["tickets", "compact", str(folder), "--out", str(tmp_path / "c"), *extra]
        if extra[0] == "--out":
            args = ["tickets", "compact", str(folder), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"lth: error: {message}"]
    assert main(["tickets", "compact", str(tmp_path / "full"), "--out", str(tmp_path / "c")]) == 2
    assert "lacks spec.json, record.json, mask.safetensors, final.safetensors" in capsys.readouterr().err
    assert main(["tickets", "compact", "abc123", "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip() == ("lth: error: --level: None is not allowed; allowed: a level "
                                               "number (a run id needs one)")
    assert not (tmp_path / "c").exists() and sorted(p.name for p in full.iterdir()) == ["x"]


def test_cli_compacts_a_run_and_logs_the_files_to_it(trial, tmp_path, capsys):
    """A real SQLite MLflow store holding a trial run's artifacts as sweeps log them."""
    _, out, _ = trial
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("compact", artifact_location=str(tmp_path / "artifacts"))
    run = c.create_run(exp, tags={"lth.kind": "trial"}).info.run_id
    for name in ("spec.json", "levels.jsonl"):
        c.log_artifact(run, str(out / name))
    c.log_artifact(run, str(out / "rewind.safetensors"), "ticket")
    for level in (0, 1):
        for name in ("mask.safetensors", "final.safetensors"):
            c.log_artifact(run, str(out / f"level_{level:02d}" / name), f"ticket/level_{level:02d}")
    assert main(["tickets", "compact", run, "--level", "1", "--out", str(tmp_path / "c"),
                 "--tracking-uri", uri]) == 0
    logged = {f.path for f in c.list_artifacts(run, "compact/level_01")}
    assert logged == {f"compact/level_01/{name}" for name in compact.FILES}
    report = json.loads((tmp_path / "c" / compact.REPORT).read_text())
    assert report["source"]["run_id"] == run and compact.exact(report["max_logit_diff_fp64"], report["max_abs_logit"])
    assert main(["tickets", "compact", run, "--level", "5", "--out", str(tmp_path / "d"), "--tracking-uri", uri]) == 2
    assert "--level: 5 is not allowed; levels logged for this run: 0, 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
