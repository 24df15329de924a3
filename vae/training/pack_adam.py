"""`PackAdam`: Adam over a pack's stacked parameters (vae/training/pack.py), one learning rate, step count and freeze
flag per member; tested against `torch.optim.Adam` run member by member (tests/test_pack.py).

`fused_adam` is the one door to torch's private fused Adam kernel (`torch._fused_adam_`, what
`torch.optim.Adam(fused=True)` runs). Where this torch lacks it, PackAdam takes its stacked passes instead;
tests/test_pack.py calls it with the signature used here and fails loudly when torch changes it.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.optim.adam import adam  # the functional Adam (torch's Adam.step calls it): no torch._dynamo

FUSED_ADAM = getattr(torch, "_fused_adam_", None)  # None: PackAdam always takes the stacked passes


def fused_adam(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta1: float,
               beta2: float, eps: float) -> None:
    """One Adam update (no weight decay, no amsgrad) of every tensor in the lists, in place, by torch's fused
    kernel; `steps` are the step counts after this step, which the kernel reads and does not write."""
    FUSED_ADAM(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
               weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)


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
        if fused and FUSED_ADAM is not None:
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
            fused_adam(*run, [step] * len(tensors), lr=lr[start], beta1=b1, beta2=b2, eps=self.eps)

    def freeze(self, k: int, frozen: bool = True) -> None:
        self.frozen[k] = frozen

    def reset(self, k: int) -> None:
        """Member k as a fresh optimiser holds it: no moments, step 0, unfrozen."""
        with torch.no_grad():
            for t in self.exp_avg + self.exp_avg_sq:
                t[k].zero_()
        self.steps[k] = 0
        self.frozen[k] = False

    def set_lrs(self, lrs: Sequence[float]) -> None:
        self.lr = torch.tensor(list(lrs), dtype=torch.float64)

    def moments(self) -> list[torch.Tensor]:
        return self.exp_avg + self.exp_avg_sq

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr.clone(), "steps": self.steps.clone(), "frozen": self.frozen.clone(),
                "exp_avg": [t.detach().cpu().clone() for t in self.exp_avg],
                "exp_avg_sq": [t.detach().cpu().clone() for t in self.exp_avg_sq]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.steps = state["lr"].clone(), state["steps"].clone()
        self.frozen = state["frozen"].clone()
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, list(state["exp_avg"]) + list(state["exp_avg_sq"])):
            dst.copy_(src.to(dst.device))


class OneAdam:
    """`torch.optim.Adam(fused=True)` for a pack of one (one model), without `torch.optim.Optimizer`: the same
    update through torch's functional Adam (`torch.optim.adam.adam`, what `Adam.step` calls) on the same state,
    so the same numbers bit for bit, and `state_dict` in torch's Adam format (a checkpoint of either loads into
    the other). Why not torch's class: its first step imports torch._dynamo (for graph breaks), 1.7 CPU-s in
    every trial and worker process on 2 Xeon cores, more than a toy trial's training.

    The interface is PackAdam's for one member: `set_lrs`, `freeze` (a pack of one has nothing left to train
    instead: nothing to do), `reset`, `moments`."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.params = [p for p in params]
        self.lr, self.betas, self.eps = float(lr), tuple(betas), eps
        self.fused = all(p.device.type in ("cpu", "cuda") for p in self.params)  # where torch has the kernel
        self.state: dict[int, dict[str, torch.Tensor]] = {}  # index -> step, exp_avg, exp_avg_sq (torch's Adam)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        for i, p in live:
            if i not in self.state:  # as torch's Adam starts a parameter's state: the step a float32, on the
                # parameter's device when fused, else on the CPU
                self.state[i] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu"),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        states = [self.state[i] for i, _ in live]
        adam([p for _, p in live], [p.grad for _, p in live], [s["exp_avg"] for s in states],
             [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], fused=self.fused or None,
             amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=self.lr, weight_decay=0.0, eps=self.eps,
             maximize=False)

    def set_lrs(self, lrs: Sequence[float]) -> None:
        self.lr = float(lrs[0])

    def freeze(self, k: int, frozen: bool = True) -> None:
        pass

    def reset(self, k: int) -> None:
        """As a fresh optimiser: no state (a refilled slot)."""
        self.state.clear()

    def moments(self) -> list[torch.Tensor]:
        return [s[key] for s in self.state.values() for key in ("exp_avg", "exp_avg_sq")]

    def state_dict(self) -> dict[str, Any]:
        group = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": 0.0, "amsgrad": False,
                 "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                 "fused": self.fused or None, "decoupled_weight_decay": False,
                 "params": list(range(len(self.params)))}
        return {"state": {i: dict(s) for i, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state from `state_dict`, or from a `torch.optim.Adam` over the same parameters."""
        self.lr = float(state["param_groups"][0]["lr"])
        self.state = {}
        for i, s in state["state"].items():
            p = self.params[int(i)]
            self.state[int(i)] = {"step": s["step"].to(dtype=torch.float32, device=p.device if self.fused else "cpu",
                                                       copy=True),
                                  "exp_avg": s["exp_avg"].to(dtype=p.dtype, device=p.device, copy=True),
                                  "exp_avg_sq": s["exp_avg_sq"].to(dtype=p.dtype, device=p.device, copy=True)}


class EncoderDecoderAdam:
    """Two Adams, one over q(z|x)'s parameters and one over the decoder's, for aggressive training (He et al.
    2019): a step may update the decoder alone, or the encoders of some members only (`encoder_for`)."""

    def __init__(self, encoder, decoder):
        self.enc, self.dec = encoder, decoder

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.enc.zero_grad(set_to_none=set_to_none)
        self.dec.zero_grad(set_to_none=set_to_none)

    def step(self, encoder_for: Sequence[int] | None = None, decoder: bool = True) -> None:
        """The decoder's step (unless `decoder` is False), and the encoder's of members `encoder_for` (None: all)."""
        if decoder:
            self.dec.step()
        if encoder_for is None:
            self.enc.step()
        elif isinstance(self.enc, PackAdam):
            before = self.enc.frozen.clone()
            for k in range(self.enc.k):
                if k not in encoder_for:
                    self.enc.frozen[k] = True
            self.enc.step()
            self.enc.frozen = before
        elif 0 in encoder_for:
            self.enc.step()

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.enc.state_dict(), "decoder": self.dec.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.enc.load_state_dict(state["encoder"])
        self.dec.load_state_dict(state["decoder"])
