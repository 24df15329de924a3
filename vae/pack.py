"""Packed trials: K models of one shape trained as one model with a leading member axis.

`stack_models` turns K models of the same class and shape into one module of that class whose parameters
are stacked: an `nn.Linear`'s weight becomes [K, out, in] and its bias [K, out] (`vae.kernels.linear`
then runs batched products, `baddbmm`/`matmul`), any other parameter or buffer [K, 1, *shape] (a scalar
[K, 1, 1]) so that it broadcasts against activations [..., K, B, F]. The model's own `encode`, `decode`
and `forward` run unchanged on x [K, B, D] and noise [S, K, B, L]; every loss and KL keeps the member
axis, so members never mix (their gradients are separable: member k's loss depends on member k's slices
alone). A pack of one is not stacked: it is today's model, and the loop treats it as a pack of size 1.

`PackAdam` is Adam over the stacked parameters with a learning rate, a step count and a freeze mask per
member (tested against `torch.optim.Adam` run member by member). `groups` cuts a sweep's points into
packs of members that share a shape.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .data import INPUT_DIM, TEST_SIZE
from .models import build_model

# What members of one pack must share (the rest: lr, beta, seed, warm-up, free bits, fixed decoder
# variance, may differ). From a sweep, only the axes latent_dim and hidden_dim vary among these.
SHAPE_KEYS = ("dataset", "model", "subset", "latent_dim", "hidden_dim", "batch_size", "num_mc", "epochs",
              "until_settled", "max_epochs", "lr_schedule", "num_workers", "active_threshold", "kl_threshold",
              "iw_samples", "iw_subset")
MAX_AUTO = 64  # --pack auto: at most this many members a pack


def shape_key(point: dict[str, Any], shared: dict[str, Any] | None = None) -> tuple:
    """The values a point must share with its pack-mates (`shared` fills the keys the point lacks)."""
    merged = {**(shared or {}), **point}
    learned = merged.get("decoder_var") in (None, "learned", "")
    return tuple(merged.get(k) for k in SHAPE_KEYS) + (learned,)


def groups(points: Sequence[dict[str, Any]], size: int, shared: dict[str, Any] | None = None) -> list[list[dict]]:
    """The points cut into packs of at most `size` members with one shape each, as even as possible (10 by 4:
    3, 4, 3). Within a shape the points are ordered by seed, then learning rate (first-seen order among
    equals), and cut into consecutive runs: a pack holds one seed where it can, so its members share one batch
    a step (`--repeats` gives each configuration several seeds), and its members of one learning rate lie side
    by side, one fused Adam call for them (`PackAdam`)."""
    by_shape: dict[tuple, list[dict]] = {}
    for p in points:
        by_shape.setdefault(shape_key(p, shared), []).append(p)

    def order(p: dict[str, Any]) -> tuple[float, float]:
        merged = {**(shared or {}), **p}
        return float(merged.get("seed") or 0), float(merged.get("lr") or 0)

    packs = []
    for members in by_shape.values():
        members = sorted(members, key=order)
        n = math.ceil(len(members) / size)
        cuts = [round(i * len(members) / n) for i in range(n + 1)]
        packs += [members[a:b] for a, b in zip(cuts, cuts[1:])]
    return packs


def member_bytes(cfg: Any) -> int:
    """A generous estimate of the memory one member of a pack needs on its device: weights, gradients and
    two Adam moments; a training step's activations and their gradients; the test set's fixed noise and
    encoder outputs; one evaluation batch (2,048 examples)."""
    input_dim, n_test = INPUT_DIM[cfg.dataset], TEST_SIZE[cfg.dataset]
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg.model, input_dim, cfg.latent_dim, cfg.hidden_dim,
                                                    cfg.fixed_decoder_var).parameters())
    per_example = cfg.num_mc * (3 * input_dim + 4 * cfg.hidden_dim + 6 * cfg.latent_dim) + input_dim
    floats = (4 * params + 3 * cfg.batch_size * per_example + n_test * cfg.latent_dim * (cfg.num_mc + 3)
              + 2048 * per_example)
    return 4 * int(floats)


def check_members(cfgs: Sequence[Any]) -> None:
    """Members of one pack share a shape, a run folder and the data folder, and have distinct trial ids."""
    first = cfgs[0]
    for c in cfgs[1:]:
        for key in SHAPE_KEYS + ("storage", "name", "data_dir", "tracker", "cpus_per_worker"):
            if getattr(c, key) != getattr(first, key):
                raise ValueError(f"a pack's members must share {key} ({getattr(first, key)!r} vs {getattr(c, key)!r})")
        if (c.fixed_decoder_var is None) != (first.fixed_decoder_var is None):
            raise ValueError("a pack's members must all learn the decoder variance or all fix it")
    ids = [c.run_id for c in cfgs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a pack's members must have distinct trial ids (got {ids})")


def pack_id(trial_ids: Iterable[str]) -> str:
    """The id of a pack from its members' ids; a pack of one is its trial."""
    ids = list(trial_ids)
    if len(ids) == 1:
        return ids[0]
    return f"pack{len(ids)}-" + hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:10]


