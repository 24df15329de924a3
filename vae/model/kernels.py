"""Hand-written autograd nodes for the training step: the same math as the plain PyTorch ops they stand in
for, each gradchecked and tested against the plain formula (tests/test_kernels.py). Nothing here is
chosen by a flag or a probe: `vae/model/fast.py` is the one place that maps a model and its loss to these.

- `_PackedLinear`: a packed layer (vae/training/pack.py: weight [K, out, in]) with its weight gradient in W's layout
  and wide products for a batch every member shares.
- `_SoftplusBernoulliNLL`: a pack's Bernoulli NLL (its logits do not fit in cache).
- `_SquaredError`, `_LinearSquaredError`: a Gaussian decoder's squared error with a variance shared by every
  feature, and the linear VAE's decoder and squared error in one node that never forms the mean.

(An earlier oneDNN path, chosen per process by a start-up timing probe, is gone: on the two CPUs it was
measured on last, an Intel Xeon and the AMD EPYC of docs/performance.md, the probe picked plain ops.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NARROW = 64  # a packed layer with fewer inputs keeps autograd's products (its weight gradient is small)


def _packed_products(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W_k.T + b_k for weight [K, out, in]: x [K, B, in] as batched products, or x [B, in] shared by every
    member as one wide product [B, in] x [in, K * out], whose result [K, B, out] is a view of it."""
    if x.dim() == 2:
        k, out, _ = weight.shape
        y = F.linear(x, weight.reshape(k * out, -1), None if bias is None else bias.reshape(k * out))
        return y.view(x.shape[0], k, out).transpose(0, 1)
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class _PackedLinear(torch.autograd.Function):
    """A packed layer's x @ W_k.T + b_k: weight [K, out, in], bias [K, out]; x [K, B, in], or [B, in] shared by
    every member (one wide product [B, in] x [in, K * out]; the result [K, B, out] is a view of it).

    Its backward writes the weight's gradient as W is laid out ([K, out, in], from grad.T @ x), where
    autograd's `baddbmm` backward gives [K, in, out] and then copies it across (a transposed copy of every
    weight, each step: 30 MB for a pack of 24 seed MLPs' last layer). Used for layers of `NARROW` inputs
    or more: with fewer, a product with so few output columns runs slowly and the copy is small. For a
    shared x, the backward's products are wide ones too, as the forward's."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _packed_products(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if x.dim() == 2:  # shared x: wide products over grad [B, K * out] (a view, in the forward's layout)
            wide = grad.transpose(0, 1).reshape(x.shape[0], -1)
            if ctx.needs_input_grad[0]:  # summed over the members by the product itself
                grad_x = wide @ weight.reshape(wide.shape[1], -1)
            if ctx.needs_input_grad[1]:  # [K * out, in]: W's layout
                grad_w = (wide.t() @ x).view(weight.shape)
        else:
            if ctx.needs_input_grad[0]:
                grad_x = torch.bmm(grad, weight)
            if ctx.needs_input_grad[1]:
                grad_w = torch.bmm(grad.transpose(1, 2), x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(1)
        return grad_x, grad_w, grad_b


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W_k.T + b_k for a packed layer (vae/training/pack.py: weight [K, out, in], bias [K, out]).

    x [..., K, B, in]: one batched product per call, `baddbmm` for x [K, B, in]; leading sample axes are
    joined to the batch. Or x [B, in] that every member shares (members with one data order): one wide
    product [B, in] x [in, K * out], whose result [K, B, out] is a view of it."""
    if x.dim() == 4:  # [S, K, B, in]: the samples joined to the batch, one product per member
        s, k, b, _ = x.shape
        flat = x.squeeze(0) if s == 1 else x.transpose(0, 1).reshape(k, s * b, x.shape[-1])  # squeeze: no copy back
        y = packed_linear(flat, weight, bias)
        return y.unsqueeze(0) if s == 1 else y.reshape(k, s, b, -1).transpose(0, 1)
    if weight.shape[2] >= NARROW and bias is not None and torch.is_grad_enabled():
        return _PackedLinear.apply(x, weight, bias)
    return _packed_products(x, weight, bias)


class PackedLinear(nn.Module):
    """An `nn.Linear` (or a masked one, vae.model.models.MaskedLinear) of a pack: K members' weights stacked
    ([K, out, in], bias [K, out], mask [K, out, in]) under the names the plain layer has, so that a member's
    state dict is a slice of the pack's (vae/training/pack.py)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        if mask is not None:
            self.register_buffer("mask", mask)
        else:
            self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight if self.mask is None else self.weight * self.mask, self.bias)


def _row_dot(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_d a_d x_d over the last axis, x broadcast over a's leading axes. A pack's shared x [B, D] against
    a [..., K, B, D] is one batched product that reads a once (einsum's plan); otherwise a fused dot."""
    if x.dim() == 2 and a.dim() >= 3:
        return torch.einsum("...bd,bd->...b", a, x)
    return torch.linalg.vecdot(a, x)


