"""A pack's slots changing hands (vae/training/pack.py's `Members`): a queued configuration takes an ended member's
slot (`refill`), each slot's per-member data follows the member it holds (`place`), and once nothing waits the
pack gives up its ended slots (`shrink`). The loop (vae/training/loop.py) calls them between steps, on every rank
alike."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vae.config import TrainConfig
from vae.model import fast, streams
from vae.model.models import model_for
from vae.training import pack


def data_key(c: TrainConfig) -> tuple:
    """Which training split a configuration trains on (vae.model.data.load's arguments): the 2-D toy's depend on
    the seed; MNIST's is one."""
    return c.dataset, c.seed if c.dataset == "gaussian2d" else 0, c.subset


def test_noise(c: TrainConfig, n_test: int) -> torch.Tensor:
    """A configuration's fixed test noise [S, N, L] (the same every epoch, as its own run draws it)."""
    return torch.randn(c.num_mc, n_test, c.latent_dim, generator=streams.test_noise(c.seed))


def place(run: Any, m: pack.Member) -> None:
    """Slot m.k's per-member data for the member it now holds: its split, test images and fixed test noise."""
    k, u = m.k, run.distinct.index(data_key(m.cfg))
    run.offsets[k] = u * run.n_train
    noise = test_noise(m.cfg, run.test_x.shape[-2]).to(run.device)
    if len(run.members) == 1:
        run.test_eps.copy_(noise)
    else:
        run.test_eps[:, k] = noise
    if run.test_x.dim() == 3:
        run.test_x[k] = run.datas[u].test.x.to(run.device)
    if run.recorder:
        run.recorder.place(m, u)


def refill(run: Any, offset: int) -> None:
    """Each slot whose member has ended takes the next queued configuration after the pack's step `offset`:
    that configuration's fresh weights (from its seed, as its own run), a fresh optimiser state and schedule,
    its data and noise; rank 0 writes its 'running' row and epoch 0. The same on every rank (the ends were
    agreed)."""
    fresh = []
    for k in run.members.open_slots():
        m = run.members.refill(k, offset)
        torch.manual_seed(m.cfg.seed)
        pack.load_member(run.plain(), k, model_for(m.cfg, run.train_x.shape[1]).to(run.device))
        pack.reset(run.opt, k)
        run.schedules.reset(k, m.cfg.lr, m.cfg.schedule, m.cfg.budget)
        place(run, m)
        fresh.append(m)
    if fresh and run.recorder:
        run.recorder.begin(fresh, run.plain(), run.test_eps)


def shrink(run: Any, slots: Sequence[int]) -> None:
    """Only `slots` train from now on (`pack.to_shrink`: once the queue is empty, the live members'): the stacked
    model, its optimiser state, the schedules, each slot's data offset, test images and noise keep those members'
    slices, renumbered in order; the others depart. A member's numbers do not change (its slices are its own),
    while a step's work falls with the slots. The loop shrinks a running pack only without data parallelism
    (the session has wrapped that model); a restore shrinks to the checkpoint's slots before the session wraps it."""
    slots = list(slots)
    if len(slots) == len(run.members):
        return
    model = fast.accelerate(pack.select(run.plain(), slots))
    opt = pack.optimizer(model, [run.members[k].cfg.lr for k in slots], run.cfg.mitigation == "aggressive")
    opt.load_state_dict(pack.select_state(run.opt.state_dict(), slots))
    run.model, run.opt = model, opt
    run.schedules.keep(slots)
    run.members.keep(slots)
    index = torch.tensor(slots, device=run.device)
    run.offsets = run.offsets[slots]
    run.test_eps = run.test_eps.index_select(1, index)
    if run.test_x.dim() == 3:
        run.test_x = run.test_x.index_select(0, index)
    if run.recorder:
        run.recorder.keep(slots, run.test_x)
