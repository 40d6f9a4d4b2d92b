"""The masked training loop: pruned weights stay zero, schedule and data order are
positioned by iteration, divergence is reported."""
import dataclasses

import pytest
import torch

from trials.nets import masks, models
from trials.loop import optim
from trials.spec import ModelSpec, TrainSpec
from trials.core.seeds import rng
from trials.loop.training import BatchOrder, TrainingDiverged, learning_rate, train_level


def models_spec():
    return ModelSpec(name="lenet_300_100")


def random_mask(layers, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(shape, generator=g) < density for k, shape in layers.shapes.items()}


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.9), ("adam", 0.0)])
def test_pruned_weights_are_zero_in_every_forward_and_after_training(digits_cpu, optimizer, momentum):
    net = models.build(models_spec(), digits_cpu.info, seed=0)
    layers = masks.Layers.of(net)
    mask = random_mask(layers)
    assert all(net.get_parameter(k)[~m].abs().sum() > 0 for k, m in mask.items())  # starts dense
    seen = []

    def check(module, inputs):
        seen.append(all(float(net.get_parameter(k).detach()[~m].abs().max()) == 0.0 for k, m in mask.items()))

    net.register_forward_pre_hook(check)
    t = TrainSpec(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3, momentum=momentum,
                  weight_decay=1e-3, batch_size=32, iterations=60, eval_interval=20)
    train_level(net, mask, digits_cpu, t, seed=0, start_iteration=0)
    assert len(seen) > 60 and all(seen)
    for k, m in mask.items():
        p = net.get_parameter(k).detach()
        assert float(p[~m].abs().max()) == 0.0
        assert float(p[m].abs().min()) > 0.0 or int(m.sum()) == 0  # survivors trained, not zeroed


def test_learning_rate_schedule():
    t = TrainSpec(lr=0.1, iterations=100, warmup_iterations=10, milestones=(50, 80), gamma=0.1)
    assert learning_rate(t, 0) == pytest.approx(0.01)
    assert learning_rate(t, 9) == pytest.approx(0.1)
    assert learning_rate(t, 49) == pytest.approx(0.1)
    assert learning_rate(t, 50) == pytest.approx(0.01)
    assert learning_rate(t, 80) == pytest.approx(0.001)


def test_batch_order_positioned_at_any_iteration():
    full = BatchOrder(100, 7, seed=3, device="cpu")
    seq = [full(t) for t in range(40)]
    jumped = BatchOrder(100, 7, seed=3, device="cpu")
    assert all(torch.equal(jumped(t), seq[t]) for t in (23, 24, 39, 0))
    epoch0 = torch.cat(seq[:14])  # 100 // 7 = 14 full batches per epoch
    assert len(set(epoch0.tolist())) == 98  # no repeats within an epoch, last partial batch dropped
    assert not torch.equal(seq[0], BatchOrder(100, 7, seed=4, device="cpu")(0))


def test_rng_is_a_pure_function_of_its_parts():
    assert torch.equal(torch.rand(3, generator=rng(1, "a", 2)), torch.rand(3, generator=rng(1, "a", 2)))
    assert not torch.equal(torch.rand(3, generator=rng(1, "a", 2)), torch.rand(3, generator=rng(1, "a", 3)))


def test_weights_after_k_iterations_match_a_k_iteration_run(digits_cpu):
    """The rewind point is exactly where a run that stops at k ends (same data, same lr)."""
    k = 30
    t = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=32, iterations=80, eval_interval=10)
    captured = {}
    net = models.build(models_spec(), digits_cpu.info, seed=1)
    ones = masks.ones(masks.Layers.of(net))
    train_level(net, ones, digits_cpu, t, seed=1, start_iteration=0,
                on_iteration={k: captured.update})
    short = models.build(models_spec(), digits_cpu.info, seed=1)
    train_level(short, ones, digits_cpu, dataclasses.replace(t, iterations=k), seed=1,
                start_iteration=0)
    assert all(torch.equal(captured[x], v) for x, v in short.state_dict().items())


def test_divergence_is_reported(digits_cpu):
    net = models.build(models_spec(), digits_cpu.info, seed=0)
    t = TrainSpec(optimizer="sgd", lr=1e6, batch_size=32, iterations=40, eval_interval=10)
    with pytest.raises(TrainingDiverged, match="iteration"):
        train_level(net, masks.ones(masks.Layers.of(net)), digits_cpu, t, seed=0, start_iteration=0)


def test_bf16_autocast_runs_and_keeps_masks(digits_cpu):
    net = models.build(models_spec(), digits_cpu.info, seed=0)
    layers = masks.Layers.of(net)
    mask = random_mask(layers, 0.3)
    t = TrainSpec(optimizer="adam", lr=1e-3, batch_size=32, iterations=40, eval_interval=20, precision="bf16")
    record = train_level(net, mask, digits_cpu, t, seed=0, start_iteration=0)
    assert 0.0 <= record["test_acc"] <= 1.0 and record["val_loss"] == record["val_loss"]
    assert all(float(net.get_parameter(k).detach()[~m].abs().max()) == 0.0 for k, m in mask.items())


