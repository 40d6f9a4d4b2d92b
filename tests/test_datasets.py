"""Dataset registry: bundled/generated sets, torchvision readers fed with tiny files this
test writes itself (nothing is downloaded), the validation split and crop+flip."""
from __future__ import annotations

import os
import pickle
import random
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from trials.nets import datasets
from trials.nets.datasets import crop_flip
from trials.core.errors import ConfigError
from trials.spec import DatasetSpec

CPU = torch.device("cpu")


def rows(x: torch.Tensor) -> Counter:
    """Examples as a multiset of their bytes (order-free comparison of splits)."""
    return Counter(bytes(r) for r in x.flatten(1).contiguous().numpy().view(np.uint8))


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- digits (bundled)


def test_digits_shapes_dtypes_and_default_sizes(digits_cpu):
    d = digits_cpu
    assert d.info == datasets.DatasetInfo((1, 8, 8), 10)
    assert d.train_x.shape == (1437 - 237, 1, 8, 8)
    assert d.val_x.shape == (237, 1, 8, 8)
    assert d.test_x.shape == (360, 1, 8, 8)
    assert len(d.train_y) == 1200 and len(d.val_y) == 237 and len(d.test_y) == 360
    for x in (d.train_x, d.val_x, d.test_x):
        assert x.dtype == torch.float32 and x.device.type == "cpu"
    for y in (d.train_y, d.val_y, d.test_y):
        assert y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert set(d.train_y.tolist()) == set(range(10))
    assert d.augment is None  # digits has no standard augmentation


def test_digits_split_is_fixed_whatever_the_global_seed():
    torch.manual_seed(1)
    a = datasets.load(DatasetSpec(name="digits"), CPU)
    torch.manual_seed(2)
    torch.rand(7)
    b = datasets.load(DatasetSpec(name="digits"), CPU)
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_digits_validation_size_is_configurable(digits_cpu):
    d = datasets.load(DatasetSpec(name="digits", validation=100), CPU)
    assert len(d.train_x) == 1337 and len(d.train_y) == 1337
    assert len(d.val_x) == 100 and len(d.val_y) == 100
    assert len(d.test_x) == 360
    assert torch.equal(d.test_x, digits_cpu.test_x)  # the test set never depends on validation


def test_digits_train_and_val_partition_the_training_set(digits_cpu):
    d = digits_cpu
    full_x, full_y, test_x, _ = datasets.DATASETS.get("digits").read(DatasetSpec(name="digits"))
    assert len(full_x) == 1437 and len(test_x) == 360
    # every training example lands in exactly one of train/val (as a multiset of rows)
    assert rows(d.train_x) + rows(d.val_x) == rows(full_x)
    assert not set(rows(d.train_x)) & set(rows(d.val_x))
    assert Counter(d.train_y.tolist()) + Counter(d.val_y.tolist()) == Counter(full_y.tolist())


def test_digits_roughly_standardised(digits_cpu):
    d = digits_cpu
    assert abs(float(d.train_x.mean())) < 0.05
    assert abs(float(d.train_x.std()) - 1) < 0.05
    assert abs(float(d.test_x.mean())) < 0.1  # standardised with the training statistics
    assert abs(float(d.test_x.std()) - 1) < 0.1


def test_batch_size_larger_than_training_set_is_a_config_error():
    spec = DatasetSpec(name="digits")
    assert len(datasets.load(spec, CPU, batch_size=1200).train_x) == 1200  # exactly all: fine
    with pytest.raises(ConfigError, match=r"^train\.batch_size") as e:
        datasets.load(spec, CPU, batch_size=1201)
    assert e.value.key == "train.batch_size" and e.value.value == 1201


def test_validation_must_leave_training_examples():
    assert len(datasets.load(DatasetSpec(name="digits", validation=1436), CPU).train_x) == 1
    for v in (1437, 5000):
        with pytest.raises(ConfigError, match=r"^dataset\.validation") as e:
            datasets.load(DatasetSpec(name="digits", validation=v), CPU)
        assert e.value.key == "dataset.validation" and e.value.value == v


# ---------------------------------------------------------------- generated


