"""The negative ELBO, one function per term. Pure functions on tensors.

Shapes: x [B, D]; mu, logvar [B, L]; eps and z [S, B, L] for S Monte Carlo
samples; per-sample terms are summed over features (D) or latents (L).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, broadcast over the leading sample axis of eps."""
    return mu + torch.exp(0.5 * logvar) * eps


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per example and latent dimension: [B, L]."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(x | sigmoid(logits)) summed over features: [..., B].

    x may be a [0, 1] intensity (the pytorch/examples VAE reads pixels as probabilities).
    """
    return F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-log N(x | mean, exp(logvar)) summed over features: [..., B]."""
    return 0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar)).sum(-1)


def shared_variance_nll(squared_error: torch.Tensor, logvar: torch.Tensor, dims: int) -> torch.Tensor:
    """-log N(x | mean, exp(logvar) I) from sum_d (x_d - mean_d)^2, for a variance shared by all `dims` features:
    `gaussian_nll` with logvar the same for every feature, in three passes over x instead of seven."""
    return 0.5 * (dims * (LOG_2PI + logvar) + squared_error * torch.exp(-logvar))


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z | mu, exp(logvar)) summed over the last axis."""
    return -gaussian_nll(z, mu, logvar)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z | 0, I) summed over the last axis."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def kl_weight(beta: float, epochs_done: float, warmup_epochs: float) -> float:
    """Linear KL warm-up: 0 at the start, beta from `warmup_epochs` on."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, max(0.0, epochs_done) / warmup_epochs)


def cyclical_kl_weight(beta: float, epochs_done: float, budget: float, cycles: int = 4, ratio: float = 0.5) -> float:
    """Cyclical KL annealing (Fu et al. 2019): the budget split into `cycles` equal cycles; in each, the weight
    rises linearly from 0 to beta over the first `ratio` of the cycle, then holds at beta."""
    period = budget / cycles
    done = max(0.0, epochs_done)
    within = (done % period) / period
    if within == 0 and done > 0:  # the end of a cycle (as an epoch's row reports it) is at beta, not back at 0
        within = 1.0
    return beta * min(1.0, within / ratio)


def free_bits_kl(kl_dims: torch.Tensor, free_bits: float | torch.Tensor) -> torch.Tensor:
    """Total KL for the objective with a per-dimension floor (Kingma et al. 2016).

    kl_dims: [..., B, L]. The floor applies to each dimension's batch-mean KL, so a
    dimension below `free_bits` nats gets no push towards the prior. Returns
    the per-example total [..., B] whose batch mean equals sum_j max(mean_b kl_bj, lambda).
    A pack (vae/training/pack.py) passes one floor per member as a tensor [K, 1, 1]; a floor <= 0 is no floor.
    """
    if not torch.is_tensor(free_bits):
        if free_bits <= 0:
            return kl_dims.sum(-1)
        free_bits = torch.tensor(free_bits, dtype=kl_dims.dtype, device=kl_dims.device)
    floor = torch.where(free_bits > 0, free_bits, -math.inf)
    mean_dims = kl_dims.mean(-2, keepdim=True)
    floored = torch.maximum(mean_dims, floor)
    # Per example: its own KL where the floor is inactive, the constant floor share where it is.
    per_example = torch.where(mean_dims >= floor, kl_dims, floored.detach().expand_as(kl_dims))
    return per_example.sum(-1)


def log_importance_weights(recon_nll: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                           weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """log w_s = log p(x|z_s) + weight * (log p(z_s) - log q(z_s|x)) for z_s ~ q(z|x): [S, ..., B].

    recon_nll [S, ..., B]; z [S, ..., B, L]; mu, logvar [..., B, L]; weight a number or [..., 1] (a pack's KL
    weights). At weight 1 the importance weights of p(x, z) / q(z|x) (Burda et al. 2015)."""
    return -recon_nll + weight * (log_standard_normal(z) - log_normal_diag(z, mu, logvar))


def negative_iwae(log_w: torch.Tensor) -> torch.Tensor:
    """-log (1/S) sum_s w_s over the leading sample axis: the IWAE bound per example [..., B] (Burda et al.
    2015). With S = 1 it is the negative ELBO estimated with that one sample."""
    return -(torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))


def negative_elbo(recon_nll: torch.Tensor, kl_dims: torch.Tensor, weight: float | torch.Tensor,
                  free_bits: float | torch.Tensor = 0.0) -> torch.Tensor:
    """The training objective, averaged over the batch: mean(recon + weight * KL).

    recon_nll [..., B], kl_dims [..., B, L]; a pack's leading member axis is kept ([K]: one objective per
    member, with `weight` [K, 1] and `free_bits` [K, 1, 1])."""
    return (recon_nll + weight * free_bits_kl(kl_dims, free_bits)).mean(-1)
