"""The ELBO's terms against torch.distributions and closed forms."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from vae.model import losses

torch.manual_seed(0)


def test_kl_per_dim_matches_torch_distributions():
    mu, logvar = torch.randn(7, 5), torch.randn(7, 5)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(losses.kl_per_dim(mu, logvar), expected, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_only_at_the_prior():
    assert losses.kl_per_dim(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max() < 1e-7
    assert (losses.kl_per_dim(torch.full((1, 1), 0.1), torch.zeros(1, 1)) > 0).all()


def test_bernoulli_nll_matches_log_prob_on_binary_data():
    x = torch.randint(0, 2, (6, 784)).float()
    logits = 3 * torch.randn(6, 784)
    expected = -Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(losses.bernoulli_nll(x, logits), expected, rtol=1e-5, atol=1e-4)


def test_bernoulli_nll_on_intensities_is_the_cross_entropy_formula():
    x, logits = torch.rand(4, 10), torch.randn(4, 10)
    p = torch.sigmoid(logits)
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    torch.testing.assert_close(losses.bernoulli_nll(x, logits), expected, rtol=1e-5, atol=1e-5)


def test_bernoulli_nll_broadcasts_over_mc_samples():
    x, logits = torch.rand(4, 10), torch.randn(3, 4, 10)
    out = losses.bernoulli_nll(x, logits)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out[1], losses.bernoulli_nll(x, logits[1]))


def test_gaussian_nll_matches_normal_log_prob():
    x, mean, logvar = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    expected = -Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum(-1)
    torch.testing.assert_close(losses.gaussian_nll(x, mean, logvar), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.log_standard_normal(x), Normal(0.0, 1.0).log_prob(x).sum(-1))


def test_reparameterisation_gradients():
    mu = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
    logvar = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
    eps = torch.randn(4, 3, 2, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda m, lv: losses.reparameterize(m, lv, eps), (mu, logvar))
    z = losses.reparameterize(mu, logvar, eps)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.full_like(mu, 4.0))  # dz/dmu = 1 per sample
    torch.testing.assert_close(logvar.grad, (0.5 * torch.exp(0.5 * logvar) * eps).sum(0).detach())


def test_reparameterised_samples_have_the_posterior_moments():
    mu, logvar = torch.tensor([[1.5, -2.0]]), torch.tensor([[math.log(0.25), math.log(4.0)]])
    z = losses.reparameterize(mu, logvar, torch.randn(200_000, 1, 2))
    torch.testing.assert_close(z.mean((0, 1)), mu[0], atol=0.02, rtol=0)
    torch.testing.assert_close(z.var((0, 1)), logvar.exp()[0], atol=0.03, rtol=0.02)


def test_kl_warmup_is_linear_then_flat():
    assert losses.kl_weight(2.0, 0.0, 4.0) == 0.0
    assert losses.kl_weight(2.0, 1.0, 4.0) == pytest.approx(0.5)
    assert losses.kl_weight(2.0, 4.0, 4.0) == 2.0
    assert losses.kl_weight(2.0, 9.0, 4.0) == 2.0
    assert losses.kl_weight(2.0, 0.0, 0.0) == 2.0


def test_free_bits_floors_each_dimension_mean():
    kl = torch.tensor([[0.1, 2.0], [0.3, 4.0]])  # dim 0 mean 0.2 (below 1), dim 1 mean 3.0
    total = losses.free_bits_kl(kl, 1.0)
    assert total.mean().item() == pytest.approx(1.0 + 3.0)
    torch.testing.assert_close(losses.free_bits_kl(kl, 0.0), kl.sum(-1))


def test_free_bits_stops_the_gradient_of_dimensions_under_the_floor():
    kl = torch.tensor([[0.1, 2.0], [0.3, 4.0]], requires_grad=True)
    losses.free_bits_kl(kl, 1.0).mean().backward()
    assert kl.grad[:, 0].abs().sum() == 0  # below the floor: no push towards the prior
    assert (kl.grad[:, 1] > 0).all()


def test_negative_elbo_weights_the_kl():
    recon, kl = torch.tensor([10.0, 20.0]), torch.tensor([[1.0, 1.0], [3.0, 1.0]])
    assert losses.negative_elbo(recon, kl, 0.5).item() == pytest.approx(15.0 + 0.5 * 3.0)


def test_gaussian_nll_with_one_variance_for_every_feature_equals_the_full_form():
    x, mean = torch.randn(3, 5, 7), torch.randn(2, 3, 5, 7)
    logvar = torch.randn(3, 1, 1)
    shared = losses.shared_variance_nll((x - mean).pow(2).sum(-1), logvar[..., 0], x.shape[-1])
    full = losses.gaussian_nll(x, mean, logvar.expand_as(mean).contiguous())
    torch.testing.assert_close(shared, full)
    ref = torch.distributions.Normal(mean, (0.5 * logvar).exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(shared, -ref)
