"""The hand-written nodes compute what the plain PyTorch ops compute, values and gradients; vae/model/fast.py routes
a model to them, and torch's private fused Adam still takes the arguments vae/training/pack_adam.py gives it."""

import math

import pytest
import torch
import torch.nn.functional as F

from vae.training import cpu, pack
from vae.model import fast, kernels, losses
from vae.model.models import VAE, build_model
from vae.training.pack_adam import FUSED_ADAM, fused_adam


def _grads(fn, *tensors):
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_a_packs_bernoulli_nll_is_the_softplus_node_and_matches_bce_with_logits(shared, scale):
    gen = torch.Generator().manual_seed(0)
    logits = (scale * torch.randn(2, 3, 16, 50, generator=gen, dtype=torch.float64)).requires_grad_()  # [S, K, B, D]
    x = torch.rand(*(() if shared else (3,)), 16, 50, generator=gen, dtype=torch.float64)  # [B, D] or [K, B, D]
    out = kernels.bernoulli_nll(x, logits)
    assert out.grad_fn is not None and "SoftplusBernoulliNLL" in type(out.grad_fn).__name__
    torch.autograd.gradcheck(lambda l_: kernels.bernoulli_nll(x, l_), (logits,))
    out, (grad,) = _grads(lambda l_: kernels.bernoulli_nll(x, l_), logits)
    ref, (ref_grad,) = _grads(lambda l_: F.binary_cross_entropy_with_logits(
        l_, x.expand_as(l_), reduction="none").sum(-1), logits)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=50 * math.exp(-20))  # softplus is l above 20: exp(-20) off
    torch.testing.assert_close(grad, ref_grad)
    extreme = torch.tensor([[-200.0] * 50, [200.0] * 50]).expand(1, 3, 2, 50)
    assert torch.isfinite(kernels.bernoulli_nll(torch.rand(2, 50), extreme)).all()


@pytest.mark.parametrize("shared", [False, True])
def test_packed_linear_backward_passes_gradcheck_in_double(shared):
    """The packed layer's hand-written backward (weight gradient laid out as W), x per member or shared."""
    k, b, n_in, n_out = 3, 4, 5, 2
    x = torch.rand(b, n_in) if shared else torch.rand(k, b, n_in)
    w, bias = torch.randn(k, n_out, n_in), torch.randn(k, n_out)
    args = [t.double().requires_grad_() for t in (x, w, bias)]
    assert torch.autograd.gradcheck(kernels._PackedLinear.apply, args)
    # a training layer of NARROW inputs or more is routed through it
    wide = torch.randn(k, n_out, kernels.NARROW, requires_grad=True)
    y = kernels.packed_linear(torch.rand(b, kernels.NARROW) if shared else torch.rand(k, b, kernels.NARROW), wide, bias)
    assert type(y.grad_fn).__name__ == "_PackedLinearBackward"


@pytest.mark.parametrize("k, shared", [(1, True), (3, False), (3, True)])
def test_linear_squared_error_passes_gradcheck_and_equals_the_plain_terms(k, shared):
    # seeded: float32 rounding puts about 1.5 % of random draws just past assert_close's default tolerance, and
    # unseeded draws depend on which tests ran before in the process
    torch.manual_seed(0)
    x = torch.rand(4, 6) if shared else torch.rand(k, 4, 6)
    z = torch.randn(1, 4, 3) if k == 1 else torch.randn(1, k, 4, 3)
    w, bias = (torch.randn(6, 3), torch.randn(6)) if k == 1 else (torch.randn(k, 6, 3), torch.randn(k, 6))
    args = [t.double().requires_grad_() for t in (z, w, bias)]
    assert torch.autograd.gradcheck(lambda *a: kernels.linear_squared_error(x.double(), *a), args)
    mean = torch.matmul(z, w.transpose(-1, -2)) + bias.unsqueeze(-2)
    torch.testing.assert_close(kernels.linear_squared_error(x, z, w, bias), (mean - x).pow(2).sum(-1))
    # the linear VAE's training forward through it: the terms and gradients of VAE.forward's plain path
    models = [build_model("linear", 6, 3, 0, None if k == 1 else 0.5 + i) for i in range(k)]  # learned, fixed
    model = fast.accelerate(pack.stack(models))  # vae/model/fast.py routes the linear VAE's training forward
    eps = torch.randn(*z.shape)
    fused, plain = model(x, eps), VAE.forward(model, x, eps)
    assert "_LinearSquaredErrorBackward" in _graph_nodes(fused[0]) - _graph_nodes(plain[0])  # the fused path ran
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(sum(t.pow(2).sum() for t in fused), params),
                    torch.autograd.grad(sum(t.pow(2).sum() for t in plain), params)):
        torch.testing.assert_close(a, b)


