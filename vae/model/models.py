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


def draw_pixel(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli pixel per entry of p ([...], the images' leading shape): 1.0 where a uniform draw falls
    below p. Every autoregressive sampler draws through this, one call a pixel in raster order, so the fast
    samplers draw what `VAE.sample_x` draws from the same generator."""
    return (torch.rand(p.shape, generator=generator, device=p.device) < p).float()


class VAE(nn.Module):
    likelihood = "gaussian"
    latent_dim: int
    autoregressive = False  # the decoder also reads x (teacher forcing): decode(z, x); sampling is sequential

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None):
        """p(x|z)'s parameters; an autoregressive decoder's for each pixel given the pixels of `x` before it."""
        raise NotImplementedError

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters of q(z|x) (aggressive training steps them alone); the rest are the decoder's."""
        raise NotImplementedError(f"{type(self).__name__} does not split encoder and decoder")

    def recon_nll(self, x: torch.Tensor, decoded) -> torch.Tensor:
        """-log p(x|z) summed over features, for every leading axis of z."""
        if self.likelihood == "bernoulli":
            return losses.bernoulli_nll(x, decoded)
        mean, logvar = decoded
        return losses.gaussian_nll(x, mean, logvar)

    def decode_mean(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """E[x|z]: pixel intensities for Bernoulli, the mean for Gaussian decoders. An autoregressive decoder
        samples x pixel by pixel (`sample_x`) and gives each pixel's probability along that path."""
        if self.autoregressive:
            return self.sample_x(z, generator)[1]
        decoded = self.decode(z)
        return torch.sigmoid(decoded) if self.likelihood == "bernoulli" else decoded[0]

    @torch.no_grad()
    def sample_x(self, z: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x ~ p(x|z) pixel by pixel in raster order, for an autoregressive Bernoulli decoder: (x, each pixel's
        probability given the pixels drawn before it), both [..., D]."""
        shape = (*z.shape[:-1], self.input_dim)
        x = torch.zeros(shape, device=z.device)
        probs = torch.zeros(shape, device=z.device)
        for i in range(self.input_dim):
            p = torch.sigmoid(self.decode(z, x)[..., i])
            probs[..., i] = p
            x[..., i] = draw_pixel(p, generator)
        return x, probs

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
        recon = self.recon_nll(x, self.decode(z, x))
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

    def decode(self, z, x=None):
        h = z
        for layer in self.dec:
            h = self.act(layer(h))
        return self.fc_out(h)

    def encoder_parameters(self):
        return [p for name, p in self.named_parameters() if name.split(".")[0] in ("enc", "fc_mu", "fc_logvar")]


# ------------------------------------------------------------------ stronger decoders: autoregressive, PixelCNN

class MaskedLinear(nn.Module):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE, Germain et al. 2015)."""

    def __init__(self, n_in: int, n_out: int, mask: torch.Tensor):
        super().__init__()
        layer = nn.Linear(n_in, n_out)  # nn.Linear's initialisation
        self.weight, self.bias = layer.weight, layer.bias
        self.register_buffer("mask", mask.to(layer.weight.dtype))

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


def made_masks(dims: int, hidden: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of a one-hidden-layer MADE over `dims` pixels in raster order whose output i sees only pixels
    j with i - context <= j < i (all j < i when context >= dims): (input -> hidden [H, D], hidden -> output [D, H]).

    Hidden unit h has degree m_h (spread evenly over 0..D-2) and reads pixels m_h - w + 1 .. m_h, w = ceil(context
    / 2) (all pixels up to m_h when the context is the whole image); output i reads the units with m_h < i whose
    first pixel is within the context, m_h - w + 1 >= i - context: every path from j to i has i - context <= j < i."""
    full = context >= dims
    width = dims if full else (context + 1) // 2
    degree = torch.arange(hidden) * (dims - 1) // hidden  # [H], in 0..D-2
    pixel = torch.arange(dims)
    into = (pixel[None, :] <= degree[:, None]) & (pixel[None, :] > degree[:, None] - width)  # [H, D]
    out = degree[None, :] < pixel[:, None]  # [D, H]
    if not full:
        out &= degree[None, :] - width + 1 >= pixel[:, None] - context
    return into.float(), out.float()


@dataclass(frozen=True)
class AutoregressiveConfig(MLPConfig):
    context: int = 784  # W: each pixel's logit also sees the W pixels before it


MADE_HIDDEN = 128  # the autoregressive decoder's masked hidden layer: at most this wide (its cost, measured)


def context_mask(dims: int, context: int) -> torch.Tensor:
    """[D, D]: 1 where output i reads input j, i - context <= j < i (raster order)."""
    i, j = torch.arange(dims)[:, None], torch.arange(dims)[None, :]
    return ((j < i) & (j >= i - context)).float()


class AutoregressiveMLPVAE(MLPVAE):
    """The MLP VAE whose Bernoulli decoder also reads the previous W pixels of x in raster order:
    logits_i = MLP(z)_i + sum_{i-W <= j < i} A_ij x_j + MADE(x_{i-W}, ..., x_{i-1})_i, built from masked layers
    (Germain et al. 2015) so a training step is one pass: direct connections to every pixel of the context,
    and one masked hidden layer (at most MADE_HIDDEN wide) for interactions within it. W = 0 is MLPVAE exactly
    (no masked layers); W = 784 is fully autoregressive. The decoder's strength is the one number W."""

    autoregressive = True

    def __init__(self, cfg: AutoregressiveConfig):
        super().__init__(cfg)
        self.input_dim, self.context = cfg.input_dim, cfg.context
        self.autoregressive = cfg.context > 0
        if cfg.context > 0:  # after the MLP's layers: their initialisation is MLPVAE's
            hidden = min(cfg.hidden_widths[0], MADE_HIDDEN)
            into, out = made_masks(cfg.input_dim, hidden, cfg.context)
            self.direct = MaskedLinear(cfg.input_dim, cfg.input_dim, context_mask(cfg.input_dim, cfg.context))
            self.made_in = MaskedLinear(cfg.input_dim, hidden, into)
            self.made_out = MaskedLinear(hidden, cfg.input_dim, out)

    def decode(self, z, x=None):
        logits = super().decode(z)
        if self.context > 0:
            if x is None:
                raise ValueError("an autoregressive decoder needs x (the pixels before each one): decode(z, x)")
            logits = logits + self.direct(x) + self.made_out(self.act(self.made_in(x)))
        return logits

    @torch.no_grad()
    def sample_x(self, z: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`VAE.sample_x`, the same draws, in O(D (D + H)) per image rather than a whole decoder pass per pixel:
        MLP(z) once, and each drawn pixel added to the direct logits and the masked hidden layer as it is drawn."""
        if self.context == 0:
            return super().sample_x(z, generator)
        lead = z.shape[:-1]
        base = super().decode(z) + self.direct.bias + self.made_out.bias  # [..., D]
        direct = (self.direct.weight * self.direct.mask).t().contiguous()  # [D in, D out]
        into = (self.made_in.weight * self.made_in.mask).t().contiguous()  # [D in, H]
        out = self.made_out.weight * self.made_out.mask  # [D out, H]
        summed = torch.zeros(*lead, self.input_dim, device=z.device)  # sum_j<i A_ij x_j, for every output i
        hidden = self.made_in.bias.expand(*lead, -1).clone()  # the MADE layer's pre-activation
        x = torch.zeros(*lead, self.input_dim, device=z.device)
        probs = torch.zeros_like(x)
        for i in range(self.input_dim):
            p = torch.sigmoid(base[..., i] + summed[..., i] + self.act(hidden) @ out[i])
            probs[..., i] = p
            xi = draw_pixel(p, generator)
            x[..., i] = xi
            summed += xi[..., None] * direct[i]
            hidden += xi[..., None] * into[i]
        return x, probs


class MaskedConv2d(nn.Conv2d):
    """A PixelCNN convolution (van den Oord et al. 2016): each output pixel sees the pixels above it and those
    to its left (type A: not itself; type B: itself too, for layers after the first)."""

    def __init__(self, kind: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        k = self.kernel_size[0]
        mask = torch.ones_like(self.weight)
        mask[:, :, k // 2, k // 2 + (kind == "B"):] = 0
        mask[:, :, k // 2 + 1:] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


@dataclass(frozen=True)
class PixelCNNConfig(MLPConfig):
    layers: int = 4  # gated masked-convolution layers after the first
    channels: int = 32


class PixelCNNVAE(MLPVAE):
    """The MLP encoder with a small gated PixelCNN decoder conditioned on z (van den Oord et al. 2016; the
    decoder of He et al. 2019): a 7x7 type-A masked convolution, `layers` gated residual 3x3 type-B layers
    (tanh(W_f * h + V_f z) . sigmoid(W_g * h + V_g z)), then 1x1 convolutions to each pixel's logit."""

    autoregressive = True

    def __init__(self, cfg: PixelCNNConfig):
        super().__init__(cfg)
        del self.dec, self.fc_out  # the MLP's decoder is replaced
        self.input_dim, self.side, c = cfg.input_dim, int(round(cfg.input_dim ** 0.5)), cfg.channels
        self.first = MaskedConv2d("A", 1, c, 7, padding=3)
        self.gated = nn.ModuleList(MaskedConv2d("B", c, 2 * c, 3, padding=1) for _ in range(cfg.layers))
        self.cond = nn.ModuleList(nn.Linear(cfg.latent_dim, 2 * c) for _ in range(cfg.layers))
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, 1, 1))

    def decode(self, z, x=None):
        if x is None:
            raise ValueError("a PixelCNN decoder needs x (the pixels before each one): decode(z, x)")
        lead = z.shape[:-1]
        img = x.expand(*lead, self.input_dim).reshape(-1, 1, self.side, self.side)
        zf = z.reshape(-1, z.shape[-1])
        h = self.first(img)
        for conv, cond in zip(self.gated, self.cond):
            f, g = (conv(h) + cond(zf)[:, :, None, None]).chunk(2, 1)
            h = h + torch.tanh(f) * torch.sigmoid(g)
        return self.out(h).reshape(*lead, self.input_dim)

    @torch.no_grad()
    def sample_x(self, z: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`VAE.sample_x`, the same draws, with each pixel's logit computed on the window it can see: pixel (r, c)
        reads rows r - reach .. r and columns c - reach .. c + reach only (the first layer reaches k // 2 pixels,
        each gated layer one more), so the layers run on that window, not on the whole image (their wrong values
        at the window's edges, where the image goes on, do not reach its pixel)."""
        lead, side = z.shape[:-1], self.side
        zf = z.reshape(-1, z.shape[-1])
        conds = [cond(zf)[:, :, None, None] for cond in self.cond]
        reach = self.first.kernel_size[0] // 2 + len(self.gated)
        img = torch.zeros(len(zf), 1, side, side, device=z.device)
        probs = torch.zeros(len(zf), side, side, device=z.device)
        for r in range(side):
            for c in range(side):
                c0 = max(0, c - reach)
                h = self.first(img[:, :, max(0, r - reach):r + 1, c0:c + reach + 1])
                for conv, cz in zip(self.gated, conds):
                    f, g = (conv(h) + cz).chunk(2, 1)
                    h = h + torch.tanh(f) * torch.sigmoid(g)
                p = torch.sigmoid(self.out(h[:, :, -1:, c - c0:c - c0 + 1]).reshape(-1))  # 1x1 layers: its pixel
                probs[:, r, c] = p
                img[:, 0, r, c] = draw_pixel(p.view(lead), generator).reshape(-1)
        return img.reshape(*lead, self.input_dim), probs.reshape(*lead, self.input_dim)


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
        # a buffer (not saved: the config says it), so that packs (vae/training/pack.py) stack it; None: learned
        self.register_buffer("fixed_logvar", None if cfg.decoder_var is None
                             else torch.tensor(math.log(cfg.decoder_var)), persistent=False)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z, x=None):
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

    def decode(self, z, x=None):
        mean = self.dec(z)
        return mean, self.dec_logvar.expand_as(mean)


# ------------------------------------------------------------------ registry

REGISTRY = {
    "mlp": (MLPVAE, MLPConfig),
    "mlp-autoregressive": (AutoregressiveMLPVAE, AutoregressiveConfig),
    "mlp-pixelcnn": (PixelCNNVAE, PixelCNNConfig),
    "gaussian-mlp": (GaussianMLPVAE, GaussianMLPConfig),
    "linear": (LinearVAE, LinearConfig),
}


def model_for(cfg, input_dim: int) -> VAE:
    """The model a run config (a `TrainConfig`) describes, for data of `input_dim` features: its --model with
    its --decoder (factorised, autoregressive with --decoder-context, pixelcnn with --decoder-layers)."""
    name = cfg.model if cfg.decoder == "factorised" else f"{cfg.model}-{cfg.decoder}"
    return build_model(name, input_dim, cfg.latent_dim, cfg.hidden_dim, cfg.fixed_decoder_var, cfg.widths,
                       cfg.activation, context=cfg.decoder_context, layers=cfg.decoder_layers)


def build_model(name: str, input_dim: int, latent_dim: int, hidden_dim: int,
                decoder_var: float | None, hidden_widths: tuple[int, ...] = (), activation: str = "relu",
                context: int = 0, layers: int = 4) -> VAE:
    """The model `name` with the settings its config type has (others are ignored)."""
    cls, cfg_cls = REGISTRY[name]
    offered = {"input_dim": input_dim, "latent_dim": latent_dim, "hidden_dim": hidden_dim,
               "decoder_var": decoder_var, "hidden_widths": tuple(hidden_widths) or (hidden_dim,),
               "activation": activation, "context": context, "layers": layers}
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    return cls(cfg_cls(**{k: v for k, v in offered.items() if k in fields}))
