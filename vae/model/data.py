"""Datasets as whole tensors, and per-rank shards of them.

MNIST is read once into one float tensor (no per-item PIL/ToTensor in the hot
loop): parsed straight from torchvision's raw files when they are there (torchvision
itself, a second's import, only downloads them); the 2-D Gaussian toy is
generated from a seed. Batches are index slices of these tensors.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vae.model import streams
from vae.config import DATA_DIR_ENV, OFFLINE_ENV, offline

GAUSSIAN_MEAN = (1.0, 0.5)
GAUSSIAN_COV = ((1.0, 0.5), (0.5, 1.0))
GAUSSIAN_TRAIN, GAUSSIAN_TEST = 10_000, 2_000
INPUT_DIM = {"mnist": 784, "binarized-mnist": 784, "gaussian2d": len(GAUSSIAN_MEAN)}  # features of one example
TEST_SIZE = {"mnist": 10_000, "binarized-mnist": 10_000, "gaussian2d": GAUSSIAN_TEST}  # examples in the test split
# binarized-mnist's test set is binarized once, with this seed, for every run (streams.test_binarization)
BINARIZED_TEST_SEED = 0
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_SIZES = dict(zip(MNIST_FILES, (47_040_016, 60_008, 7_840_016, 10_008)))
# The raw files' digests (the same bytes every mirror serves); a folder's own MNIST/MD5SUMS, if any, wins.
MNIST_MD5 = dict(zip(MNIST_FILES, ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
                                   "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637")))


class DataError(RuntimeError):
    """Data that cannot be had; the message names the folder or file."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # [N, D] float32
    y: torch.Tensor  # [N] int64 labels (0 where the data has none)

    def __len__(self) -> int:
        return self.x.shape[0]



@dataclass(frozen=True)
class Data:
    train: Split
    test: Split
    image_shape: tuple[int, ...] | None  # (28, 28) for images, None for points
    dynamic: bool = False  # train.x holds probabilities, binarized afresh every epoch (`binarize`)


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each value 1 with probability x (dynamic binarization of grey MNIST, as the literature trains on it):
    uint8 of 0 and 1, shaped as x. The generator's device is where the draws are made."""
    return (torch.rand(x.shape, generator=generator, device=generator.device) < x.to(generator.device)).to(torch.uint8)


def binarized_mnist(root: str, subset: int = 0) -> Data:
    """MNIST for the Bernoulli likelihood: training images as intensities that the loop binarizes every epoch
    (seeded by run seed and epoch: vae.model.streams.binarization), the test set binarized once
    (BINARIZED_TEST_SEED), the same for every run."""
    grey = load_mnist(root, subset)
    test = binarize(grey.test.x, streams.test_binarization(BINARIZED_TEST_SEED)).to(torch.float32)
    return Data(grey.train, Split(test, grey.test.y), grey.image_shape, dynamic=True)


def check_mnist_files(root: str) -> dict[str, torch.Tensor]:
    """Refuse missing, truncated or corrupted MNIST files, naming the file; returns their values.

    Sizes, IDX headers and MD5 digests are checked (the digests in `MNIST/MD5SUMS` when the folder has
    one, else the known ones).
    Each file is read once, and its values are a uint8 view of that read. Nothing is repaired or
    downloaded here.
    """
    raw = Path(root) / "MNIST" / "raw"
    sums_file = Path(root) / "MNIST" / "MD5SUMS"
    expected = dict(MNIST_MD5)
    source = "the known MNIST digests"
    if sums_file.is_file():
        source = str(sums_file)
        for line in sums_file.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                expected[parts[1]] = parts[0]
    values: dict[str, torch.Tensor] = {}
    for name in MNIST_FILES:
        path = raw / name
        if not path.is_file():
            raise DataError(f"MNIST file missing: {path}")
        size = path.stat().st_size
        if size != MNIST_SIZES[name]:
            raise DataError(f"MNIST file {path} has {size} bytes, expected {MNIST_SIZES[name]} "
                            "(truncated or corrupted; replace it, it is not repaired here)")
        blob = bytearray(size)  # writable, so torch.frombuffer can view it without a copy
        with open(path, "rb") as f:
            f.readinto(blob)
        values[name] = _parse_idx(blob, path)
        want = expected.get(name, "")
        if want:
            got = hashlib.md5(blob).hexdigest()
            if got != want:
                raise DataError(f"MNIST file {path} has MD5 {got}, expected {want} from {source} "
                                "(corrupted; replace it, it is not repaired here)")
    return values


