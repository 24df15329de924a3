"""The VAE models: plain nn.Modules that know nothing of training.

Each model encodes x to (mu, logvar) of a diagonal Gaussian q(z|x) and decodes
z to the parameters of p(x|z): Bernoulli logits (`likelihood = "bernoulli"`)
or a Gaussian's (mean, logvar) (`likelihood = "gaussian"`). `forward` returns
the per-example terms of the ELBO so that DDP sees one forward call.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vae.model import losses


ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}


class VAE(nn.Module):
    likelihood = "gaussian"
    latent_dim: int

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor):
        raise NotImplementedError

    def recon_nll(self, x: torch.Tensor, decoded) -> torch.Tensor:
        """-log p(x|z) summed over features, for every leading axis of z."""
        if self.likelihood == "bernoulli":
            return losses.bernoulli_nll(x, decoded)
        mean, logvar = decoded
        return losses.gaussian_nll(x, mean, logvar)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z]: pixel intensities for Bernoulli, the mean for Gaussian decoders."""
        decoded = self.decode(z)
        return torch.sigmoid(decoded) if self.likelihood == "bernoulli" else decoded[0]

    def decode_sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ p(x|z) for Gaussian decoders (with the learned noise); E[x|z] otherwise."""
        decoded = self.decode(z)
        if self.likelihood == "bernoulli":
            return torch.sigmoid(decoded)
        mean, logvar = decoded
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def forward(self, x: torch.Tensor, eps: torch.Tensor,
                iw_weight: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D], eps [S, B, L] -> (recon NLL averaged over the S samples [B], KL per dim [B, L]).

        With `iw_weight` (the IWAE objective): (the log importance weights [S, B], KL per dim [B, L]), the
        prior and posterior terms weighted by it (losses.log_importance_weights)."""
        mu, logvar = self.encode(x)
        z = losses.reparameterize(mu, logvar, eps)
        recon = self.recon_nll(x, self.decode(z))
        if iw_weight is not None:
            return losses.log_importance_weights(recon, z, mu, logvar, iw_weight), losses.kl_per_dim(mu, logvar)
        return recon.mean(0), losses.kl_per_dim(mu, logvar)


# ------------------------------------------------------------------ the pytorch/examples VAE

@dataclass(frozen=True)
class MLPConfig:
    input_dim: int = 784
    hidden_widths: tuple[int, ...] = (400,)  # the encoder's hidden layers; the decoder mirrors them
    latent_dim: int = 20
    activation: str = "relu"


class MLPVAE(VAE):
    """An MLP VAE with a Bernoulli decoder. The default is the pytorch/examples VAE (784-400-(mu, logvar)
    encoder, 400-784 decoder, ReLU); `hidden_widths` (200, 200) and tanh is Burda et al. (2015)'s model."""

    likelihood = "bernoulli"

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.latent_dim = cfg.latent_dim
        self.act = ACTIVATIONS[cfg.activation]
        widths = list(cfg.hidden_widths)
        self.enc = nn.ModuleList(nn.Linear(a, b) for a, b in zip([cfg.input_dim] + widths[:-1], widths))
        self.fc_mu = nn.Linear(widths[-1], cfg.latent_dim)
        self.fc_logvar = nn.Linear(widths[-1], cfg.latent_dim)
        back = widths[::-1]
        self.dec = nn.ModuleList(nn.Linear(a, b) for a, b in zip([cfg.latent_dim] + back[:-1], back))
        self.fc_out = nn.Linear(back[-1], cfg.input_dim)

    def encode(self, x):
        h = x
        for layer in self.enc:
            h = self.act(layer(h))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z):
        h = z
        for layer in self.dec:
            h = self.act(layer(h))
        return self.fc_out(h)


# ------------------------------------------------------------------ the 2-D Gaussian toy's VAE

