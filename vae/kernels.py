"""Faster CPU kernels for the training step: the same math as the plain PyTorch ops they stand in for.

Measured by `python -m bench.bench` on the 2-core AMD EPYC CI machine (batch 128, the 784-400-20 VAE):

- `linear`: on CPU float32 tensors the forward product and both backward products of a Linear layer
  (with its ReLU or tanh fused into the forward) run through oneDNN (`torch.ops.mkldnn._linear_pointwise`,
  the op Inductor's CPU backend uses) instead of MKL's sgemm. MKL takes its AVX2 code path on AMD CPUs,
  oneDNN its AVX-512 one: a 128x784x400 product takes 0.21 ms instead of 0.42 ms. Elsewhere (CUDA,
  other dtypes, a torch without the op) it is `F.linear` and the activation.
- `bernoulli_nll`: binary cross-entropy with logits, summed over features. ATen's CPU `log1p` (inside
  `F.binary_cross_entropy_with_logits`) is not vectorised and took 0.55 ms for 128x784 logits;
  softplus(l) = max(l, 0) + log(1 + exp(-|l|)) with the vectorised `log` takes 0.1 ms. The difference
  is below 6e-8 nats per pixel (`log(1 + e)` rounds `e < 6e-8` away). Its gradient is sigmoid(l) - x.

`VAE_KERNELS=torch` in the environment turns both off (the plain ops everywhere), for comparison.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

KERNELS_ENV = "VAE_KERNELS"
ACTIVATIONS = ("none", "relu", "tanh")


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """oneDNN's fused linear is present and agrees with F.linear on a probe (checked once per process)."""
    if os.environ.get(KERNELS_ENV, "") == "torch":
        return False
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((3, 5), (4, 5), (4,)))
        return bool(torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5))
    except RuntimeError:
        return False


def fast_enabled() -> bool:
    return os.environ.get(KERNELS_ENV, "") != "torch"


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(y)
    if activation == "tanh":
        return torch.tanh(y)
    return y


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str = "none") -> torch.Tensor:
    """x @ w.T (+ b), activation fused; any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, activation, [], "")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        y = _onednn(x, weight, bias, activation)
        ctx.activation = activation
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        if ctx.activation == "relu":
            grad = torch.ops.aten.threshold_backward(grad, y, 0)
        elif ctx.activation == "tanh":
            grad = torch.ops.aten.tanh_backward(grad, y)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t(), None)  # grad @ W
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = _onednn(flat.t(), x.reshape(-1, x.shape[-1]).t(), None)  # grad.T @ x: [out, in]
        if ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none") -> torch.Tensor:
    """activation(x @ weight.T + bias) for x [..., in], weight [out, in]."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() >= 2
            and onednn_available()):
        return _Linear.apply(x, weight, bias, activation)
    return _activate(F.linear(x, weight, bias), activation)


def layer(module: torch.nn.Linear, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """`linear` with an nn.Linear's weight and bias."""
    return linear(x, module.weight, module.bias, activation)


class _BernoulliNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, x):
        ctx.save_for_backward(logits, x)
        return _bernoulli_terms(logits, x).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        logits, x = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        grad_logits = (torch.sigmoid(logits) - x) * g if ctx.needs_input_grad[0] else None
        grad_x = None
        if ctx.needs_input_grad[1]:  # x broadcast over the leading sample axes of logits: sum them back
            grad_x = -logits * g
            while grad_x.dim() > x.dim():
                grad_x = grad_x.sum(0)
        return grad_logits, grad_x