# ------------------------------------------------------------------ stacked models

def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


def stack_models(models: Sequence[nn.Module]) -> nn.Module:
    """One module holding the K models' parameters and buffers stacked along a leading member axis."""
    template = copy.deepcopy(models[0])
    k = len(models)
    tensors = [dict(list(m.named_parameters()) + list(m.named_buffers())) for m in models]
    for name, value in tensors[0].items():
        owner, leaf = _owner(template, name)
        stacked = torch.stack([t[name].detach() for t in tensors])
        if not isinstance(owner, nn.Linear):
            stacked = stacked.reshape(k, 1, *(value.shape or (1,)))
        if isinstance(value, nn.Parameter):
            owner._parameters[leaf] = nn.Parameter(stacked.clone())
        else:
            owner._buffers[leaf] = stacked.clone()
    return template


def member_slice(stacked: dict[str, torch.Tensor], k: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Member k's state dict from a pack's saved one, shaped as `like` (a plain model's state dict)."""
    return {name: stacked[name][k].reshape(t.shape).clone() for name, t in like.items()}


def member_model(packed: nn.Module, plain: nn.Module, k: int) -> nn.Module:
    """`plain` (a freshly built model of the member's config) holding member k's weights."""
    plain.load_state_dict(member_slice(packed.state_dict(), k, plain.state_dict()))
    return plain.to(next(packed.parameters()).device)


# ------------------------------------------------------------------ the optimiser

class PackAdam:
    """Adam (Kingma & Ba; `torch.optim.Adam`'s update, no weight decay) over stacked parameters: each
    member has its own learning rate, step count and moments, and a frozen member (`frozen[k]`) is not
    updated at all (its gradient, even NaN, is ignored).

    Two ways to the same update:
    - `fused`: torch's fused Adam kernel (what `torch.optim.Adam(fused=True)` runs), one call per run of
      adjacent live members that share a learning rate and a step count, over the run's slices of every
      stacked tensor. A sweep's grid puts the members of one learning rate side by side, so a pack of 24 seed
      MLPs from 4 lrs x 6 betas is 4 calls.
    - `stacked`: a few in-place passes over each whole stacked tensor, with every member's learning rate and
      bias corrections as tensors.
    Measured on 2 Xeon cores (ms a step; one run, one run per member, stacked): 24 seed MLPs 8.2, 10.6, 27;
    8 linear VAEs on MNIST 0.14, 0.39, 0.36; the 2-D toy's 48 members 0.18, 2.6, 0.48. So the fused way is
    taken whenever the live members form at most `FUSED_RUNS` runs, and on CPU always for members whose
    Adam state exceeds `PER_MEMBER_BYTES`; many small members with distinct learning rates take the passes."""

    PER_MEMBER_BYTES = 1 << 20
    FUSED_RUNS = 6

    def __init__(self, params: Iterable[nn.Parameter], lrs: Sequence[float], betas=(0.9, 0.999), eps=1e-8,
                 fused: bool | None = None):
        self.params = [p for p in params]
        self.k = len(lrs)
        member_bytes = 16 * sum(p[0].numel() for p in self.params)  # weights, gradients, two moments
        device = self.params[0].device
        self.big = device.type == "cpu" and member_bytes > self.PER_MEMBER_BYTES
        self.fused = fused  # None: chosen each step from the runs (see the class's note)
        self.lr = torch.tensor(list(lrs), dtype=torch.float64)
        self.betas, self.eps = betas, eps
        self.steps = torch.zeros(self.k, dtype=torch.float64)
        self.frozen = torch.zeros(self.k, dtype=torch.bool)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self._device = device

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @staticmethod
    def _shaped(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (p.dim() - 1)))

    def runs(self) -> list[tuple[int, int]]:
        """[start, stop) of each run of adjacent live members with one learning rate and one step count."""
        lr, steps, frozen = self.lr.tolist(), self.steps.tolist(), self.frozen.tolist()
        out: list[tuple[int, int]] = []
        for k in range(self.k):
            if frozen[k]:
                continue
            if out and out[-1][1] == k and lr[k] == lr[k - 1] and steps[k] == steps[k - 1]:
                out[-1] = (out[-1][0], k + 1)
            else:
                out.append((k, k + 1))
        return out

    @torch.no_grad()
    def step(self) -> None:
        live = ~self.frozen
        self.steps += live.double()
        runs = self.runs()
        fused = self.fused if self.fused is not None else self.big or len(runs) <= self.FUSED_RUNS
        if fused:
            self._step_fused(runs)
        else:
            self._step_stacked()

    def _step_stacked(self) -> None:
        """torch.optim.Adam's update on every stacked tensor at once, in a few in-place passes. Frozen members
        are put back afterwards, moments and weights, so their gradients (even NaN) never reach them."""
        b1, b2 = self.betas
        steps = self.steps.clamp(min=1)
        size = (self.lr / (1 - b1 ** steps)).to(self._device, torch.float32)
        bc2_sqrt = (1 - b2 ** steps).sqrt().to(self._device, torch.float32)
        frozen = self.frozen.nonzero().flatten().to(self._device) if self.frozen.any() else None
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            g = p.grad
            kept = None if frozen is None else [t.index_select(0, frozen) for t in (p, m, v)]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt().div_(self._shaped(bc2_sqrt, p)).add_(self.eps)
            p.addcdiv_(m * self._shaped(size, p), denom, value=-1.0)
            if kept is not None:
                for t, old in zip((p, m, v), kept):
                    t.index_copy_(0, frozen, old)

    def _step_fused(self, runs: list[tuple[int, int]]) -> None:
        """torch's fused Adam kernel on each run's slices of every stacked tensor, with the run's learning rate
        and step count (the kernel reads the step, counted in `step`, as torch.optim.Adam counts it before
        calling the kernel; it does not write it)."""
        b1, b2 = self.betas
        tensors = [(p.data, p.grad, m, v) for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq)
                   if p.grad is not None]
        lr, steps = self.lr.tolist(), self.steps.tolist()
        for start, stop in runs:
            run = [[t[start:stop] for t in group] for group in zip(*tensors)]
            step = torch.tensor(steps[start], device=self._device)
            torch._fused_adam_(*run, [], [step] * len(tensors), lr=lr[start], beta1=b1, beta2=b2,
                               weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)

    def freeze(self, k: int, frozen: bool = True) -> None:
        self.frozen[k] = frozen

    def set_lrs(self, lrs: Sequence[float]) -> None:
        self.lr = torch.tensor(list(lrs), dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr.clone(), "steps": self.steps.clone(), "frozen": self.frozen.clone(),
                "exp_avg": [t.detach().cpu().clone() for t in self.exp_avg],
                "exp_avg_sq": [t.detach().cpu().clone() for t in self.exp_avg_sq]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.steps = state["lr"].clone(), state["steps"].clone()
        self.frozen = state["frozen"].clone()
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, list(state["exp_avg"]) + list(state["exp_avg_sq"])):
            dst.copy_(src.to(dst.device))


