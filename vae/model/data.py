"""Datasets as whole tensors, and per-rank shards of them.

MNIST is read once into one float tensor (no per-item PIL/ToTensor in the hot
loop): parsed straight from torchvision's raw files when they are there (torchvision
itself, a second's import, only downloads them); the 2-D Gaussian toy is
generated from a seed. Batches are index slices of these tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vae.model import streams
from vae.model.sources import (BINARIZED_TEST_SEED, GAUSSIAN_COV, GAUSSIAN_MEAN, GAUSSIAN_TEST, GAUSSIAN_TRAIN,
                               download_mnist, mnist_present, read_mnist_files)


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
    """`read_mnist_files`' checks (one-line `DataError`s naming the file); returns each file's values, a uint8
    view of its one read."""
    return {name: torch.frombuffer(blob, dtype=torch.uint8, offset=offset).reshape(shape)
            for name, (blob, shape, offset) in read_mnist_files(root).items()}


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
    # the Cholesky factor, as torch.distributions.MultivariateNormal takes it (whose shape checks import sympy,
    # half a CPU-second in every process that loads the toy); it refuses a covariance that is not positive definite
    scale_tril = torch.linalg.cholesky(cov)
    gen = streams.toy_data(seed)
    eps = torch.randn(GAUSSIAN_TRAIN + GAUSSIAN_TEST, 2, generator=gen)
    x = mean + eps @ scale_tril.T
    n_train = subset or GAUSSIAN_TRAIN
    zeros = torch.zeros(len(x), dtype=torch.int64)
    return Data(Split(x[:n_train], zeros[:n_train]),
                Split(x[GAUSSIAN_TRAIN:], zeros[GAUSSIAN_TRAIN:]), None)


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