def _graph_nodes(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes `t` was computed through."""
    names, visited, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in visited:
            visited.add(fn)
            names.add(type(fn).__name__)
            todo += [f for f, _ in fn.next_functions]
    return names


def test_gaussian_squared_error_node_passes_gradcheck_and_equals_the_plain_terms():
    x = torch.rand(3, 4, 5, dtype=torch.float64, requires_grad=True)
    mean = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)  # x broadcast over a sample axis
    assert torch.autograd.gradcheck(kernels.squared_error, (x, mean))
    torch.testing.assert_close(kernels.squared_error(x, mean), (x - mean).pow(2).sum(-1))


@pytest.mark.parametrize("model_name, packed", [("mlp", False), ("mlp", True), ("gaussian-mlp", False),
                                                ("linear", False), ("linear", True)])
def test_accelerate_routes_each_model_to_its_node_and_keeps_the_plain_terms(model_name, packed):
    """vae/model/fast.py is the one place a model meets the kernels: each route ran (its node is in the graph) and
    the terms and gradients equal the plain math of vae/model/models.py and vae/model/losses.py."""
    dim = 784 if model_name == "mlp" else 2
    var = "1" if model_name != "mlp" else None
    models = []
    for seed in range(3 if packed else 1):
        torch.manual_seed(seed)
        models.append(build_model(model_name, dim, 3, 16, None if var is None else 1.0 + seed))
    plain_model = pack.stack(models)
    fast_model = fast.accelerate(pack.stack(models))
    x = torch.rand(5, dim)
    eps = torch.randn(1, *((3,) if packed else ()), 5, 3)
    want = {("mlp", False): None, ("mlp", True): "SoftplusBernoulliNLLBackward",
            ("gaussian-mlp", False): "_SquaredErrorBackward", ("linear", False): "_LinearSquaredErrorBackward",
            ("linear", True): "_LinearSquaredErrorBackward"}[(model_name, packed)]
    got, ref = fast_model(x, eps), plain_model(x, eps)
    if model_name == "mlp":  # evaluated (no gradient), a Bernoulli decoder takes the softplus node too
        with torch.no_grad():
            mu, _ = fast_model.encode(x)
            torch.testing.assert_close(fast_model.recon_nll(x, fast_model.decode(mu)),
                                       plain_model.recon_nll(x, plain_model.decode(mu)))
    if want:
        assert any(want in n for n in _graph_nodes(got[0])), _graph_nodes(got[0])
    else:
        assert _graph_nodes(got[0]) == _graph_nodes(ref[0])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    params = list(fast_model.parameters())
    for a, b in zip(torch.autograd.grad(sum(t.sum() for t in got), params),
                    torch.autograd.grad(sum(t.sum() for t in ref), list(plain_model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torchs_private_fused_adam_takes_the_arguments_pack_adam_gives_it():
    """`torch._fused_adam_` is private: if a torch release changes its signature or drops it, this fails
    loudly (PackAdam would fall back to its stacked passes where it is missing)."""
    assert FUSED_ADAM is not None, "torch._fused_adam_ is gone: PackAdam takes its stacked passes"
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    ref = w.detach().clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.1)
    mine = w.detach().clone()
    m, v = torch.zeros_like(mine), torch.zeros_like(mine)
    for step in range(1, 4):
        g = torch.randn(4, 3)
        ref.grad = g.clone()
        opt.step()
        fused_adam([mine], [g], [m], [v], [torch.tensor(float(step))], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    torch.testing.assert_close(mine, ref.detach())


def test_tune_allocator_takes_glibcs_settings_here():
    """This project's CI and machines run glibc: mallopt must accept the settings (False only elsewhere)."""
    import platform

    expected = platform.libc_ver()[0] == "glibc"
    assert cpu.tune_allocator() is expected and cpu.tune_allocator() is expected


def test_plain_bernoulli_nll_is_bce_with_logits():
    gen = torch.Generator().manual_seed(0)
    logits, x = torch.randn(2, 4, 7, generator=gen), torch.rand(4, 7, generator=gen)
    ref = torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob(x.expand_as(logits)).sum(-1)
    torch.testing.assert_close(losses.bernoulli_nll(x, logits), -ref)
