"""Dataset registry. Data lives as normalised tensors on the trial's device (airbench style):
batches are index slices and augmentation is a batched tensor op, never a DataLoader.

Each entry knows its static shape (for validation, without loading) and loads
(train, test) on the CPU; `load` then carves the validation split from the training
set with a fixed permutation (the same split for every seed) and moves it to the device.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from trials.core.errors import ConfigError
from trials.core.registry import Registry
from trials.nets.structure import INFOS, DatasetInfo  # noqa: F401 - DatasetInfo: part of this module's API

DATASETS: Registry = Registry("dataset", "dataset.name")
SPLIT_SEED = 0  # fixed: the validation/test split never depends on the trial's seed
EVAL_BATCH = 1000  # examples per evaluation forward pass (the loop's, and the planner's memory estimate)


@dataclass
class Data:
    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None


@dataclass(frozen=True)
class Source:
    info: DatasetInfo
    read: Callable  # (DatasetSpec) -> (train_x, train_y, test_x, test_y), CPU, normalised
    validation: int  # default validation size, in examples
    augment: Optional[Callable] = None


def info(spec) -> DatasetInfo:
    return DATASETS.get(spec.name).info


def load(spec, device, batch_size: int | None = None) -> Data:
    source = DATASETS.get(spec.name)
    train_x, train_y, test_x, test_y = source.read(spec)
    n_val = spec.validation if spec.validation is not None else source.validation
    n_train = len(train_x) - n_val
    if n_train < 1:
        raise ConfigError("dataset.validation", n_val,
                          f"allowed: fewer than the {len(train_x)} training examples of {spec.name}")
    if batch_size is not None and batch_size > n_train:
        raise ConfigError("train.batch_size", batch_size,
                          f"allowed: at most the {n_train} training examples left after validation")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, val = order[:n_train], order[n_train:]
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return Data(
        source.info, to(train_x[train]), to(train_y[train]), to(train_x[val]), to(train_y[val]),
        to(test_x), to(test_y), source.augment if spec.augment else None,
    )


def _standardise(train: torch.Tensor, test: torch.Tensor):
    mean, std = train.mean(), train.std()
    return (train - mean) / std, (test - mean) / std


# ---------------------------------------------------------------- bundled / generated


def _read_digits(spec):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = order[:360], order[360:]  # 1437 train / 360 test, fixed
    train_x, test_x = _standardise(x[train], x[test])
    return train_x, y[train], test_x, y[test]


DATASETS.register("digits")(Source(INFOS["digits"], _read_digits, validation=237))


def _read_mnist1d(spec):
    import random

    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    # generated locally from the package's fixed seed; make_dataset reseeds Python's and
    # NumPy's global RNGs, so the caller's states are put back afterwards
    states = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    x, x_test = (torch.tensor(d[k], dtype=torch.float32) for k in ("x", "x_test"))
    y, y_test = (torch.tensor(d[k], dtype=torch.int64) for k in ("y", "y_test"))
    x, x_test = _standardise(x, x_test)
    return x, y, x_test, y_test


DATASETS.register("mnist1d")(Source(INFOS["mnist1d"], _read_mnist1d, validation=500))


def _read_synthetic(spec):
    """Ten Gaussian classes of 1x28x28 'images' around fixed random means: quick, learnable."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    means = torch.randn(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (3000,), generator=g)
    x = means[y] + 2.0 * torch.randn(3000, 1, 28, 28, generator=g)
    return x[:2500], y[:2500], x[2500:], y[2500:]


DATASETS.register("synthetic")(Source(INFOS["synthetic"], _read_synthetic, validation=500))


# ---------------------------------------------------------------- torchvision


def data_root(spec) -> tuple[Path, bool]:
    """(root, download?): a given data_dir is used as is; else the node-local cache."""
    if spec.data_dir:
        return Path(spec.data_dir).expanduser(), False
    cache = os.environ.get("LTH_DATA_DIR") or Path.home() / ".cache" / "lth" / "data"
    return Path(cache).expanduser(), True


def _open(cls, spec, train: bool):
    root, download = data_root(spec)
    if download:
        return _download(cls, root, train)
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError as e:  # torchvision's "Dataset not found"
        raise ConfigError("dataset.data_dir", str(root),
                          f"it must hold a torchvision {cls.__name__} root ({e})") from None


def _download(cls, root: Path, train: bool):
    """torchvision's dataset in the node cache, downloaded there if missing. A failed
    download (no network) is one ConfigError on dataset.data_dir, and the folders it made
    are removed again: torchvision prints each file it fetches (kept back here), raises an
    error of a line per mirror tried (its last reason goes in ours) and leaves its empty
    folders behind."""
    import contextlib
    import io

    from filelock import FileLock

    made = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f".{cls.__name__}.lock"
    said = io.StringIO()
    try:
        with FileLock(str(lock)):  # one download per node
            with contextlib.redirect_stdout(said):
                return cls(str(root), train=train, download=True)
    except (RuntimeError, OSError) as e:
        # torchvision's error is a line per mirror tried ("Tried URL, got:", then the reason)
        reasons = [line.strip() for line in str(e).splitlines()
                   if line.strip() and not line.startswith(("Tried ", "Error downloading"))]
        for folder in (root / cls.__name__ / "raw", root / cls.__name__):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: another process's files stay
        if made:  # the cache is new: nothing of anyone else's is in it
            with contextlib.suppress(OSError):
                lock.unlink()
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        reason = (reasons[-1] if reasons else str(e).strip().splitlines()[0] if str(e).strip()
                  else type(e).__name__)[:200]
        raise ConfigError("dataset.data_dir", None,
                          f"a folder holding {cls.__name__} (none given, and downloading it into {root} "
                          f"failed: {reason}; give dataset.data_dir or set LTH_DATA_DIR)") from None