def _parse_idx(blob: bytearray, path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (magic 0x0000080N, N big-endian int32 sizes, then the values)."""
    magic = int.from_bytes(blob[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise DataError(f"MNIST file {path} is not an IDX file of bytes (magic {magic:#x})")
    shape = [int.from_bytes(blob[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(blob) - offset != math.prod(shape):
        raise DataError(f"MNIST file {path} holds {len(blob) - offset} values, its header says {shape}")
    return torch.frombuffer(blob, dtype=torch.uint8, offset=offset).reshape(shape)


def mnist_present(root: str) -> bool:
    """Some of MNIST's raw files are in `root` (whether whole is `check_mnist_files`'s question)."""
    raw = Path(root) / "MNIST" / "raw"
    return any((raw / f).exists() for f in MNIST_FILES)


def download_mnist(root: str) -> None:
    """Fetch MNIST into `root` with torchvision, unless $VAE_OFFLINE forbids the network; one-line errors."""
    raw = Path(root) / "MNIST" / "raw"
    if offline():
        raise DataError(f"MNIST is not in {raw} and {OFFLINE_ENV}=1 forbids downloading it; point --data-dir "
                        f"or {DATA_DIR_ENV} at a folder that holds it, or unset {OFFLINE_ENV} to download it")
    from torchvision.datasets import MNIST  # only a download needs torchvision (about 1 s to import)

    try:
        MNIST(root, train=True, download=True)
    except Exception as e:  # URLError, HTTPError, RuntimeError from torchvision
        raise DataError(f"MNIST is not in {raw} and could not be downloaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"point --data-dir or {DATA_DIR_ENV} at a folder that holds it") from None


def load_mnist(root: str, subset: int = 0) -> Data:
    """MNIST as [0, 1] intensities, flattened to 784 values (as the pytorch/examples VAE reads it: ToTensor only)."""
    if not mnist_present(root):  # absent: torchvision downloads it
        download_mnist(root)
    files = check_mnist_files(root)

    def split(prefix: str, limit: int) -> Split:
        x, y = files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]
        if limit:
            x, y = x[:limit], y[:limit]
        return Split(x.reshape(len(x), -1).to(torch.float32).div_(255.0), y.to(torch.int64))

    return Data(split("train", subset), split("t10k", 0), (28, 28))


def gaussian2d(seed: int, subset: int = 0) -> Data:
    """The 2-D Gaussian toy's correlated Gaussian: 10,000 training and 2,000 test points."""
    mean = torch.tensor(GAUSSIAN_MEAN)
    cov = torch.tensor(GAUSSIAN_COV)
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)  # checks positive definiteness
    gen = streams.toy_data(seed)
    eps = torch.randn(GAUSSIAN_TRAIN + GAUSSIAN_TEST, 2, generator=gen)
    x = mean + eps @ dist.scale_tril.T
    n_train = subset or GAUSSIAN_TRAIN
    zeros = torch.zeros(len(x), dtype=torch.int64)
    return Data(Split(x[:n_train], zeros[:n_train]),
                Split(x[GAUSSIAN_TRAIN:], zeros[GAUSSIAN_TRAIN:]), None)


def preflight(dataset: str, data_dir: str) -> None:
    """Fail early, naming the file, if the data cannot be had; cheap when MNIST is already there."""
    if dataset in ("mnist", "binarized-mnist"):
        if mnist_present(data_dir):
            check_mnist_files(data_dir)
        else:
            load_mnist(data_dir)  # downloads it (or says why it cannot)


def load(dataset: str, data_dir: str, seed: int, subset: int = 0) -> Data:
    """The dataset's splits, cached per process: a reused Tune trial process reads MNIST once.

    Callers must not modify the tensors in place.
    """
    return _load(dataset, data_dir, seed if dataset == "gaussian2d" else 0, subset)


@functools.lru_cache(maxsize=2)
def _load(dataset: str, data_dir: str, seed: int, subset: int) -> Data:
    if dataset == "mnist":
        return load_mnist(data_dir, subset)
    if dataset == "binarized-mnist":
        return binarized_mnist(data_dir, subset)
    if dataset == "gaussian2d":
        return gaussian2d(seed, subset)
    raise ValueError(f"unknown dataset {dataset!r}")


def shard_indices(n: int, rank: int, world: int, epoch: int, seed: int) -> torch.Tensor:
    """This rank's indices for one epoch, with DistributedSampler's semantics.

    One permutation per (seed, epoch), shared by every rank; padded by wrapping
    so each rank gets the same count; rank r takes positions r, r + world, ...
    """
    gen = streams.shuffle(seed, epoch)
    order = torch.randperm(n, generator=gen)
    per_rank = -(-n // world)
    total = per_rank * world
    if total > n:
        order = torch.cat([order, order[: total - n]])
    return order[rank:total:world]
