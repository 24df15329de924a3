"""Packed trials: K models of one shape trained as one model with a leading member axis.

`stack_models` turns K models of the same class and shape into one module of that class whose parameters
are stacked: each `nn.Linear` becomes a `kernels.PackedLinear` with weight [K, out, in] and bias [K, out]
(batched products, `baddbmm`/`matmul`), any other parameter or buffer [K, 1, *shape] (a scalar [K, 1, 1])
so that it broadcasts against activations [..., K, B, F]. The model's own `encode`, `decode` and `forward`
run unchanged on x [K, B, D] and noise [S, K, B, L]; every loss and KL keeps the member axis, so members
never mix (their gradients are separable: member k's loss depends on member k's slices alone). A pack of one
is not stacked: it is the plain model.

The pack's members and where each stands (`Member`, `Members`) live here too: the loop asks them which are
live, what to report, and what to save. The optimiser for packs is vae/training/pack_adam.py; which sweep points
share a pack is tune/packing.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

import torch
from torch import nn

from vae.training import settle
from vae.tables.collapse import Thresholds, units_in_use
from vae.config import SHAPE_KEYS
from vae.model import losses
from vae.model.kernels import PackedLinear
from vae.model.models import MaskedLinear
from vae.training.pack_adam import EncoderDecoderAdam, OneAdam, PackAdam

def check_members(cfgs: Sequence[Any]) -> None:
    """Members of one pack share a shape, a run folder and the data folder, and have distinct trial ids."""
    first = cfgs[0]
    for c in cfgs[1:]:
        for key in SHAPE_KEYS + ("storage", "name", "data_dir", "tracker", "cpus_per_worker"):
            if getattr(c, key) != getattr(first, key):
                raise ValueError(f"a pack's members must share {key} ({getattr(first, key)!r} vs {getattr(c, key)!r})")
        if (c.fixed_decoder_var is None) != (first.fixed_decoder_var is None):
            raise ValueError("a pack's members must all learn the decoder variance or all fix it")
        if (c.decoder_context > 0) != (first.decoder_context > 0) or c.decoder == "pixelcnn":
            raise ValueError("a pack's members must all have a decoder context or none, and no PixelCNN decoder")
        if (c.mitigation == "aggressive") != (first.mitigation == "aggressive"):
            raise ValueError("a pack's members must all train aggressively or none")
    ids = [c.run_id for c in cfgs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a pack's members must have distinct trial ids (got {ids})")


def pack_id(trial_ids: Iterable[str]) -> str:
    """The id of a pack from its members' ids; a pack of one is its trial."""
    ids = list(trial_ids)
    if len(ids) == 1:
        return ids[0]
    return f"pack{len(ids)}-" + hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:10]


# ------------------------------------------------------------------ members

LIVE = "training"  # a member still training; else finished | diverged | interrupted
# What a pack reports per member each epoch (the sweep's progress line and boundary search read these).
MEMBER_KEYS = ("epoch", "test_loss", "units_in_use", "active_units", "settled", "final", "end_reason")


