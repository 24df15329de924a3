"""The one place where a model's ELBO terms meet their fast implementation.

`vae/model/models.py` and `vae/model/losses.py` hold the plain math and stay the reference. `accelerate(model)` routes,
in place, the parts of a training model that have a hand-written node in `vae/model/kernels.py`, each tested
against the plain formula there (tests/test_kernels.py):

| model                       | part           | fast implementation                                     |
|-----------------------------|----------------|---------------------------------------------------------|
| a Gaussian decoder whose variance is shared by every feature (fixed, or one learned) | `recon_nll` | `kernels.squared_error`: sum_d (x_d - mean_d)^2 in one node |
| the linear VAE, training with one sample of z | `forward` | `kernels.linear_squared_error`: decoder and squared error in one node |
| a Bernoulli decoder in a pack (logits [S, K, B, D]) or evaluated | `recon_nll` | `kernels.bernoulli_nll`: softplus, a sum and a dot (the logits do not fit in cache; BCE makes about nine passes) |

A pack's layers are `kernels.PackedLinear` already (`vae.training.pack.stack_models`); a plain model's layers stay
`nn.Linear`. The loop, a packed member taken out for evaluation and the benchmarks call `accelerate`; a
model a user loads (`vae.load_model`) is the plain one.
"""

from __future__ import annotations

from types import MethodType

import torch

from vae.model import kernels, losses
from vae.model.models import VAE, LinearVAE


def accelerate(model: VAE) -> VAE:
    """`model` with its fast implementations installed (in place; returned for chaining)."""
    if model.likelihood == "bernoulli":
        model.recon_nll = MethodType(_bernoulli_nll, model)
    else:
        model.recon_nll = MethodType(_gaussian_nll, model)
    if isinstance(model, LinearVAE):
        model.forward = MethodType(_linear_forward, model)
    return model


def is_packed(model: torch.nn.Module) -> bool:
    return any(isinstance(m, kernels.PackedLinear) for m in model.modules())


def _bernoulli_nll(model: VAE, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The softplus node for a pack's logits [S, K, B, D] (out of cache) and wherever nothing is differentiated
    (evaluation, the IW NLL: half the time of BCE's passes); BCE-with-logits while a model alone trains."""
    if (logits.dim() >= 4 or not torch.is_grad_enabled()) and not x.requires_grad:
        return kernels.bernoulli_nll(x, logits)
    return losses.bernoulli_nll(x, logits)


def _gaussian_nll(model: VAE, x: torch.Tensor, decoded: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A variance shared by every feature (logvar expanded along them) is used unexpanded."""
    mean, logvar = decoded
    if logvar.dim() and logvar.stride(-1) == 0:
        return losses.shared_variance_nll(kernels.squared_error(x, mean), logvar[..., 0], x.shape[-1])
    return losses.gaussian_nll(x, mean, logvar)


def _linear_forward(model: LinearVAE, x: torch.Tensor, eps: torch.Tensor,
                    iw_weight: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE.forward; while training the ELBO with one sample of z, the squared error comes from one node with
    the decoder, which never forms the mean."""
    if iw_weight is not None or eps.shape[0] != 1 or x.requires_grad or not torch.is_grad_enabled():
        return VAE.forward(model, x, eps, iw_weight)
    mu, logvar = model.encode(x)
    z = losses.reparameterize(mu, logvar, eps)
    se = kernels.linear_squared_error(x, z, model.dec.weight, model.dec.bias)  # [1, B] or [1, K, B]
    recon = losses.shared_variance_nll(se, model.dec_logvar.expand(*se.shape, 1)[..., 0], x.shape[-1])
    return recon.mean(0), losses.kl_per_dim(mu, logvar)