class _SoftplusBernoulliNLL(torch.autograd.Function):
    """sum_d softplus(l_d) - x_d l_d, the Bernoulli NLL over the last axis, x broadcast over the leading axes
    of the logits and taking no gradient: softplus, a sum and a dot product forward, sigmoid(l) - x back.

    Used for a pack's logits [S, K, B, D]: there, with x broadcast over the members, autograd's
    binary_cross_entropy_with_logits (about nine passes over logits that do not fit in cache) is the slower
    (measured on 2 Xeon cores, 24 seed MLPs, shared x: 3.8% off a training step; whole packed training
    2 to 2.5% faster). For a model alone ([S, B, D], in cache) the plain op is the faster: this node cost 3.4%
    a step there, so a model alone keeps it. On a GPU a pack takes this node too (not measured there)."""

    @staticmethod
    def forward(ctx, logits, x):
        ctx.save_for_backward(logits, x)
        return F.softplus(logits).sum(-1).sub_(_row_dot(logits, x))

    @staticmethod
    def backward(ctx, grad):
        logits, x = ctx.saved_tensors
        return torch.sigmoid(logits).sub_(x).mul_(grad.unsqueeze(-1)), None


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(x | sigmoid(logits)) summed over the last axis; x broadcasts over logits' leading axes."""
    return _SoftplusBernoulliNLL.apply(logits, x)


class _SquaredError(torch.autograd.Function):
    """sum_d (mean_d - x_d)^2 over the last axis, x broadcast over mean's leading axes: one saved difference,
    one pass back (autograd's sub, pow and sum take six passes over a batch of images)."""

    @staticmethod
    def forward(ctx, x, mean):
        d = mean - x
        ctx.save_for_backward(d)
        ctx.x_shape = x.shape
        return torch.linalg.vector_norm(d, 2, -1).square()  # one fused reduction (3.5x vecdot's time here)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        gd = d * (2.0 * grad).unsqueeze(-1)
        grad_x = None
        if ctx.needs_input_grad[0]:  # x broadcast over the leading sample axes: sum them back
            grad_x = -gd
            while grad_x.dim() > len(ctx.x_shape):
                grad_x = grad_x.sum(0)
        return grad_x, gd if ctx.needs_input_grad[1] else None


class _LinearSquaredError(torch.autograd.Function):
    """sum_d (z W^T + b - x)_d^2 for a linear decoder, one sample: z [K, B, L], W [K, D, L], b [K, 1, D],
    x [B, D] or [K, B, D] -> [K, B]. The difference d is formed in place of the decoder mean and is all it
    keeps; the backward folds the per-row factor 2g into the small operands (z, and the products with W),
    so it never forms grad * d: three products read d and nothing else passes over it (autograd's
    baddbmm, sub, norm, mul and sum take two more passes over a [K, B, D] batch of images, and a pack's
    does not fit in cache)."""

    @staticmethod
    def forward(ctx, x, z, weight, bias):
        d = torch.baddbmm(bias, z, weight.transpose(1, 2)).sub_(x)
        ctx.save_for_backward(d, z, weight)
        return torch.linalg.vector_norm(d, 2, -1).square()

    @staticmethod
    def backward(ctx, grad):
        d, z, weight = ctx.saved_tensors
        c = (2.0 * grad).unsqueeze(-1)  # [K, B, 1]
        grad_z = torch.bmm(d, weight).mul_(c) if ctx.needs_input_grad[1] else None
        grad_w = (torch.bmm((z * c).transpose(1, 2), d).transpose(1, 2).contiguous()
                  if ctx.needs_input_grad[2] else None)
        grad_b = torch.bmm(c.transpose(1, 2), d) if ctx.needs_input_grad[3] else None
        return None, grad_z, grad_w, grad_b


def linear_squared_error(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """sum over features of (z W^T + b - x)^2: a linear decoder's mean against x, for one sample of z.

    A plain model: z [1, B, L], W [D, L], b [D], x [B, D] -> [1, B]. A pack (vae/training/pack.py): z [1, K, B, L],
    W [K, D, L], b [K, D], x [B, D] (shared) or [K, B, D] -> [1, K, B]. x takes no gradient."""
    if weight.dim() == 2:
        return _LinearSquaredError.apply(x, z, weight.unsqueeze(0), bias.view(1, 1, -1)).view(1, -1)
    k = weight.shape[0]
    return _LinearSquaredError.apply(x, z[0], weight, bias.view(k, 1, -1)).unsqueeze(0)


def squared_error(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """sum over the last axis of (x - mean)^2: [..., B]; plain ops where there is nothing to differentiate."""
    if not (torch.is_grad_enabled() and (x.requires_grad or mean.requires_grad)):
        return torch.linalg.vector_norm(mean - x, 2, -1).square()
    return _SquaredError.apply(x, mean)
