"""Effective density (trials/nets/paths.py): exact counts on hand-built networks, worked out by
hand in each test, and the count in every level record and compaction's report."""
import pytest
import torch

from trials.export import compact
from trials.nets import masks, models, paths


def ones(net):
    return masks.ones(masks.Layers.of(net))


def count(net, mask):
    layers = masks.Layers.of(net)
    on, total = paths.count(layers.ops, mask)
    assert masks.describe(mask, layers)["effective_density"] == on / total  # what a level record carries
    return on, total


def test_lenet_units_cut_off_from_input_and_from_output():
    net = models.LeNet(4, (3, 2), 2)  # 4 -> 3 -> 2 -> 2: 12 + 6 + 4 = 22 weights
    mask = ones(net)
    assert count(net, mask) == (22, 22)
    mask["hidden.0.weight"][0] = False  # unit 0 of the first hidden layer: cut off from the input
    mask["hidden.1.weight"][:, 1] = False  # unit 1 of the first hidden layer: cut off from the output
    # hidden.0: unit 1's 4 incoming weights lead nowhere, unit 2's 4 count; hidden.1: the 2
    # weights out of unit 0 carry no input, the 2 out of unit 2 count; fc: its 4 all count
    assert count(net, mask) == (4 + 2 + 4, 22)
    on = paths.connected(masks.Layers.of(net).ops, mask)
    assert on["hidden.0.weight"][1].sum() == 0 and on["hidden.0.weight"][2].all()
    assert on["hidden.1.weight"].tolist() == [[False, False, True], [False, False, True]]
    mask["fc.weight"][:, 1] = False  # the second layer's unit 1 is read by no logit: the cut cascades
    # fc: 2 weights; hidden.1: only (unit 0 <- unit 2); hidden.0: unit 2's 4 still reach the output
    assert count(net, mask) == (4 + 1 + 2, 22)
    mask["hidden.1.weight"][0, 2] = False  # no path at all
    assert count(net, mask) == (0, 22)


def test_conv_channels_and_flatten():
    net = models.ConvNet((1, 4, 4), (2, 2, "M"), 2, hidden=3)
    # conv 1->2 (18), conv 2->2 (36), max-pool to 2x2, flatten 8 -> 3 (24), 3 -> 3 (9), 3 -> 2 (6)
    mask = ones(net)
    assert count(net, mask) == (93, 93)
    mask["features.0.weight"][0] = False  # conv channel 0: cut off from the input
    mask["hidden.0.weight"][:, 4:] = False  # second conv's channel 1 (features 4-7 after flatten): read by nobody
    # features.0: channel 1's 9 weights; features.2: channel 0 <- channel 1, 9 weights (the 9 from
    # channel 0 carry no input; the 18 into channel 1 lead nowhere); hidden.0: 12; hidden.1: 9; fc: 6
    assert count(net, mask) == (9 + 9 + 12 + 9 + 6, 93)
    mask["features.2.weight"][0, 1, 1, 1] = False  # one kernel weight less: counted one by one
    assert count(net, mask) == (9 + 8 + 12 + 9 + 6, 93)


RESNET_WEIGHTS = {"conv": 18, "blocks.0.conv1": 36, "blocks.0.conv2": 36, "blocks.1.conv1": 72, "blocks.1.conv2": 144,
                  "blocks.1.shortcut.0": 8, "blocks.2.conv1": 288, "blocks.2.conv2": 576, "blocks.2.shortcut.0": 32,
                  "fc": 16}


def test_residual_identity_and_projection_shortcuts():
    """ResNet-8 of width 2: stem 1->2, block 0 (identity shortcut) 2->2, blocks 1 and 2
    (1x1 projection shortcuts) 2->4 and 4->8, fc 8->2."""
    net = models.CifarResNet((1, 8, 8), 8, 2, width=2)
    total = sum(RESNET_WEIGHTS.values())
    assert {k: v.numel() for k, v in ones(net).items()} == {f"{k}.weight": v for k, v in RESNET_WEIGHTS.items()}
    assert count(net, ones(net)) == (total, total)

    mask = ones(net)
    mask["blocks.0.conv2.weight"][:] = False  # block 0's body reads conv1 with nothing: conv1's 36 lead nowhere,
    assert count(net, mask) == (total - 36 - 36, total)  # but the identity shortcut carries the stream on

    mask = ones(net)
    mask["blocks.0.conv1.weight"][:] = False  # conv2 reads nothing reachable: its 36 carry no input
    assert count(net, mask) == (total - 36 - 36, total)

    mask = ones(net)
    mask["conv.weight"][1] = False  # stem channel 1 cut off from the input: the 2x9 weights of block 0's conv1
    # that read it carry no input, but the block's output channel 1 is reachable through its body
    assert count(net, mask) == (total - 9 - 18, total)
    mask["blocks.0.conv2.weight"][1] = False  # now channel 1 of the stream is reachable by no route:
    # blocks.0.conv2 -> ch 1 (18) gone; the 2x9 weights of blocks.0.conv1 reading ch 1 carry no input,
    # block 1's weights reading ch 1 (conv1: 4x9, shortcut: 4) too
    assert count(net, mask) == (total - 9 - 18 - 18 - 36 - 4, total)

    mask = ones(net)
    mask["blocks.1.conv1.weight"][:] = False  # the projection shortcut carries the stream; conv2's 144 do not
    assert count(net, mask) == (total - 72 - 144, total)
    mask["blocks.1.shortcut.0.weight"][:] = False  # nothing leaves block 1: no weight is on a path
    assert count(net, mask) == (0, total)


@pytest.mark.parametrize("name, shape", [("lenet_300_100", (1, 28, 28)), ("conv2", (3, 32, 32)),
                                         ("vgg11", (3, 32, 32)), ("resnet20", (3, 32, 32)),
                                         ("resnet18", (3, 32, 32))])
def test_every_model_is_described_and_compaction_keeps_every_path(name, shape):
    """Every registered model family has a count; compaction (which keeps what can change the
    logits) keeps every weight on a path, and its report's effective density is this count."""
    assert set(models.MODELS) == set(models.FAMILIES) and set(models.MODELS) <= set(compact.supported())
    net = models.MODELS.get(name)(shape, 10).eval()
    layers = masks.Layers.of(net)
    assert layers.ops is not None
    g = torch.Generator().manual_seed(0)
    mask = {k: torch.rand(s, generator=g) < 0.04 for k, s in layers.shapes.items()}  # 4%: many cut-off units
    with torch.no_grad():
        for k, keep in mask.items():
            net.get_parameter(k).mul_(keep)
    on, total = paths.count(layers.ops, mask)
    assert 0 < on < sum(int(m.sum()) for m in mask.values())
    c = compact.compact_model(net, shape)
    assert c.report["effective_density"] == on / total
    assert on <= c.report["nonzero_weights"]["after"]