def test_mnist1d_shapes_classes_and_global_rngs_untouched():
    random.seed(123)
    np.random.seed(123)
    py_state, np_state = random.getstate(), np.random.get_state()

    d = datasets.load(DatasetSpec(name="mnist1d"), CPU)

    assert d.info == datasets.DatasetInfo((40,), 10)
    assert d.train_x.shape == (3500, 40) and d.val_x.shape == (500, 40) and d.test_x.shape == (1000, 40)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert set(d.train_y.tolist()) == set(range(10)) and set(d.test_y.tolist()) == set(range(10))
    assert abs(float(torch.cat([d.train_x, d.val_x]).mean())) < 1e-3
    # mnist1d reseeds Python's and NumPy's global RNGs; load must put the caller's back
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_synthetic_shapes():
    d = datasets.load(DatasetSpec(name="synthetic"), CPU)
    assert d.info == datasets.DatasetInfo((1, 28, 28), 10)
    assert d.train_x.shape == (2000, 1, 28, 28)
    assert d.val_x.shape == (500, 1, 28, 28)
    assert d.test_x.shape == (500, 1, 28, 28)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert set(d.train_y.tolist()) == set(range(10))


# ---------------------------------------------------------------- torchvision MNIST-likes


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def mnist_images(n: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Image i carries its id in pixel (0, 0), 255 - id at (5, 7), and label id % 10."""
    ids = np.arange(first, first + n)
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 0, 0] = ids
    images[:, 5, 7] = 255 - ids
    images[:, 27, 3] = 200
    return images, ids % 10


@pytest.mark.parametrize(
    "name, folder, mean, std",
    [("mnist", "MNIST", 0.1307, 0.3081), ("fashion_mnist", "FashionMNIST", 0.2860, 0.3530)],
)
def test_mnist_like_from_data_dir(tmp_path, name, folder, mean, std):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    train_images, train_labels = mnist_images(64, first=0)
    test_images, test_labels = mnist_images(16, first=100)
    write_idx_images(raw / "train-images-idx3-ubyte", train_images)
    write_idx_labels(raw / "train-labels-idx1-ubyte", train_labels)
    write_idx_images(raw / "t10k-images-idx3-ubyte", test_images)
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", test_labels)
    written = files_under(tmp_path)

    d = datasets.load(DatasetSpec(name=name, data_dir=str(tmp_path), validation=8), CPU)

    assert d.train_x.shape == (56, 1, 28, 28) and d.val_x.shape == (8, 1, 28, 28)
    assert d.test_x.shape == (16, 1, 28, 28)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.augment is None

    norm = lambda v: (torch.as_tensor(v, dtype=torch.float32) / 255.0 - mean) / std  # noqa: E731
    unnorm = lambda x: torch.round((x * std + mean) * 255).long()  # noqa: E731
    # the test set keeps its order: exact normalised pixels and labels
    assert torch.allclose(d.test_x[:, 0, 0, 0], norm(np.arange(100, 116)), atol=1e-6)
    assert torch.allclose(d.test_x[3, 0, 5, 7], norm(255 - 103), atol=1e-6)
    assert torch.allclose(d.test_x[3, 0, 1, 1], norm(0), atol=1e-6)
    assert d.test_y.tolist() == test_labels.tolist()

    # train + val: a permutation of the 64 written images, labels still paired with images
    x, y = torch.cat([d.train_x, d.val_x]), torch.cat([d.train_y, d.val_y])
    ids = unnorm(x[:, 0, 0, 0])
    assert sorted(ids.tolist()) == list(range(64))
    assert not set(unnorm(d.train_x[:, 0, 0, 0]).tolist()) & set(unnorm(d.val_x[:, 0, 0, 0]).tolist())
    assert torch.equal(y, ids % 10)
    assert torch.allclose(x[:, 0, 5, 7], norm(255 - ids), atol=1e-6)
    assert torch.allclose(x[:, 0, 27, 3], norm(200).expand(64), atol=1e-6)
    assert Counter(y.tolist()) == Counter(train_labels.tolist())

    assert files_under(tmp_path) == written  # nothing downloaded or cached next to the data


# ---------------------------------------------------------------- torchvision CIFAR-10

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_batch(ids: np.ndarray) -> np.ndarray:
    """Rows of 3072 = 3 channel planes of 32x32: the id in (c0, 0, 0), 200 at (c1, 3, 5),
    100 at (c2, 31, 0); everything else 0 (so a transposed image reads wrong)."""
    data = np.zeros((len(ids), 3, 32, 32), np.uint8)
    data[:, 0, 0, 0] = ids
    data[:, 1, 3, 5] = 200
    data[:, 2, 31, 0] = 100
    return data.reshape(len(ids), 3072)


def write_cifar(root: Path, per_batch: int = 4, n_test: int = 6, label_type=list) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b, name in enumerate(CIFAR_FILES):
        ids = np.arange(n_test) + 200 if name == "test_batch" else np.arange(per_batch) + b * per_batch
        labels = label_type((ids % 10).tolist()) if label_type is list else (ids % 10).astype(label_type)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": cifar_batch(ids), "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:  # not torchvision's md5: a re-pack
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def cifar_norm(v, c: int) -> torch.Tensor:
    return (torch.as_tensor(v, dtype=torch.float32) / 255 - CIFAR_MEAN[c]) / CIFAR_STD[c]


def test_cifar10_from_data_dir(tmp_path):
    write_cifar(tmp_path)
    written = files_under(tmp_path)

    d = datasets.load(DatasetSpec(name="cifar10", data_dir=str(tmp_path), validation=5), CPU)

    assert d.info == datasets.DatasetInfo((3, 32, 32), 10)
    assert d.train_x.shape == (15, 3, 32, 32) and d.val_x.shape == (5, 3, 32, 32)
    assert d.test_x.shape == (6, 3, 32, 32)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.augment is crop_flip

    # test set in file order; channels, rows and columns where they were written
    assert torch.allclose(d.test_x[:, 0, 0, 0], cifar_norm(np.arange(200, 206), 0), atol=1e-5)
    assert torch.allclose(d.test_x[:, 1, 3, 5], cifar_norm(200, 1).expand(6), atol=1e-5)
    assert torch.allclose(d.test_x[:, 1, 5, 3], cifar_norm(0, 1).expand(6), atol=1e-5)
    assert torch.allclose(d.test_x[:, 2, 31, 0], cifar_norm(100, 2).expand(6), atol=1e-5)
    assert torch.allclose(d.test_x[:, 2, 0, 31], cifar_norm(0, 2).expand(6), atol=1e-5)
    assert d.test_y.tolist() == [i % 10 for i in range(200, 206)]

    x, y = torch.cat([d.train_x, d.val_x]), torch.cat([d.train_y, d.val_y])
    ids = torch.round((x[:, 0, 0, 0] * CIFAR_STD[0] + CIFAR_MEAN[0]) * 255).long()
    assert sorted(ids.tolist()) == list(range(20))  # all five batches, each example once
    assert torch.equal(y, ids % 10)
    assert torch.allclose(x[:, 1, 3, 5], cifar_norm(200, 1).expand(20), atol=1e-5)

    assert files_under(tmp_path) == written


def test_cifar10_repacked_numpy_labels_load_as_int64(tmp_path):
    write_cifar(tmp_path, label_type=np.uint8)
    d = datasets.load(DatasetSpec(name="cifar10", data_dir=str(tmp_path), validation=5), CPU)
    assert d.train_y.dtype == torch.int64 and d.test_y.dtype == torch.int64
    assert d.test_y.tolist() == [i % 10 for i in range(200, 206)]


def test_cifar10_no_augment_when_disabled(tmp_path):
    write_cifar(tmp_path)
    d = datasets.load(DatasetSpec(name="cifar10", data_dir=str(tmp_path), validation=5, augment=False), CPU)
    assert d.augment is None


def test_cifar10_root_missing_a_batch_is_a_config_error(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match=r"^dataset\.data_dir") as e:
        datasets.load(DatasetSpec(name="cifar10", data_dir=str(tmp_path)), CPU)
    assert e.value.key == "dataset.data_dir"


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
@pytest.mark.parametrize("exists", [True, False])
def test_data_dir_without_the_dataset_is_a_config_error(tmp_path, name, exists):
    root = tmp_path / "data"
    if exists:
        root.mkdir()
    with pytest.raises(ConfigError, match=r"^dataset\.data_dir") as e:
        datasets.load(DatasetSpec(name=name, data_dir=str(root)), CPU)
    assert e.value.key == "dataset.data_dir" and e.value.value == str(root)
    assert files_under(tmp_path) == set()  # no download attempted into it


# ---------------------------------------------------------------- crop_flip


def reference_crop_flip(x: torch.Tensor, seed: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loop with the same draws as crop_flip (same generator seed, same order)."""
    n, _, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    for i in range(n):
        r, c = int(shifts[0, i]), int(shifts[1, i])
        crop = padded[i, :, r : r + h, c : c + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out, flips


def test_crop_flip_keeps_shape_and_is_deterministic():
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = crop_flip(x, torch.Generator().manual_seed(5), pad=4)
    b = crop_flip(x, torch.Generator().manual_seed(5), pad=4)
    c = crop_flip(x, torch.Generator().manual_seed(6), pad=4)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_crop_flip_matches_per_example_crop_and_flip():
    # non-square, several channels: catches swapped rows/cols or channel mixing
    x = torch.arange(24 * 3 * 6 * 9, dtype=torch.float32).view(24, 3, 6, 9) + 1
    expected, flips = reference_crop_flip(x, seed=11, pad=2)
    assert flips.any() and not flips.all()  # both cases are exercised
    got = crop_flip(x, torch.Generator().manual_seed(11), pad=2)
    assert torch.equal(got, expected)


def test_crop_flip_flipped_example_is_the_mirrored_crop():
    # one example, seeds chosen so that one draw flips and one does not
    x = torch.arange(1 * 1 * 5 * 5, dtype=torch.float32).view(1, 1, 5, 5) + 1
    seen = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        r, c = (int(v) for v in torch.randint(0, 3, (2, 1), generator=g).flatten())
        flip = bool(torch.rand(1, generator=g) < 0.5)
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))[0, 0]
        crop = padded[r : r + 5, c : c + 5]
        got = crop_flip(x, torch.Generator().manual_seed(seed), pad=1)[0, 0]
        assert torch.equal(got, crop.flip(1) if flip else crop)
        seen.add(flip)
        if flip and r == 1 and c == 1:  # centred and flipped: exactly the mirrored image
            assert torch.equal(got, x[0, 0].flip(1))
    assert seen == {True, False}


