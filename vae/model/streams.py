"""Every random stream of a run, named in one place.

Each stream is a `torch.Generator` seeded from the run's seed (and, for per-epoch streams, the epoch and
rank), so a resumed or retried run replays exactly the batches and the noise it would have drawn, and
two streams never share a seed. The numbers are kept as the project first chose them, so results stay
comparable across versions.
"""

from __future__ import annotations

import torch

_PRIME = 1_000_003
_MOD = 2**63 - 1


def _mixed(seed: int, *salt: int) -> int:
    value = seed
    for s in salt:
        value = (value * _PRIME + s) % _MOD
    return value


def _gen(value: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(value)


def test_noise(seed: int) -> torch.Generator:
    """The fixed test-set noise eps (the same every epoch, so test losses compare across epochs)."""
    return _gen(_mixed(seed, 1))


def mi_noise(seed: int) -> torch.Generator:
    """The one z per test point of the mutual-information estimate."""
    return _gen(_mixed(seed, 2))


def train_noise(seed: int, epoch: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """One epoch's reparameterisation noise on one rank."""
    return _gen(_mixed(seed, 3, epoch, rank), device)


def iw_noise(seed: int) -> torch.Generator:
    """The importance samples of the final IW NLL bound."""
    return _gen(_mixed(seed, 4))


def shuffle(seed: int, epoch: int) -> torch.Generator:
    """One epoch's data order, shared by every rank (each takes its own slice)."""
    return _gen(seed * _PRIME + epoch)


def binarization(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """One epoch's binarization of the training images (binarized-mnist): the same on every rank."""
    return _gen(_mixed(seed, 5, epoch), device)


def test_binarization(seed: int) -> torch.Generator:
    """The one binarization of binarized-mnist's test set."""
    return _gen(_mixed(seed, 6))


def aggressive_batches(seed: int, epoch: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random batches (and their noise) of aggressive training's encoder-only steps before one step."""
    return _gen(_mixed(seed, 7, epoch, step, rank), device)


def toy_data(seed: int) -> torch.Generator:
    """The 2-D Gaussian toy's points."""
    return _gen(10_007 + seed)


def snapshot_prior(seed: int) -> torch.Generator:
    """The prior draws decoded for figures (the same at every snapshot epoch)."""
    return _gen(seed + 77)


def snapshot_noise(seed: int) -> torch.Generator:
    """The decoder noise of the 2-D toy's generated samples."""
    return _gen(seed + 78)
