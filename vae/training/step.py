"""One optimiser step of a pack on its objective: the negative ELBO (recon + beta * KL, free bits) or the
negative IWAE bound (Burda et al. 2015)."""

from __future__ import annotations

from typing import Any

import torch

from vae.model import losses


def train_step(model: torch.nn.Module, opt, xb: torch.Tensor, eps: torch.Tensor, weight: float | torch.Tensor,
               free_bits: float | torch.Tensor, iwae: bool = False, **parts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the negative ELBO (or, `iwae`, the negative IWAE bound over eps's S samples);
    returns the batch's (recon NLL [B], KL per dim [B, L]); for the IWAE, recon is the bound less the KL.

    A pack: x [K, B, D] (or [B, D] shared), eps [S, K, B, L]; the members' objectives are summed. Their
    gradients stay separable, and `PackAdam` leaves a frozen member's weights alone, so nothing is masked.
    `parts`: which parts step, for a split optimiser (pack_adam.EncoderDecoderAdam: encoder_for, decoder)."""
    if iwae:
        log_w, kl_dims = model(xb, eps, weight)
        bound = losses.negative_iwae(log_w)  # [..., B]
        loss = bound.mean(-1).sum()
        recon = bound.detach() - kl_dims.detach().sum(-1)
    else:
        recon, kl_dims = model(xb, eps)
        loss = losses.negative_elbo(recon, kl_dims, weight, free_bits).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step(**parts)
    return recon, kl_dims