def test_crop_flip_constant_image_stays_constant_outside_the_padding():
    n, h, w, pad = 64, 8, 8, 4
    x = torch.full((n, 2, h, w), 3.0)
    g = torch.Generator().manual_seed(3)
    out = crop_flip(x, g, pad=pad)
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=torch.Generator().manual_seed(3))
    assert set(out.unique().tolist()) <= {0.0, 3.0}
    for i in range(n):
        dr, dc = abs(int(shifts[0, i]) - pad), abs(int(shifts[1, i]) - pad)
        # the kept image is a (h - dr) x (w - dc) block in every channel, the rest is padding
        assert int((out[i] == 3.0).sum()) == 2 * (h - dr) * (w - dc)
        assert torch.equal(out[i, 0], out[i, 1])


def test_crop_flip_draws_per_example():
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)).expand(64, 3, 16, 16)
    out = crop_flip(x.contiguous(), torch.Generator().manual_seed(0), pad=4)
    distinct = {bytes(o.numpy().tobytes()) for o in out}
    assert len(distinct) > 32  # 162 (shift, shift, flip) combinations; one per example


def _load_in_subprocess(cache: Path) -> subprocess.Popen:
    code = ("import torch; from trials.nets import datasets; from trials.spec import DatasetSpec; "
            "d = datasets.load(DatasetSpec(name='mnist', validation=8), torch.device('cpu')); "
            "print(len(d.train_x), len(d.test_x))")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "LTH_DATA_DIR": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_node_cache_is_used_under_a_lock_without_data_dir(tmp_path):
    """No data_dir: the node-local cache ($LTH_DATA_DIR) is used, through torchvision's
    download path under a file lock; files already there mean nothing is downloaded
    (this machine has no network, so a download attempt would fail the loads)."""
    raw = tmp_path / "cache" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 64), ("t10k", 16)):
        images, labels = mnist_images(n, 0)
        write_idx_images(raw / f"{split}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{split}-labels-idx1-ubyte", labels)
    procs = [_load_in_subprocess(tmp_path / "cache") for _ in range(2)]  # two trials on one node
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["56", "16"]
    assert (tmp_path / "cache" / ".MNIST.lock").exists()