@dataclass
class Member:
    """One configuration of a pack: its config, its own settle history and where it stands."""

    k: int
    cfg: Any  # TrainConfig
    status: str = LIVE
    settle_epoch: int = -1  # the first epoch of the current settled run of epochs
    history: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # epoch -> (KL, activity)
    last: dict[str, Any] = field(default_factory=dict)  # the last metrics it reported
    aggressive: bool = False  # in aggressive training's first phase (vae/training/aggressive.py)
    best_mi: float = float("-inf")  # the highest I(x; z) of that phase so far
    epoch: int = 0  # the epochs it has trained (its own count: a refilled slot's member starts at 0)
    offset: int = 0  # the pack's step when it took its slot (its epoch e is the pack's step offset + e)

    @property
    def trial_id(self) -> str:
        return self.cfg.run_id

    def observe(self, epoch: int, kl: np.ndarray, activity: np.ndarray, thresholds: Thresholds) -> settle.SettleState:
        """Whether its collapse state has settled after `epoch`, from its own history (vae/training/settle.py)."""
        self.history[epoch] = (kl, activity)
        trained = sorted(e for e in self.history if e >= 1)
        if not trained:
            return settle.SettleState(False, int(units_in_use(kl, activity, thresholds)), 0, 0, "not trained")
        state = settle.settle_state(np.stack([self.history[e][0] for e in trained]),
                                    np.stack([self.history[e][1] for e in trained]), thresholds,
                                    epochs_left=self.cfg.budget - epoch)
        if not state.settled:
            self.settle_epoch = -1
        elif self.settle_epoch < 0:
            self.settle_epoch = epoch
        return state

    def ended_by(self, done: int) -> str:
        """A restored member is finished when its budget was spent or it had settled under --until-settled
        after the minimum epochs; else it trains on (`done`: the epochs it had trained)."""
        settled = self.cfg.until_settled and done >= self.cfg.epochs and bool(self.last.get("settled"))
        return "finished" if done >= self.cfg.budget or settled else LIVE

    def load(self, s: dict[str, Any]) -> None:
        """Its settle epoch, last metrics, epoch count and aggressive phase as `saved` gave them."""
        self.settle_epoch, self.last = int(s.get("settle_epoch", -1)), dict(s.get("metrics", {}))
        self.aggressive = bool(s.get("aggressive", self.aggressive))
        self.best_mi = float(s.get("best_mi", self.best_mi))
        self.epoch = int(s.get("epoch", self.last.get("epoch", 0)))

    def saved(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "status": self.status, "settle_epoch": self.settle_epoch,
                "metrics": self.last, "aggressive": self.aggressive, "best_mi": self.best_mi, "epoch": self.epoch,
                "offset": self.offset, "slot": self.k}


class Members(list):
    """A pack's slots, in order (the member in slot k is slice k of every stacked tensor), and its queue.

    A pack of K slots trains K configurations at once; `configs` beyond the first K wait in `queue`, and when a
    member ends (settled, diverged, its budget spent) its slot takes the next one (`refill`), which trains from
    its own seed's fresh weights with its own optimiser state, schedule and epoch count, as if alone. The
    members that left their slots are kept in `departed`. With as many slots as configurations (the default)
    nothing is queued: every member trains from the pack's first step. Once nothing waits, the loop may give
    up ended slots (`to_shrink`, `keep`)."""

    def __init__(self, cfgs: Sequence[Any], slots: int | None = None):
        check_members(cfgs)
        slots = len(cfgs) if slots is None else max(1, min(int(slots), len(cfgs)))
        super().__init__(Member(k, c, aggressive=c.mitigation == "aggressive") for k, c in enumerate(cfgs[:slots]))
        self.configs = list(cfgs)
        self.queue = list(cfgs[slots:])
        self.departed: list[Member] = []
        self.pack_id = pack_id([c.run_id for c in cfgs])
        self.slot_steps = 0  # slots x steps the pack has trained (fewer slots once it shrank: `to_shrink`)

    def live(self) -> list[Member]:
        return [m for m in self if m.status == LIVE]

    def open_slots(self) -> list[int]:
        """Slots whose member has ended while configurations still wait (in slot order, as many as wait)."""
        return [m.k for m in self if m.status != LIVE][:len(self.queue)]

    def refill(self, k: int, offset: int) -> Member:
        """Slot k's ended member departs and the next queued configuration takes the slot after step `offset`."""
        cfg = self.queue.pop(0)
        self.departed.append(self[k])
        self[k] = Member(k, cfg, aggressive=cfg.mitigation == "aggressive", offset=offset)
        return self[k]

    def keep(self, slots: Sequence[int]) -> None:
        """Only `slots` stay, renumbered 0, 1, ... in that order (a pack giving up ended slots: `shrink`); the
        members of the others depart."""
        kept = [self[k] for k in slots]
        self.departed += [m for k, m in enumerate(self) if k not in slots]
        self[:] = kept
        for k, m in enumerate(self):
            m.k = k

    def busy(self) -> bool:
        """Work left: a live member, or a configuration waiting for a slot."""
        return bool(self.live() or self.queue)

    def everyone(self) -> list[Member]:
        """Every member that has held a slot, in configuration order."""
        order = {c.run_id: i for i, c in enumerate(self.configs)}
        return sorted(self.departed + list(self), key=lambda m: order[m.trial_id])

    def own_run(self) -> bool:
        """A run of its own (not a sweep's trial): it notes how it ran in its run.json."""
        return len(self.configs) == 1 and self[0].cfg.run_id == self[0].cfg.name

    def metrics(self, epoch: int) -> dict[str, Any]:
        """What the session hears after the pack's step `epoch`, whatever the pack's size: every member's report
        under `members` (by trial id; a queued one's status is `queued`), and the pack's summary for Tune's
        schedulers and progress lines: the best member's test loss, whether all have settled, and, for a pack
        of one, its member's whole report."""
        everyone = self.everyone()
        members = {m.trial_id: {k: m.last.get(k) for k in MEMBER_KEYS} | {"status": m.status} for m in everyone}
        members |= {c.run_id: {"status": "queued"} for c in self.queue}
        finite = [v for v in (m.last.get("test_loss") for m in everyone) if isinstance(v, float) and math.isfinite(v)]
        summary = {"epoch": epoch, "pack_id": self.pack_id, "test_loss": min(finite) if finite else float("nan"),
                   "settled": not self.queue and all(bool(m.last.get("settled")) for m in everyone),
                   "status": "running" if self.busy() else "finished"}
        alone = dict(self[0].last) if len(self.configs) == 1 else {}
        return {**summary, **alone, "members": members}

    def saved(self) -> dict[str, Any]:
        """Where every member stands, for the checkpoint: the slots' members and those that departed (the queue is
        what remains of `configs`)."""
        return {"members": [m.saved() for m in self], "departed": [m.saved() for m in self.departed],
                "slot_steps": self.slot_steps}

    def restore(self, saved: dict[str, Any]) -> list[dict[str, Any]]:
        """Back to the slots a checkpoint saved (`saved`: its `extra`): which configuration each slot held, the
        departed members and the queue; returns the saved state of the slots' members, in slot order."""
        by_id = {c.run_id: c for c in self.configs}
        states = list(saved["members"])
        if len(states) != len(self):
            raise ValueError(f"the checkpoint has {len(states)} slots, this pack {len(self)}")
        for k, s in enumerate(states):
            cfg = by_id[s["trial_id"]]
            self[k] = Member(k, cfg, aggressive=cfg.mitigation == "aggressive", offset=int(s.get("offset", 0)))
        self.departed = []
        for s in saved.get("departed", ()):
            m = Member(int(s.get("slot", 0)), by_id[s["trial_id"]], offset=int(s.get("offset", 0)))
            m.load(s)
            m.status = s["status"]
            self.departed.append(m)
        held = {m.trial_id for m in self.departed} | {m.trial_id for m in self}
        self.queue = [c for c in self.configs if c.run_id not in held]
        self.slot_steps = int(saved.get("slot_steps", 0))
        return states