def _bernoulli_terms(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-feature -log p(x | logits) = softplus(l) - x l = max(l, 0) - x l + log(1 + exp(-|l|))."""
    tail = logits.abs().neg_().exp_()
    tail = tail.add_(1).log_() if logits.device.type == "cpu" else tail.log1p_()  # log1p: scalar on CPU
    return tail.add_(logits.clamp(min=0)).addcmul_(x, logits, value=-1)


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(x | sigmoid(logits)) summed over the last axis; x broadcasts over logits' leading axes."""
    if not fast_enabled():
        return F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    return _BernoulliNLL.apply(logits, x)


# ------------------------------------------------------------------ the seed-1 VAE's ELBO terms, fused
class _MLPVAETerms(torch.autograd.Function):
    """MLPVAE.forward in one node: x [B, D], eps [S, B, L] -> (recon NLL averaged over S [B], KL per dim [B, L]).

    The backward is the chain rule written out (checked against autograd in tests/test_kernels.py): one
    Python node instead of about thirty, no re-derived intermediates, every product through oneDNN.
    """

    @staticmethod
    def forward(ctx, x, eps, w1, b1, w_mu, b_mu, w_lv, b_lv, w3, b3, w4, b4):
        h1 = _onednn(x, w1, b1, "relu")
        mu, logvar = _onednn(h1, w_mu, b_mu), _onednn(h1, w_lv, b_lv)
        std = torch.exp(0.5 * logvar)
        z = torch.addcmul(mu, std, eps)
        h3 = _onednn(z, w3, b3, "relu")
        logits = _onednn(h3, w4, b4)
        recon = _bernoulli_terms(logits, x).sum(-1).mean(0)
        var = torch.exp(logvar)
        kl = (mu * mu).add_(var).sub_(logvar).sub_(1).mul_(0.5)
        ctx.save_for_backward(x, eps, h1, mu, var, std, z, h3, logits, w1, w_mu, w_lv, w3, w4)
        return recon, kl

    @staticmethod
    def backward(ctx, g_recon, g_kl):
        x, eps, h1, mu, var, std, z, h3, logits, w1, w_mu, w_lv, w3, w4 = ctx.saved_tensors
        n_mc = logits.shape[0]

        def weight_grad(g, inp):  # g.T @ inp over every leading axis: [out, in]
            return _onednn(g.reshape(-1, g.shape[-1]).t(), inp.reshape(-1, inp.shape[-1]).t(), None)

        def bias_grad(g):
            return g.reshape(-1, g.shape[-1]).sum(0)

        g_logits = torch.sigmoid(logits).sub_(x).mul_((g_recon / n_mc).view(1, -1, 1))
        g_h3 = torch.ops.aten.threshold_backward(_onednn(g_logits, w4.t(), None), h3, 0)
        g_z = _onednn(g_h3, w3.t(), None)
        # z = mu + std * eps; KL = (mu^2 + var - logvar - 1) / 2 with var = std^2 = exp(logvar)
        g_mu = g_z.sum(0).addcmul_(g_kl, mu)
        g_lv = (g_z * eps).sum(0).mul_(std).mul_(0.5).addcmul_(g_kl, var - 1, value=0.5)
        g_h1 = _onednn(g_mu, w_mu.t(), None).add_(_onednn(g_lv, w_lv.t(), None))
        g_h1 = torch.ops.aten.threshold_backward(g_h1, h1, 0)
        return (None, None, weight_grad(g_h1, x), bias_grad(g_h1), weight_grad(g_mu, h1), bias_grad(g_mu),
                weight_grad(g_lv, h1), bias_grad(g_lv), weight_grad(g_h3, z), bias_grad(g_h3),
                weight_grad(g_logits, h3), bias_grad(g_logits))


def fused_ok(x: torch.Tensor, eps: torch.Tensor) -> bool:
    """The fused node applies: CPU float32, oneDNN present, gradients wanted for the weights only."""
    return (x.device.type == "cpu" and x.dtype == eps.dtype == torch.float32 and x.dim() == 2 and eps.dim() == 3
            and torch.is_grad_enabled() and not (x.requires_grad or eps.requires_grad) and onednn_available())


def mlp_vae_terms(x: torch.Tensor, eps: torch.Tensor, fc1, fc_mu, fc_logvar, fc3, fc4):
    """The fused forward of the seed-1 VAE: (recon NLL [B], KL per dim [B, L]); see `_MLPVAETerms`."""
    return _MLPVAETerms.apply(x, eps, fc1.weight, fc1.bias, fc_mu.weight, fc_mu.bias, fc_logvar.weight,
                              fc_logvar.bias, fc3.weight, fc3.bias, fc4.weight, fc4.bias)


# ------------------------------------------------------------------ the allocator
@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of handing it back to the kernel after every step.

    A training step frees and re-allocates the same few MB of activations and gradients; with glibc's
    defaults, blocks above the mmap threshold and the trimmed top of the heap are returned to the kernel and
    page-faulted back in on the next step (measured: 2.9 -> 2.5 ms a step). The heap may keep up to
    256 MiB that is free; blocks of 32 MiB and more (the dataset) are still mapped separately.
    Returns whether glibc took the settings (False elsewhere, e.g. musl or macOS).
    """
    if os.environ.get(KERNELS_ENV, "") == "torch":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return all(libc.mallopt(k, v) == 1 for k, v in ((m_mmap_threshold, 32 << 20),
                                                          (m_trim_threshold, 256 << 20), (m_top_pad, 64 << 20)))
    except (OSError, AttributeError):
        return False
