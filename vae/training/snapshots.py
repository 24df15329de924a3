"""What the figures need from a model, taken at chosen epochs as table rows.

Reconstructions, prior samples and interpolation paths for images; generated
points (decoded means and noisy samples) for the 2-D toy; test-set encoder
means for latent maps. The inputs and the noise are fixed per trial, so the
same test images and the same prior draws appear at every epoch.
"""

from __future__ import annotations

from typing import Any

import torch

from vae.model import streams
from vae.model.data import Data

N_ORIGINALS = 16
N_PRIOR = 64
N_PAIRS = 4
N_STEPS = 10
N_GRID = 12
N_POINTS = 2000
N_LATENTS = 2000


def snapshot_epochs(total: int) -> set[int]:
    """0, 1, 2, 4, 8, ... and the last epoch: spread over training, few of them."""
    epochs, k = {0, total}, 1
    while k < total:
        epochs.add(k)
        k *= 2
    return epochs


def _rows(trial_id: str, epoch: int, kind: str, values: torch.Tensor, pair: int = -1) -> list[dict[str, Any]]:
    # rows of numpy arrays (pyarrow takes them as lists as they are): no Python float per value
    return [{"trial_id": trial_id, "epoch": epoch, "kind": kind, "index": i, "pair": pair, "values": v}
            for i, v in enumerate(values.float().cpu().numpy())]


@torch.no_grad()
def image_rows(model, data: Data, trial_id: str, epoch: int, seed: int) -> list[dict[str, Any]]:
    device = next(model.parameters()).device
    gen = streams.snapshot_prior(seed)
    noise = streams.snapshot_noise(seed) if device.type == "cpu" else None  # the decoder's own draws
    rows: list[dict[str, Any]] = []
    if data.image_shape is None:  # 2-D toy: true test points once, generated points every time
        if epoch == 0:
            rows += _rows(trial_id, epoch, "original", data.test.x[:N_POINTS])
        z = torch.randn(N_POINTS, model.latent_dim, generator=gen).to(device)
        rows += _rows(trial_id, epoch, "generated", model.decode_mean(z))
        rows += _rows(trial_id, epoch, "generated_noisy", model.decode_sample(z, noise))
        return rows
    x = data.test.x[:N_ORIGINALS].to(device)
    mu, _ = model.encode(x)
    rows += _rows(trial_id, epoch, "original", x)
    t = torch.linspace(0, 1, N_STEPS, device=device)[:, None]
    prior = torch.randn(N_PRIOR, model.latent_dim, generator=gen).to(device)
    codes = [("reconstruction", -1, mu), ("prior_sample", -1, prior)]
    codes += [("interpolation", pair, (1 - t) * mu[2 * pair] + t * mu[2 * pair + 1])  # a line between two test codes
              for pair in range(N_PAIRS)]
    if model.latent_dim == 2:  # the decoded manifold over a grid of z (the pytorch/examples VAE's latent map)
        axis = torch.linspace(-2.5, 2.5, N_GRID, device=device)
        grid = torch.stack(torch.meshgrid(axis, axis.flip(0), indexing="xy"), -1).reshape(-1, 2)
        codes.append(("manifold", -1, grid))
    # one decoder call for them all: an autoregressive decoder draws its pixels one at a time, so it walks the
    # image once, not once per kind (its draws from the trial's snapshot noise: the same images every run)
    images = model.decode_mean(torch.cat([z for _, _, z in codes]), noise)
    for (kind, pair, z), part in zip(codes, images.split([len(z) for _, _, z in codes])):
        rows += _rows(trial_id, epoch, kind, part, pair)
    return rows


def latent_rows(mu: torch.Tensor, labels: torch.Tensor, trial_id: str, epoch: int) -> list[dict[str, Any]]:
    n = min(N_LATENTS, len(mu))
    means, labels = mu[:n].float().cpu().numpy(), labels[:n].tolist()
    return [{"trial_id": trial_id, "epoch": epoch, "index": i, "label": labels[i], "mu": means[i]} for i in range(n)]