def _mnist_like(cls_name: str, mean: float, std: float):
    def read(spec):
        norm = lambda images: ((images.float() / 255.0 - mean) / std).unsqueeze(1)  # noqa: E731
        fast = _read_mnist_raw(spec, cls_name)
        if fast is not None:
            tr_x, tr_y, te_x, te_y = fast
            return norm(tr_x), tr_y.long(), norm(te_x), te_y.long()
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        tr, te = _open(cls, spec, True), _open(cls, spec, False)
        return norm(tr.data), tr.targets.long(), norm(te.data), te.targets.long()

    return read


# The fast paths below read the files torchvision would read, into the same tensors, without
# importing torchvision (most of loading a small dataset: README, "Speed"). Whatever they do not cover
# (nothing there yet: download; torchvision's legacy processed/*.pt files) goes through
# torchvision as before, with its errors.

_IDX_FILES = tuple(f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An uncompressed IDX file of unsigned bytes (MNIST's format) as a uint8 tensor."""
    raw = bytearray(Path(path).read_bytes())
    if len(raw) < 4 + 4 * ndim or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise ConfigError("dataset.data_dir", str(path), f"it must be an IDX file of {ndim}-d unsigned bytes")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    if len(raw) - header != math.prod(dims):
        raise ConfigError("dataset.data_dir", str(path), f"its size does not match its header {dims}")
    return torch.frombuffer(raw, dtype=torch.uint8, offset=header).view(*dims)


def _read_mnist_raw(spec, folder: str):
    """(train images, train labels, test images, test labels) as uint8 tensors from
    ROOT/<folder>/raw/, as torchvision's MNIST/FashionMNIST read them; None when torchvision
    must handle the root (files missing, or legacy processed/ files, which it prefers)."""
    root, download = data_root(spec)
    base = root / folder
    if download:  # the node cache: what is there was written under the lock; take it too
        if not all((base / "raw" / f).is_file() for f in _IDX_FILES):
            return None
        from filelock import FileLock

        with FileLock(str(root / f".{folder}.lock")):
            return _read_mnist_files(base)
    return _read_mnist_files(base)


def _read_mnist_files(base: Path):
    if (base / "processed").exists() or not all((base / "raw" / f).is_file() for f in _IDX_FILES):
        return None
    tensors = [read_idx(base / "raw" / f, 3 if "images" in f else 1) for f in _IDX_FILES]
    for images, labels in (tensors[:2], tensors[2:]):
        if len(images) != len(labels):
            raise ConfigError("dataset.data_dir", str(base), f"{len(images)} images but {len(labels)} labels")
    return tensors


DATASETS.register("mnist")(
    Source(INFOS["mnist"], _mnist_like("MNIST", 0.1307, 0.3081), validation=5000)
)
DATASETS.register("fashion_mnist")(
    Source(INFOS["fashion_mnist"], _mnist_like("FashionMNIST", 0.2860, 0.3530), validation=5000)
)

_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def _cifar_class():
    import torchvision.datasets as tvd

    class CIFAR10(tvd.CIFAR10):
        """torchvision's reader; a given root's files are trusted if present (they may be a
        subset or a re-pack), a download is still checked against torchvision's md5s."""

        meta = {**tvd.CIFAR10.meta, "md5": None}  # batches.meta: present is enough, too

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    return CIFAR10


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


def _read_cifar10(spec):
    # HWC uint8 as torchvision holds it, permuted back: the same values and the same strides
    norm = lambda hwc: (torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 255 - _CIFAR_MEAN) / _CIFAR_STD  # noqa: E731
    folder = Path(spec.data_dir).expanduser() / "cifar-10-batches-py" if spec.data_dir else None
    if folder is not None and all((folder / f).is_file() for f in (*_CIFAR_TRAIN, *_CIFAR_TEST, "batches.meta")):
        (tr_x, tr_y), (te_x, te_y) = _read_cifar_batches(folder, _CIFAR_TRAIN), _read_cifar_batches(folder, _CIFAR_TEST)
        return norm(tr_x), tr_y, norm(te_x), te_y
    # the node cache keeps torchvision's download and md5 checks; missing files are its errors
    import torchvision.datasets as tvd

    cls = _cifar_class() if spec.data_dir else tvd.CIFAR10
    tr, te = _open(cls, spec, True), _open(cls, spec, False)
    labels = lambda d: torch.tensor(d.targets, dtype=torch.int64)  # noqa: E731  (re-packs may hold uint8)
    return norm(tr.data), labels(tr), norm(te.data), labels(te)


def _read_cifar_batches(folder: Path, names) -> tuple:
    """(HWC uint8 images, int64 labels) of CIFAR-10's python batches, as torchvision reads them."""
    import pickle

    import numpy as np

    data, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # the dataset's own format, as torchvision
        data.append(entry["data"])
        labels.append(np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"]).astype(np.int64))
    hwc = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
    return hwc, torch.from_numpy(np.concatenate(labels))


def crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding `pad` pixels) and horizontal flip, one draw per example."""
    n, _, h, w = x.shape
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=g).to(x.device)
    flips = (torch.rand(n, generator=g) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (shifts[0].view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = shifts[1].view(n, 1) + torch.arange(w, device=x.device)
    cols = torch.where(flips.view(n, 1), cols.flip(1), cols).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chans = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, chans, rows, cols]


DATASETS.register("cifar10")(
    Source(INFOS["cifar10"], _read_cifar10, validation=5000, augment=crop_flip)
)
