"""Active units, mutual information and the IW bound on encoders with known answers."""

import math

import pytest
import torch

from vae.model import diagnostics, losses
from vae.model.models import LinearConfig, LinearVAE


def test_active_units_counts_dimensions_whose_mean_varies():
    torch.manual_seed(0)
    x = torch.randn(1000)
    mu = torch.stack([x, 0.5 * x, 0.01 * x, torch.zeros(1000)], dim=1)  # variances 1, 0.25, 1e-4, 0
    assert diagnostics.active_units(diagnostics.unit_activity(mu), 0.01) == 2
    assert diagnostics.active_units(diagnostics.unit_activity(mu), 1e-5) == 3
    torch.testing.assert_close(diagnostics.unit_activity(mu), mu.var(0, unbiased=False))


def test_mutual_information_of_a_gaussian_channel():
    # x ~ N(0, 1), q(z|x) = N(x, s^2): I(x; z) = 0.5 * log(1 + 1 / s^2)
    torch.manual_seed(1)
    n, s = 4000, 0.5
    x = torch.randn(n, 1)
    logvar = torch.full((n, 1), math.log(s**2))
    z = losses.reparameterize(x, logvar, torch.randn(n, 1))
    assert diagnostics.mutual_info(x, logvar, z) == pytest.approx(0.5 * math.log(1 + 1 / s**2), abs=0.05)


def test_mutual_information_of_a_collapsed_encoder_is_zero():
    torch.manual_seed(2)
    mu, logvar = torch.zeros(2000, 3), torch.zeros(2000, 3)
    z = torch.randn(2000, 3)
    # q(z) equals every q(z|x): both terms are the same entropy, up to sampling noise
    assert abs(diagnostics.mutual_info(mu, logvar, z)) < 0.1


def test_iw_bound_approaches_the_exact_likelihood_of_a_linear_gaussian_model():
    # p(z) = N(0, I), p(x|z) = N(Wz + b, sigma^2 I)  =>  p(x) = N(b, W W^T + sigma^2 I), exactly.
    torch.manual_seed(3)
    model = LinearVAE(LinearConfig(input_dim=3, latent_dim=2, decoder_var=0.5))
    x = torch.randn(50, 3)
    w, b = model.dec.weight.detach(), model.dec.bias.detach()
    with torch.no_grad():  # a good proposal: the exact posterior's mean and marginal variances
        post_cov = torch.linalg.inv(torch.eye(2) + w.T @ w / 0.5)
        model.enc.weight.copy_(post_cov @ w.T / 0.5)
        model.enc.bias.copy_(-(post_cov @ w.T @ b) / 0.5)
        model.enc_logvar.copy_(post_cov.diagonal().log())
    exact = -torch.distributions.MultivariateNormal(b, w @ w.T + 0.5 * torch.eye(3)).log_prob(x).mean().item()
    gen = torch.Generator().manual_seed(0)
    bound_1 = diagnostics.iw_nll(model, x, 1, gen)
    bound_k = diagnostics.iw_nll(model, x, 2000, gen)
    assert bound_k >= exact - 0.02
    assert bound_k == pytest.approx(exact, abs=0.05)
    assert bound_1 > bound_k  # more samples: a tighter bound


def test_evaluate_uses_the_given_noise_and_reports_per_example_terms():
    torch.manual_seed(4)
    model = LinearVAE(LinearConfig(input_dim=2, latent_dim=2, decoder_var=1.0))
    x = torch.randn(300, 2)
    eps = torch.randn(3, 300, 2)
    a = diagnostics.evaluate(model, x, eps, batch_size=128)
    b = diagnostics.evaluate(model, x, eps, batch_size=1000)
    assert a.recon == pytest.approx(b.recon, rel=1e-5)
    recon, kl = model(x, eps)
    assert a.recon == pytest.approx(recon.mean().item(), rel=1e-5)
    assert a.kl == pytest.approx(kl.sum(-1).mean().item(), rel=1e-5)
    assert a.loss == pytest.approx(a.recon + a.kl)
    assert a.mu.shape == (300, 2)