# ---------------------------------------------------------------- raw readers vs torchvision


def torchvision_reference(spec: DatasetSpec):
    """What the loaders returned when they went through torchvision's dataset classes (the
    reference the raw-file readers must reproduce exactly: values, dtypes and strides)."""
    import torchvision.datasets as tvd

    root = Path(spec.data_dir)
    if spec.name == "cifar10":
        cls = datasets._cifar_class()
        tr, te = cls(str(root), train=True), cls(str(root), train=False)
        norm = lambda d: (torch.from_numpy(d.data).permute(0, 3, 1, 2).float() / 255  # noqa: E731
                          - datasets._CIFAR_MEAN) / datasets._CIFAR_STD
        labels = lambda d: torch.tensor(d.targets, dtype=torch.int64)  # noqa: E731
        return norm(tr), labels(tr), norm(te), labels(te)
    cls, mean, std = {"mnist": (tvd.MNIST, 0.1307, 0.3081), "fashion_mnist": (tvd.FashionMNIST, 0.2860, 0.3530)}[spec.name]
    tr, te = cls(str(root), train=True), cls(str(root), train=False)
    norm = lambda d: ((d.data.float() / 255.0 - mean) / std).unsqueeze(1)  # noqa: E731
    return norm(tr), tr.targets.long(), norm(te), te.targets.long()


