"""The fast kernels compute what the plain PyTorch ops compute, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from vae import kernels
from vae.models import VAE, MLPConfig, MLPVAE, build_model

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch has no oneDNN linear")


@pytest.fixture(autouse=True)
def onednn_path():
    """These tests compare the custom path with plain ops: make it the process's path, then restore."""
    before = kernels.active_path()
    kernels.use("onednn")
    yield
    kernels.use(before)


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


def test_fused_path_is_off_without_grad_or_when_asked():
    model, x, eps = _mlp_and_batch(1)
    with torch.no_grad():
        assert not kernels.fused_ok(x, eps)
    kernels.use("torch")
    assert not kernels.fused_ok(x, eps) and not kernels.fast_enabled()
    recon, kl = model(x, eps)  # the plain layers
    assert recon.grad_fn is not None and recon.shape == (8,) and kl.shape == (8, 4)


def _fake_paths(monkeypatch, seconds: dict[str, float]):
    """A step that takes `seconds[path]` under each path (time stands still otherwise)."""
    clock = [0.0]
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(kernels, "onednn_available", lambda: True)

    def step():
        clock[0] += seconds[kernels.active_path()]
    return step


@pytest.mark.parametrize("torch_s, onednn_s, picked", [(0.002, 0.001, "onednn"), (0.001, 0.002, "torch"),
                                                         (0.00100, 0.00098, "torch")])  # 2% is not a clear win
def test_auto_picks_the_faster_path_only_when_it_wins_clearly(monkeypatch, torch_s, onednn_s, picked):
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    choice = kernels.choose(_fake_paths(monkeypatch, {"torch": torch_s, "onednn": onednn_s}))
    assert choice["path"] == picked == kernels.active_path()
    assert choice["rates"]["torch"] == pytest.approx(1 / torch_s)
    assert choice["rates"]["onednn"] == pytest.approx(1 / onednn_s)
    assert picked in kernels.describe(choice) and "steps/s" in kernels.describe(choice)


@pytest.mark.parametrize("forced", ["torch", "onednn"])
def test_a_forced_path_is_honoured(monkeypatch, forced):
    monkeypatch.setenv(kernels.KERNELS_ENV, forced)
    fast = {"torch": 0.001, "onednn": 0.001}
    fast["torch" if forced == "onednn" else "onednn"] = 0.0001  # the other path is much faster
    choice = kernels.choose(_fake_paths(monkeypatch, fast))
    assert choice["path"] == forced == kernels.active_path() and choice["requested"] == forced


def test_auto_falls_back_to_plain_ops_without_the_private_op(monkeypatch):
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    monkeypatch.setattr(kernels, "onednn_available", lambda: False)
    choice = kernels.choose(lambda: pytest.fail("nothing to time"))
    assert choice["path"] == "torch" == kernels.active_path() and "not in this torch" in choice["reason"]
    monkeypatch.setenv(kernels.KERNELS_ENV, "bogus")
    with pytest.raises(ValueError, match="VAE_KERNELS must be one of auto, torch, onednn"):
        kernels.requested()


def test_the_loop_records_its_choice_in_the_epoch_rows_and_run_json(tmp_path, monkeypatch):
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    from vae.config import TrainConfig
    from vae.loop import train_loop
    from vae.results import Results
    from vae.session import LocalSession

    cfg = TrainConfig(dataset="gaussian2d", model="linear", epochs=1, storage=str(tmp_path), name="k",
                      iw_samples=0)
    Results(str(tmp_path / "k")).write_json("run.json", {"config": cfg.to_dict()})
    train_loop(cfg, LocalSession())
    rows = Results(str(tmp_path / "k")).read("epochs")
    assert rows.kernels.str.contains(r"^(?:torch|onednn) \(auto; torch [\d,]+ steps/s, onednn").all()
    info = Results(str(tmp_path / "k")).read_json("run.json")
    assert info["kernels"]["path"] in kernels.PATHS and set(info["kernels"]["rates"]) == set(kernels.PATHS)


def test_tune_allocator_is_safe_to_call_twice():
    assert kernels.tune_allocator() in (True, False)
    assert kernels.tune_allocator() in (True, False)


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
    y = kernels.linear(torch.rand(b, kernels.NARROW) if shared else torch.rand(k, b, kernels.NARROW), wide, bias)
    assert type(y.grad_fn).__name__ == "_PackedLinearBackward"


@pytest.mark.parametrize("k, shared", [(1, True), (3, False), (3, True)])
def test_linear_squared_error_passes_gradcheck_and_equals_the_plain_terms(k, shared):
    from vae import pack

    x = torch.rand(4, 6) if shared else torch.rand(k, 4, 6)
    z = torch.randn(1, 4, 3) if k == 1 else torch.randn(1, k, 4, 3)
    w, bias = (torch.randn(6, 3), torch.randn(6)) if k == 1 else (torch.randn(k, 6, 3), torch.randn(k, 6))
    args = [t.double().requires_grad_() for t in (z, w, bias)]
    assert torch.autograd.gradcheck(lambda *a: kernels.linear_squared_error(x.double(), *a), args)
    mean = kernels.linear(z, w, bias)
    torch.testing.assert_close(kernels.linear_squared_error(x, z, w, bias), (mean - x).pow(2).sum(-1))
    # the linear VAE's training forward through it: the terms and gradients of VAE.forward's plain path
    models = [build_model("linear", 6, 3, 0, None if k == 1 else 0.5 + i) for i in range(k)]  # learned, fixed
    model = models[0] if k == 1 else pack.stack_models(models)
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
