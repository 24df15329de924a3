"""Posterior-collapse diagnostics: pure functions of encoder outputs and models.

- KL per latent dimension (test-set mean of the analytic KL),
- active units (Burda et al. 2015): Var_x(E_q[z_j]) > threshold (units in use: vae.tables.collapse),
- mutual information I(x; z) under q (He et al. 2019's estimator),
- the importance-weighted NLL bound (Burda et al. 2015) at the end of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vae.model import losses


@dataclass(frozen=True)
class Evaluation:
    recon: float  # mean per example, nats
    kl: float  # mean per example, nats (unweighted)
    kl_per_dim: torch.Tensor  # [L]
    mu: torch.Tensor  # [N, L]
    logvar: torch.Tensor  # [N, L]

    @property
    def loss(self) -> float:
        """Negative ELBO with beta = 1, the number comparable across runs."""
        return self.recon + self.kl


@torch.no_grad()
def evaluate(model, x: torch.Tensor, eps: torch.Tensor, batch_size: int = 2048) -> Evaluation:
    """Test-set ELBO terms with fixed noise eps [S, N, L] (the same every epoch)."""
    return evaluate_members(model, x, eps, batch_size)[0]


@torch.no_grad()
def evaluate_members(model, x: torch.Tensor, eps: torch.Tensor, batch_size: int = 2048) -> list[Evaluation]:
    """`evaluate` for every member of a pack at once (vae/training/pack.py): x [K, N, D], eps [S, K, N, L]; a plain
    model takes x [N, D], eps [S, N, L] and gives a list of one."""
    recon_sum, kl_dims_sum = 0.0, 0.0
    mus, logvars = [], []
    n = x.shape[-2]
    for start in range(0, n, batch_size):
        xb = x[..., start:start + batch_size, :]
        mu, logvar = model.encode(xb)
        z = losses.reparameterize(mu, logvar, eps[..., start:start + batch_size, :])
        recon_sum = recon_sum + model.recon_nll(xb, model.decode(z, xb)).mean(0).sum(-1)
        kl_dims_sum = kl_dims_sum + losses.kl_per_dim(mu, logvar).sum(-2)
        mus.append(mu)
        logvars.append(logvar)
    recon = (recon_sum / n).reshape(-1).cpu()
    kl_per_dim = (kl_dims_sum / n).cpu().reshape(len(recon), -1)
    mu, logvar = torch.cat(mus, -2).cpu(), torch.cat(logvars, -2).cpu()
    mu, logvar = mu.reshape(len(recon), n, -1), logvar.reshape(len(recon), n, -1)
    return [Evaluation(recon=float(recon[k]), kl=float(kl_per_dim[k].sum()), kl_per_dim=kl_per_dim[k],
                       mu=mu[k], logvar=logvar[k]) for k in range(len(recon))]


def covariance_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the data's covariance (population, in float64), largest first: [D]."""
    x = x.double()
    centred = x - x.mean(0)
    cov = centred.T @ centred / len(x)
    return torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)


def unit_activity(mu: torch.Tensor) -> torch.Tensor:
    """Var over examples of E_q[z_j | x] per dimension: [L]."""
    return mu.var(0, unbiased=False)


def active_units(activity: torch.Tensor, threshold: float) -> int:
    """Number of latent dimensions whose activity (`unit_activity`) exceeds the threshold."""
    return int((activity > threshold).sum())


def mutual_info(mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor, chunk: int = 64) -> float:
    """I(x; z) under q(x, z) = p_data(x) q(z|x), estimated as in He et al. (2019).

    mu, logvar [N, L]; z [N, L] one sample from each q(z|x_n).
    I = E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)], with the aggregate
    posterior q(z) approximated by the mixture (1/N) sum_m q(z|x_m).
    Every log q(z_n | x_m) at once, in float64: the quadratic form expanded into two matrix products,
    sum_l (z_nl - mu_ml)^2 / v_ml = z_n^2 . (1/v_m) - 2 z_n . (mu_m / v_m) + sum_l mu_ml^2 / v_ml.
    """
    n, dims = mu.shape
    mu, logvar, z = mu.double(), logvar.double(), z.double()
    neg_entropy = (-0.5 * dims * math.log(2 * math.pi) - 0.5 * (1 + logvar).sum(-1)).mean()
    inv_var = torch.exp(-logvar)  # [N, L]
    const = dims * math.log(2 * math.pi) + logvar.sum(-1) + (mu.pow(2) * inv_var).sum(-1)  # [N] per m
    # one product: [z^2, -2z] [N, 2L] against [1/v, mu/v] [N, 2L], plus the per-m constant: [N (z_n), N (q_m)],
    # taken `chunk` rows of z at a time so that each block stays in the CPU's cache
    left, right = torch.cat([z.pow(2), -2.0 * z], 1), torch.cat([inv_var, mu * inv_var], 1).T
    log_qz = torch.cat([torch.logsumexp(torch.addmm(const[None, :], left[i:i + chunk], right).mul_(-0.5), dim=1)
                        for i in range(0, n, chunk)]) - math.log(n)
    return float(neg_entropy - log_qz.mean())


@torch.no_grad()
def iw_nll(model, x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
           chunk: int = 100, eps: torch.Tensor | None = None) -> float:
    """-log p(x) bounded with K importance samples, mean over examples (nats).

    log p(x) >= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, accumulated `chunk` samples
    at a time (a running logsumexp), so memory stays that of `chunk` samples whatever K is. `eps` [K, B, L]:
    given noise instead of draws from `generator`.
    """
    mu, logvar = model.encode(x)
    total = torch.full((len(x),), -math.inf, device=x.device)
    done = 0
    while done < num_samples:
        k = min(chunk, num_samples - done)
        noise = (eps[done:done + k].to(x.device) if eps is not None else
                 torch.randn((k, *mu.shape), generator=generator, device="cpu").to(x.device))
        z = losses.reparameterize(mu, logvar, noise)  # [k, B, L]
        log_w = losses.log_importance_weights(model.recon_nll(x, model.decode(z, x)), z, mu, logvar)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        done += k
    return float(-(total - math.log(num_samples)).mean())
