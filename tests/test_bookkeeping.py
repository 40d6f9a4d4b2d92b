"""A sweep's bookkeeping (ARCHITECTURE.md, "The trial folder" and "The sweep runner"):
masks stored as bits and read in both forms."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from trials import layout, masks
from trials.store import MASK_BITS, MASK_FORMAT, load_tensors, save_mask


def test_masks_are_stored_as_bits_and_read_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = {"fc1.weight": torch.rand(300, 64, generator=g) < 0.3, "odd": torch.rand(7, 3, generator=g) < 0.5,
            "scalar": torch.tensor(True), "empty": torch.zeros(0, 4, dtype=torch.bool)}
    save_mask(tmp_path / layout.MASK, mask)
    back = load_tensors(tmp_path / layout.MASK)
    assert set(back) == set(mask)
    for name, m in mask.items():
        assert back[name].dtype == torch.bool and back[name].shape == m.shape and torch.equal(back[name], m)
    save_file({k: v.contiguous() for k, v in mask.items()}, str(tmp_path / "bool.safetensors"))
    bytes_bool = (tmp_path / "bool.safetensors").stat().st_size
    assert (tmp_path / layout.MASK).stat().st_size < bytes_bool / 6  # 1 bit a weight, plus the header
    from safetensors import safe_open

    with safe_open(str(tmp_path / layout.MASK), framework="pt") as f:
        assert f.metadata()[MASK_FORMAT] == MASK_BITS


def test_a_mask_of_the_previous_layout_one_byte_per_weight_still_reads(tmp_path):
    mask = masks.ones(masks.Layers.of(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))))
    mask["0.weight"][1, 2] = False
    save_file(mask, str(tmp_path / "old.safetensors"))  # what the engine wrote before bits
    back = load_tensors(tmp_path / "old.safetensors")
    assert all(torch.equal(back[k], mask[k]) and back[k].dtype == torch.bool for k in mask)