def test_fused_is_a_spec_choice_close_to_the_default_and_keeps_masks(digits_cpu):
    from tests.conftest import quick_spec
    from trials.loop.arithmetic import make_optimizer

    t = TrainSpec(optimizer="adam", lr=1e-3, batch_size=32, iterations=60, eval_interval=20)
    fused_t = dataclasses.replace(t, fused=True)
    net = models.build(models_spec(), digits_cpu.info, seed=0)
    assert isinstance(make_optimizer(fused_t, net.parameters()), optim.FusedAdam)
    assert isinstance(make_optimizer(t, net.parameters()), optim.ExactAdam)
    layers = masks.Layers.of(net)
    mask = random_mask(layers, 0.3)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    plain = train_level(net, mask, digits_cpu, t, seed=0, start_iteration=0)
    net.load_state_dict(start)
    fused = train_level(net, mask, digits_cpu, fused_t, seed=0, start_iteration=0)
    assert abs(fused["test_acc"] - plain["test_acc"]) <= 0.01  # other rounding, same training
    assert all(float(net.get_parameter(k).detach()[~m].abs().max()) == 0.0 for k, m in mask.items())
    spec = quick_spec()
    assert spec.key == quick_spec(train=dataclasses.replace(spec.train, fused=False)).key
    assert spec.key != quick_spec(train=dataclasses.replace(spec.train, fused=True)).key


def test_steady_counts_the_steps_a_step_graph_may_replay():
    """training.steady: steps from `it` on at its rate, at most StepGraph.RUN, none from `end`
    (a graph of the step is captured only where it holds for RUN steps)."""
    from trials.loop.training import StepGraph, steady

    assert StepGraph.RUN == 20
    lr = lambda j: 1.0 if j < 50 else 0.1  # noqa: E731 - a milestone at 50
    assert [steady(lr, it, 100) for it in (0, 40, 49, 50, 95, 99)] == [20, 10, 1, 20, 5, 1]
    warmup = lambda j: min(1.0, (j + 1) / 10)  # noqa: E731 - a ramp: a new rate every step until 9
    assert [steady(warmup, it, 100) for it in (0, 8, 9)] == [1, 1, 20]
    started = lambda j: (j >= 30, 0.1)  # noqa: E731 - a pack member starting at 30
    assert steady(started, 25, 100) == 5 and steady(started, 30, 100) == 20


@pytest.mark.parametrize("make", [
    lambda ps: (optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4),
                torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4)),
    lambda ps: (optim.SGD(ps, lr=0.05, momentum=0.0, weight_decay=0.0),
                torch.optim.SGD(ps, lr=0.05, momentum=0.0, weight_decay=0.0)),
    lambda ps: (optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4, fused=True),
                torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4, fused=True)),
    lambda ps: (optim.FusedAdam(ps, lr=1e-3, weight_decay=1e-4),
                torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-4, fused=True)),
], ids=["sgd", "sgd-plain", "sgd-fused", "adam-fused"])
def test_light_optimizers_step_as_torchs_classes(make):
    """trials.loop.optim's SGD and FusedAdam (no torch.optim.Optimizer: it imports torch._dynamo)
    against torch's classes: the same parameters, bit for bit, over masked steps with a
    change of learning rate."""
    torch.manual_seed(0)
    nets = [models.build(ModelSpec(name="lenet_300_100"), type("I", (), {"shape": (1, 8, 8), "num_classes": 10}),
                         seed=0) for _ in range(2)]
    light, theirs = make(list(nets[0].parameters()))[0], make(list(nets[1].parameters()))[1]
    before = [p.detach().clone() for p in nets[0].parameters()]
    mask = (torch.rand(300, 64) < 0.5).float()
    x, y = torch.randn(6, 60, 1, 8, 8), torch.randint(10, (6, 60))
    for i in range(6):
        if i == 3:
            for opt in (light, theirs):
                opt.param_groups[0]["lr"] *= 0.1
        for net, opt in zip(nets, (light, theirs)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x[i]), y[i]).backward()
            net.hidden[0].weight.grad.mul_(mask)
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert a.equal(b)
    assert not any(a.equal(b) for a, b in zip(nets[0].parameters(), before))  # every parameter stepped


def test_a_cpu_trial_does_not_import_torch_dynamo(tmp_path):
    """1.4 s of every process that trains: nothing of the CPU engine's path imports it."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from tests.conftest import quick_spec; "
            "from trials.spec import TrainSpec; from trials.runner.levels import run_lottery; "
            "t = dict(batch_size=60, iterations=20, eval_interval=10); "
            "[run_lottery(quick_spec(train=TrainSpec(**o, **t)), Path(sys.argv[1]) / str(i)) for i, o in enumerate(["
            "dict(optimizer='adam'), dict(optimizer='adam', fused=True), dict(optimizer='sgd', momentum=0.9)])]; "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_square_roots_skipping_zeros_are_torchs_bits():
    """optim.sqrts_skipping_zeros against x.sqrt() on second-moment-like values: exact
    zeros, denormals, tiny and large values, a dense tensor and a mostly-zero one."""
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(1000, generator=g) * 1e-3
    sparse = torch.rand(1000, generator=g) ** 8
    sparse[torch.rand(1000, generator=g) < 0.8] = 0.0
    sparse[:4] = torch.tensor([1e-45, 1e-40, 1e-38, 3e38])  # denormals, the smallest normal, near max
    for got, x in zip(optim.sqrts_skipping_zeros([dense, sparse]), [dense, sparse]):
        assert got.equal(x.sqrt())