def assert_same_tensors(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


def write_mnist_root(root: Path, folder: str, n_train: int, n_test: int, seed: int = 0) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    g = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx_images(raw / f"{split}-images-idx3-ubyte", g.integers(0, 256, (n, 28, 28)))
        write_idx_labels(raw / f"{split}-labels-idx1-ubyte", g.integers(0, 10, n))


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_raw_reader_gives_torchvisions_tensors(tmp_path, name, folder):
    write_mnist_root(tmp_path, folder, n_train=50, n_test=20)
    spec = DatasetSpec(name=name, data_dir=str(tmp_path), validation=10)
    assert_same_tensors(datasets.DATASETS.get(name).read(spec), torchvision_reference(spec))
    loaded = datasets.load(spec, CPU)
    assert loaded.train_x.shape == (40, 1, 28, 28) and loaded.test_x.shape == (20, 1, 28, 28)


@pytest.mark.parametrize("label_type", [list, np.uint8])
def test_cifar10_pickle_reader_gives_torchvisions_tensors(tmp_path, label_type):
    write_cifar(tmp_path, per_batch=3, n_test=5, label_type=label_type)
    folder = tmp_path / "cifar-10-batches-py"
    g = np.random.default_rng(1)
    for name in CIFAR_FILES:  # random pixels: every value and position is compared
        with open(folder / name, "rb") as f:
            entry = pickle.load(f)
        entry["data"] = g.integers(0, 256, entry["data"].shape).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    spec = DatasetSpec(name="cifar10", data_dir=str(tmp_path), validation=5)
    assert_same_tensors(datasets.DATASETS.get("cifar10").read(spec), torchvision_reference(spec))


def test_raw_readers_do_not_import_torchvision(tmp_path):
    write_mnist_root(tmp_path / "m", "MNIST", n_train=20, n_test=5)
    write_cifar(tmp_path / "c")
    code = ("import sys, torch; from trials.nets import datasets; from trials.spec import DatasetSpec; "
            f"datasets.load(DatasetSpec(name='mnist', data_dir={str(tmp_path / 'm')!r}, validation=5), torch.device('cpu')); "
            f"datasets.load(DatasetSpec(name='cifar10', data_dir={str(tmp_path / 'c')!r}, validation=5), torch.device('cpu')); "
            "print('torchvision' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False"]


def test_legacy_processed_mnist_still_goes_through_torchvision(tmp_path):
    """torchvision prefers ROOT/MNIST/processed/{training,test}.pt over raw files: so do we."""
    write_mnist_root(tmp_path, "MNIST", n_train=12, n_test=4)
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir()
    legacy = torch.zeros(6, 28, 28, dtype=torch.uint8), torch.arange(6) % 10
    torch.save(legacy, processed / "training.pt")
    torch.save((legacy[0][:2], legacy[1][:2]), processed / "test.pt")
    train_x, train_y, test_x, _ = datasets.DATASETS.get("mnist").read(DatasetSpec(name="mnist", data_dir=str(tmp_path)))
    assert train_x.shape == (6, 1, 28, 28) and test_x.shape == (2, 1, 28, 28)
    assert train_y.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("damage", ["magic", "size"])
def test_malformed_idx_file_is_a_config_error(tmp_path, damage):
    write_mnist_root(tmp_path, "MNIST", n_train=12, n_test=4)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    if damage == "magic":
        raw[2] = 0x0D  # float32 items: not MNIST's bytes
    else:
        raw = raw[:-5]
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=r"^dataset\.data_dir"):
        datasets.load(DatasetSpec(name="mnist", data_dir=str(tmp_path), validation=2), CPU)
