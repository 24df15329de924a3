"""The fast kernels compute what the plain PyTorch ops compute, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from vae import kernels
from vae.models import VAE, MLPConfig, MLPVAE

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch has no oneDNN linear")


def _reference_linear(x, w, b, activation):
    return kernels._activate(F.linear(x, w, b), activation)


def _grads(fn, *tensors):
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad(out, tensors, g)


@needs_onednn
@pytest.mark.parametrize("shape", [(128, 784), (3, 16, 20), (7, 2)])
@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
def test_linear_matches_f_linear_values_and_gradients(shape, activation):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(11, shape[-1], generator=gen, requires_grad=True)
    b = torch.randn(11, generator=gen, requires_grad=True)
    out, grads = _grads(lambda *t: kernels.linear(*t, activation=activation), x, w, b)
    ref, ref_grads = _grads(lambda *t: _reference_linear(*t, activation), x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_linear_falls_back_off_cpu_float32():
    x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(kernels.linear(x, w, None, "tanh"), torch.tanh(x @ w.t()))


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_bernoulli_nll_matches_bce_with_logits(scale):
    gen = torch.Generator().manual_seed(0)
    logits = (scale * torch.randn(3, 64, 50, generator=gen)).requires_grad_()
    x = torch.rand(64, 50, generator=gen).requires_grad_()
    out, grads = _grads(kernels.bernoulli_nll, x, logits)
    ref, ref_grads = _grads(lambda x_, l_: F.binary_cross_entropy_with_logits(
        l_, x_.expand_as(l_), reduction="none").sum(-1), x, logits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=50 * 6e-8 + 1e-4)  # 6e-8 nats per feature at most
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(kernels.bernoulli_nll(x[:2], torch.tensor([[-200.0] * 50, [200.0] * 50]))).all()


def _mlp_and_batch(n_mc: int):
    torch.manual_seed(0)
    model = MLPVAE(MLPConfig(input_dim=30, hidden_dim=16, latent_dim=4))
    x = torch.rand(8, 30)
    eps = torch.randn(n_mc, 8, 4)
    return model, x, eps


@needs_onednn
@pytest.mark.parametrize("n_mc", [1, 3])
def test_fused_mlp_terms_match_the_layer_by_layer_model(n_mc):
    model, x, eps = _mlp_and_batch(n_mc)
    assert kernels.fused_ok(x, eps)
    params = list(model.parameters())

    def objective(terms):  # recon and KL enter the loss with different weights, and KL per dim unevenly
        recon, kl = terms
        return (recon + 0.7 * (kl * torch.arange(1.0, 5.0)).sum(-1)).mean()

    fused = model(x, eps)
    plain = VAE.forward(model, x, eps)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(objective(fused), params), torch.autograd.grad(objective(plain), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_backward_passes_gradcheck_in_double(monkeypatch):
    """The hand-written backward against finite differences (products through F.linear, in float64)."""
    monkeypatch.setattr(kernels, "_onednn", lambda x, w, b, activation="none": _reference_linear(x, w, b, activation))
    model, x, eps = _mlp_and_batch(2)
    model = model.double()
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    assert torch.autograd.gradcheck(lambda *p: kernels._MLPVAETerms.apply(x.double(), eps.double(), *p), params)


def test_fused_path_is_off_without_grad_or_when_asked(monkeypatch):
    model, x, eps = _mlp_and_batch(1)
    with torch.no_grad():
        assert not kernels.fused_ok(x, eps)
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    kernels.onednn_available.cache_clear()
    try:
        assert not kernels.fused_ok(x, eps)
        assert not kernels.onednn_available()
        recon, kl = model(x, eps)  # the plain layers
        assert recon.grad_fn is not None and recon.shape == (8,) and kl.shape == (8, 4)
    finally:
        monkeypatch.delenv(kernels.KERNELS_ENV)
        kernels.onednn_available.cache_clear()


def test_tune_allocator_is_safe_to_call_twice():
    assert kernels.tune_allocator() in (True, False)
    assert kernels.tune_allocator() in (True, False)