class GaussianMLP(nn.Module):
    """The 2-D Gaussian toy's building block: Linear + tanh, then one Linear giving (mean, logvar)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.hidden = nn.Linear(input_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, 2 * output_dim)

    def forward(self, x):
        mean, logvar = self.out(torch.tanh(self.hidden(x))).chunk(2, dim=-1)
        return mean, logvar


@dataclass(frozen=True)
class GaussianMLPConfig:
    input_dim: int = 2
    hidden_dim: int = 400
    latent_dim: int = 2
    decoder_var: float | None = None  # None: learned by the decoder


class GaussianMLPVAE(VAE):
    """The 2-D Gaussian toy's VAE: GaussianMLP encoder and decoder; the decoder's output variance is learned."""

    def __init__(self, cfg: GaussianMLPConfig):
        super().__init__()
        self.latent_dim = cfg.latent_dim
        self.encoder = GaussianMLP(cfg.input_dim, cfg.hidden_dim, cfg.latent_dim)
        self.decoder = GaussianMLP(cfg.latent_dim, cfg.hidden_dim, cfg.input_dim)
        # a buffer (not saved: the config says it), so that packs (vae/train/pack.py) stack it; None: learned
        self.register_buffer("fixed_logvar", None if cfg.decoder_var is None
                             else torch.tensor(math.log(cfg.decoder_var)), persistent=False)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        mean, logvar = self.decoder(z)
        if self.fixed_logvar is not None:
            logvar = self.fixed_logvar.expand_as(mean)
        return mean, logvar


# ------------------------------------------------------------------ linear

@dataclass(frozen=True)
class LinearConfig:
    input_dim: int = 2
    latent_dim: int = 2
    decoder_var: float | None = 1.0  # None: one learned observation variance


class LinearVAE(VAE):
    """Linear encoder (x-independent diagonal variance) and linear Gaussian decoder.

    The model of Lucas et al. (2019), "Don't Blame the ELBO": with observation
    variance sigma^2 and KL weight beta, latent direction i collapses exactly
    when the data covariance eigenvalue lambda_i <= beta * sigma^2.
    """

    def __init__(self, cfg: LinearConfig):
        super().__init__()
        self.latent_dim = cfg.latent_dim
        self.enc = nn.Linear(cfg.input_dim, cfg.latent_dim)
        self.enc_logvar = nn.Parameter(torch.zeros(cfg.latent_dim))
        self.dec = nn.Linear(cfg.latent_dim, cfg.input_dim)
        if cfg.decoder_var is None:
            self.dec_logvar = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("dec_logvar", torch.tensor(math.log(cfg.decoder_var)))

    def encode(self, x):
        mu = self.enc(x)
        return mu, self.enc_logvar.expand_as(mu)

    def decode(self, z):
        mean = self.dec(z)
        return mean, self.dec_logvar.expand_as(mean)


# ------------------------------------------------------------------ registry

REGISTRY = {
    "mlp": (MLPVAE, MLPConfig),
    "gaussian-mlp": (GaussianMLPVAE, GaussianMLPConfig),
    "linear": (LinearVAE, LinearConfig),
}


def model_for(cfg, input_dim: int) -> VAE:
    """The model a run config (a `TrainConfig`) describes, for data of `input_dim` features."""
    return build_model(cfg.model, input_dim, cfg.latent_dim, cfg.hidden_dim, cfg.fixed_decoder_var, cfg.widths,
                       cfg.activation)


def build_model(name: str, input_dim: int, latent_dim: int, hidden_dim: int,
                decoder_var: float | None, hidden_widths: tuple[int, ...] = (), activation: str = "relu") -> VAE:
    """The model `name` with the settings its config type has (others are ignored)."""
    cls, cfg_cls = REGISTRY[name]
    offered = {"input_dim": input_dim, "latent_dim": latent_dim, "hidden_dim": hidden_dim,
               "decoder_var": decoder_var, "hidden_widths": tuple(hidden_widths) or (hidden_dim,),
               "activation": activation}
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    return cls(cfg_cls(**{k: v for k, v in offered.items() if k in fields}))