# ------------------------------------------------------------------ per-member schedules

class MemberSchedules:
    """Each member's learning rate under its schedule (`constant`, `cosine`, `plateau`): the standard
    `torch.optim.lr_scheduler` classes, each driving a one-number holder optimiser, stepped once per epoch.
    One path for any pack size: the loop copies `lrs()` into its optimiser before each epoch."""

    def __init__(self, lrs: Sequence[float], schedule: str, budget: int):
        sched = torch.optim.lr_scheduler
        self.holders = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr) for lr in lrs]
        if schedule == "cosine":  # to zero at the end of the budget: lowers the optimiser's noise floor
            self.schedulers = [sched.CosineAnnealingLR(h, T_max=budget) for h in self.holders]
        elif schedule == "plateau":  # on each member's own training loss
            self.schedulers = [sched.ReduceLROnPlateau(h, factor=0.5, patience=3, threshold=1e-3)
                               for h in self.holders]
        else:
            self.schedulers = []

    def lrs(self) -> list[float]:
        return [float(h.param_groups[0]["lr"]) for h in self.holders]

    def step(self, train_losses: Sequence[float], live: Sequence[bool]) -> None:
        for s, loss, on in zip(self.schedulers, train_losses, live):
            if not on:
                continue
            s.optimizer.step()  # the holder has no gradient: a no-op that keeps the scheduler's order check quiet
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                s.step(loss)
            else:
                s.step()

    def state_dict(self) -> dict[str, Any]:
        return {"lrs": self.lrs(), "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for h, lr in zip(self.holders, state["lrs"]):
            h.param_groups[0]["lr"] = float(lr)
        for s, sd in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(sd)