def to_shrink(members: Members) -> list[int]:
    """The slots a pack keeps once no configuration waits for one: its live members' (at least two: a pack of one
    is the plain model, not a stacked one); every slot when none ended or a configuration still waits."""
    live = [m.k for m in members if m.status == LIVE]
    if members.queue or not live or len(members) <= 2 or len(live) == len(members):
        return list(range(len(members)))
    idle = [m.k for m in members if m.status != LIVE]
    return sorted(live + idle[:max(0, 2 - len(live))])


def select(model: nn.Module, slots: Sequence[int]) -> nn.Module:
    """A stacked model holding only members `slots` (every parameter and buffer of a pack has the member axis
    first: `stack_models`), as a new module; the pack's own is left as it was."""
    out = copy.deepcopy(model)
    index = torch.tensor(list(slots), device=next(model.parameters()).device)
    with torch.no_grad():
        for module in out.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(p.index_select(0, index), p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.index_select(0, index)
    return out


def select_state(state: dict[str, Any], slots: Sequence[int]) -> dict[str, Any]:
    """A pack's optimiser state (`PackAdam`'s, or an `EncoderDecoderAdam`'s two) for members `slots` only."""
    if "encoder" in state:
        return {part: select_state(state[part], slots) for part in ("encoder", "decoder")}
    index = torch.tensor(list(slots))
    return {"lr": state["lr"][index], "steps": state["steps"][index], "frozen": state["frozen"][index],
            **{key: [t.index_select(0, index.to(t.device)) for t in state[key]] for key in ("exp_avg", "exp_avg_sq")}}


def per_member(values: Sequence[float], device: Any, *shape: int) -> float | torch.Tensor:
    """One value per member, as the pack's math takes it: a plain number for a pack of one, else a tensor
    [K, *shape] that broadcasts against the member axis."""
    return values[0] if len(values) == 1 else torch.tensor(list(values), device=device).view(len(values), *shape)


def stack(models: Sequence[nn.Module]) -> nn.Module:
    """The model a pack trains: the plain model for a pack of one, else the stacked one."""
    return models[0] if len(models) == 1 else stack_models(models)


def stack_tensors(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Per-member tensors with a member axis at `dim` (none for a pack of one)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(list(tensors), dim)


def shared_by_members(t: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """One tensor every member takes alike (one seed's noise), viewed with a member axis of size k at `dim`
    (none for a pack of one); a view, not a copy."""
    return t if k == 1 else t.unsqueeze(dim).expand(*t.shape[:dim], k, *t.shape[dim:])


def optimizer(model: nn.Module, lrs: Sequence[float], split: bool = False):
    """Adam for the pack: torch's fused Adam for a pack of one (`OneAdam`: one kernel for every parameter,
    0.45 ms a step instead of 1.3 ms on 2 CPU cores), else `PackAdam` (a learning rate, step count and freeze per
    member); `split`: one of them for the encoder and one for the decoder (aggressive training)."""
    def adam(params):
        return OneAdam(params, lrs[0]) if len(lrs) == 1 else PackAdam(params, lrs)

    if not split:
        return adam(model.parameters())
    encoder = {id(p) for p in model.encoder_parameters()}
    return EncoderDecoderAdam(adam([p for p in model.parameters() if id(p) in encoder]),
                              adam([p for p in model.parameters() if id(p) not in encoder]))


def _parts(opt) -> list:
    return [opt.enc, opt.dec] if isinstance(opt, EncoderDecoderAdam) else [opt]


def set_lrs(opt, lrs: Sequence[float]) -> None:
    for part in _parts(opt):
        part.set_lrs(lrs)


def freeze(opt, k: int, frozen: bool = True) -> None:
    """Member k's weights are left alone from now on (a pack of one has nothing left to train instead)."""
    for part in _parts(opt):
        part.freeze(k, frozen)


def reset(opt, k: int) -> None:
    """Member k's optimiser state as a fresh optimiser's (no moments, step 0), and unfrozen: a refilled slot."""
    for part in _parts(opt):
        part.reset(k)


def moments(opt) -> list[torch.Tensor]:
    """The optimiser's Adam moments (for clearing denormals)."""
    return [t for part in _parts(opt) for t in part.moments()]


def kl_weights(members: Sequence[Member], fraction: float, device: Any) -> float | torch.Tensor:
    """Each member's KL weight `fraction` of the way through its current epoch (`m.epoch`), as the pack's math
    takes it (`per_member`)."""
    return per_member([kl_weight(m.cfg, m.epoch - 1 + fraction) for m in members], device, 1)


def kl_weight(cfg: Any, progress: float) -> float:
    """A run's KL weight after `progress` epochs: cyclical annealing under --mitigation cyclical, else beta after
    the linear warm-up (vae.model.losses)."""
    if cfg.mitigation == "cyclical":
        return losses.cyclical_kl_weight(cfg.beta, progress, cfg.budget)
    return losses.kl_weight(cfg.beta, progress, cfg.kl_warmup_epochs)


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
    for name, module in list(template.named_modules()):
        if isinstance(module, (nn.Linear, MaskedLinear)):  # same names, same place: a member's state dict is a slice
            weight = torch.stack([t[f"{name}.weight"].detach() for t in tensors]).clone()
            bias = None if module.bias is None else torch.stack([t[f"{name}.bias"].detach() for t in tensors]).clone()
            mask = torch.stack([t[f"{name}.mask"] for t in tensors]).clone() if isinstance(module, MaskedLinear) else None
            owner, leaf = _owner(template, name)
            setattr(owner, leaf, PackedLinear(weight, bias, mask))
    for name, value in tensors[0].items():
        owner, leaf = _owner(template, name)
        if isinstance(owner, PackedLinear):
            continue
        stacked = torch.stack([t[name].detach() for t in tensors]).reshape(k, 1, *(value.shape or (1,)))
        if isinstance(value, nn.Parameter):
            owner._parameters[leaf] = nn.Parameter(stacked.clone())
        else:
            owner._buffers[leaf] = stacked.clone()
    return template


def member_slice(stacked: dict[str, torch.Tensor], k: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Member k's state dict from a pack's saved one, shaped as `like` (a plain model's state dict)."""
    return {name: stacked[name][k].reshape(t.shape).clone() for name, t in like.items()}


def load_member(packed: nn.Module, k: int, plain: nn.Module) -> None:
    """Member k of the pack takes `plain`'s weights and buffers (a pack of one: the model takes them)."""
    with torch.no_grad():
        if not any(isinstance(m, PackedLinear) for m in packed.modules()):
            packed.load_state_dict(plain.state_dict())
            return
        stacked = packed.state_dict()
        for name, t in plain.state_dict().items():
            stacked[name][k].copy_(t.reshape(stacked[name][k].shape))


def member_model(packed: nn.Module, plain: nn.Module, k: int) -> nn.Module:
    """`plain` (a freshly built model of the member's config) holding member k's weights; a pack of one's
    model is its member's."""
    if not any(isinstance(m, PackedLinear) for m in packed.modules()):
        return packed
    plain.load_state_dict(member_slice(packed.state_dict(), k, plain.state_dict()))
    return plain.to(next(packed.parameters()).device)


# ------------------------------------------------------------------ per-member schedules

BURDA_STAGES = 8


def burda_factor(epochs_done: int, budget: int) -> float:
    """The learning-rate factor 10^(-i/7) of Burda et al. (2015)'s stage i (3^i passes of 3,280 in all) that
    epoch `epochs_done + 1` falls in, the stages keeping their shares of a `budget` of epochs."""
    total = (3 ** BURDA_STAGES - 1) // 2  # 1 + 3 + ... + 3^7 = 3280
    position = (epochs_done + 0.5) * total / budget
    stage, end = 0, 1
    while position > end and stage < BURDA_STAGES - 1:
        stage += 1
        end += 3 ** stage
    return 10 ** (-stage / 7)


class RateHolder(torch.optim.Optimizer):
    """One learning rate for a `torch.optim.lr_scheduler` to drive, with no parameters to update: an optimiser
    as the schedulers see one (`param_groups`, `step`). Not built through `Optimizer.__init__`, whose
    `add_param_group` imports torch._dynamo, as a torch optimiser's first step does (see pack_adam.OneAdam)."""

    def __init__(self, lr: float):  # noqa: the base class's __init__ is what this avoids
        self.defaults = {"lr": lr}
        self.param_groups = [{"params": [], "lr": lr}]
        self.state = {}

    def step(self, closure=None) -> None:
        """Nothing to update; the schedulers check that it is called before they step."""


class MemberSchedules:
    """Each member's learning rate under its schedule (`constant`, `cosine`, `plateau`): the standard
    `torch.optim.lr_scheduler` classes, each driving a one-number holder optimiser, stepped once per epoch.
    One path for any pack size: the loop copies `lrs()` into its optimiser before each epoch."""

    def __init__(self, lrs: Sequence[float], schedule: str, budget: int):
        sched = torch.optim.lr_scheduler
        self.holders = [RateHolder(lr) for lr in lrs]
        if schedule == "cosine":  # to zero at the end of the budget: lowers the optimiser's noise floor
            self.schedulers = [sched.CosineAnnealingLR(h, T_max=budget) for h in self.holders]
        elif schedule == "burda":  # Burda et al. 2015: stage i of 3^i passes at lr * 10^(-i/7), i = 0..7
            self.schedulers = [sched.LambdaLR(h, lambda epoch: burda_factor(epoch, budget)) for h in self.holders]
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
            s.optimizer.step()  # a no-op that keeps the scheduler's order check quiet
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                s.step(loss)
            else:
                s.step()

    def reset(self, k: int, lr: float, schedule: str, budget: int) -> None:
        """Slot k's schedule from its start, at `lr` (a refilled slot)."""
        fresh = MemberSchedules([lr], schedule, budget)
        self.holders[k] = fresh.holders[0]
        if self.schedulers:
            self.schedulers[k] = fresh.schedulers[0]

    def keep(self, slots: Sequence[int]) -> None:
        """Only the schedules of `slots` stay, in that order (a pack giving up ended slots)."""
        self.holders = [self.holders[k] for k in slots]
        if self.schedulers:
            self.schedulers = [self.schedulers[k] for k in slots]

    def state_dict(self) -> dict[str, Any]:
        return {"lrs": self.lrs(), "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for h, lr in zip(self.holders, state["lrs"]):
            h.param_groups[0]["lr"] = float(lr)
        for s, sd in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(sd)
