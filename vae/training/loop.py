"""`train_loop(config)`: the one training loop.

Ray Train runs it on every worker (`train_func`), a Tune trial runs it in its own process, and tests call it
directly with a `LocalSession`. It trains a pack of K configurations of one shape as one model (vae/training/pack.py;
a lone trial is a pack of one): each member with its own seed, data order, noise, optimiser state, schedule,
epoch count, settle history and rows. A pack may hold more configurations than slots: when a member ends, its slot
takes the next one, trained from its own fresh weights as if alone; once none is left to take, the pack keeps only
its live members' slots. Rank 0 alone evaluates and writes the tables
(vae/training/evaluation.py); every rank reports each step of the pack with a checkpoint (vae/training/restore.py).

    set up: data, models, optimiser, fixed test noise; restore the latest checkpoint
    each step: open slots take queued configurations (once none wait, ended slots are given up)
               -> every live member trains its next epoch
               -> members that diverged end -> evaluate and write rows -> schedules step
               -> decide who ends (agreed across ranks) -> report with a checkpoint
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from vae.config import TrainConfig, is_resolved, resolve
from vae.model import fast
from vae.model.data import Data, load
from vae.model.models import model_for
from vae.training import aggressive, cpu, pack, restore
from vae.training.batches import Batches
from vae.training.evaluation import Recorder
from vae.training.faults import FaultPlan
from vae.training.pack import LIVE, Members
from vae.training.session import RayTrainSession, from_rank0
from vae.training.slots import data_key, place, refill, shrink, test_noise
from vae.training.step import train_step


def train_loop(config: TrainConfig | Mapping[str, Any], session=None) -> dict[str, Any]:
    """Train one VAE as `config` says (a pack of one); returns the last epoch's metrics."""
    return train_pack([config], session)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    train_loop(config)


def train_pack(configs: Sequence[TrainConfig | Mapping[str, Any]], session=None, slots: int | None = None) -> dict[str, Any]:
    """Train configurations of one shape as one model of `slots` members (default: one for each), each slot
    taking the next configuration when its member ends; every member writes the rows its own run would, under
    its own trial id. Returns the last report. Direct callers' configs are resolved here, once."""
    cfgs = [c if isinstance(c, TrainConfig) else TrainConfig(**c) for c in configs]
    run = _set_up([c if is_resolved(c) else resolve(c) for c in cfgs], session or RayTrainSession(), slots)
    session, members, rec = run.session, run.members, run.recorder
    with cpu.flushing_denormals(run.device):
        done = run.restore()
        run.model = session.prepare(run.model)  # DDP for data-parallel runs
        if not members.busy():  # finished before a restart: say so again, so Tune and Train see the result
            metrics = members.metrics(done) if rec else {"epoch": done}
            session.report(metrics, None)
            return metrics
        if rec:
            rec.start(done, run.plain(), run.test_eps)
        metrics: dict[str, Any] = {}
        step = done
        while members.busy():
            step += 1
            refill(run, step - 1)
            if session.world_size == 1:  # once the queue is empty, ended slots cost a step nothing
                shrink(run, pack.to_shrink(members))
            t0 = time.perf_counter()  # the epoch's training time (a refilled member's set-up is not in it)
            trains = _train_epoch(run, step)
            members.slot_steps += len(members)
            cpu.clear_denormals(list(run.model.parameters()) + pack.moments(run.opt))
            seconds = time.perf_counter() - t0
            _end_diverged(run, trains, seconds)
            if rec:
                rec.evaluate(run.plain(), run.test_eps, members.live(), trains, seconds)
                rec.flush(step)
            run.schedules.step([t["loss"] for t in trains], [m.status == LIVE for m in members])
            stopped = _decide(run)
            metrics = members.metrics(step) if rec else {"epoch": step}
            metrics.update(rank=session.rank, shard_digest=trains[0]["shard_digest"],
                           param_checksum=_param_checksum(run.model), final=not members.busy())
            restore.report(session, step, metrics, members, run.plain(), run.opt, run.schedules,
                           time.time() - rec.started if rec else 0.0)
            if stopped:
                break
        return metrics


@dataclass
class _Run:
    """What the loop works on: the members, their model and optimiser, the data, and rank 0's recorder."""

    session: Any
    members: Members
    cfg: TrainConfig  # what the members share (vae.config.SHAPE_KEYS)
    device: torch.device
    datas: list[Data]
    distinct: list[tuple]  # the data key (vae.model.data.load's arguments) of each of `datas`
    train_x: torch.Tensor  # every distinct training split side by side, on the device
    n_train: int  # the size of each training split
    offsets: torch.Tensor  # [K, 1]: where slot k's member's split starts in train_x
    test_x: torch.Tensor  # [N, D] shared, or [K, N, D]: each slot's member's test split
    model: torch.nn.Module
    opt: Any
    schedules: pack.MemberSchedules
    test_eps: torch.Tensor
    recorder: Recorder | None
    fault: FaultPlan

    def restore(self) -> int:
        """Load the latest usable checkpoint (vae/training/restore.py); returns the pack's last finished step
        (0: none). Each slot then holds the member the checkpoint says, with its data and noise; a pack that had
        given up slots gives them up again first."""
        rec = self.recorder
        state = restore.choose(self.session, self.members, rec and rec.results, self.note)
        if state is None:
            return 0
        shrink(self, list(range(len(state["extra"]["members"]))))
        done, wall = restore.load(state, self.members, self.model, self.opt, self.schedules)
        for m in self.members:
            place(self, m)
        if rec:
            rec.started -= wall
        return done

    def shared(self) -> bool:
        """Every slot's member has one seed and one epoch count: one shuffle and noise stream, one batch a step."""
        return len(self.members) > 1 and len({(m.cfg.seed, m.epoch) for m in self.members}) == 1

    def plain(self) -> torch.nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model  # DDP keeps it in .module

    def note(self, **fields: Any) -> None:
        """Rank 0 of a run of its own adds to its run.json (a sweep's trials say it in their rows instead)."""
        if self.recorder and self.members.own_run():
            self.recorder.results.update_json("run.json", **fields)


def _set_up(cfgs: list[TrainConfig], session, slots: int | None = None) -> _Run:
    members, cfg = Members(cfgs, slots), cfgs[0]
    device = torch.device(session.device)
    if cfg.cpus_per_worker:
        torch.set_num_threads(cfg.cpus_per_worker)
    if device.type == "cpu":
        cpu.tune_allocator()
    # Every configuration's splits (the 2-D toy's depend on the seed; MNIST is one), the distinct ones loaded once.
    keys = [data_key(c) for c in cfgs]
    distinct = list(dict.fromkeys(keys))
    datas = [load(c.dataset, c.data_dir, c.seed, c.subset) for c in (cfgs[keys.index(key)] for key in distinct)]
    data_of = [distinct.index(data_key(m.cfg)) for m in members]
    n_train = len(datas[0].train)
    train_x = (datas[0].train.x if len(datas) == 1 else torch.cat([d.train.x for d in datas])).to(device)
    # [N, D] when the members share the data (a pack's layers then take it as it is), else [K, N, D]
    test_x = (datas[0].test.x if len(datas) == 1 else torch.stack([datas[u].test.x for u in data_of])).to(device)
    models = []
    for m in members:
        torch.manual_seed(m.cfg.seed)  # the same initial weights on every rank, and as its own run would
        models.append(model_for(m.cfg, train_x.shape[1]))
    model = fast.accelerate(pack.stack(models).to(device))
    lrs = [m.cfg.lr for m in members]
    split = cfg.mitigation == "aggressive"  # one optimiser for the encoder, one for the decoder
    # Fixed test noise (as the 2-D Gaussian toy's tutorial does): the same eps every epoch, so test losses
    # compare across epochs; each member draws its own, as its own run would.
    test_eps = pack.stack_tensors([test_noise(m.cfg, test_x.shape[-2]) for m in members], 1).to(device)
    return _Run(session=session, members=members, cfg=cfg, device=device, datas=datas, distinct=distinct,
                train_x=train_x, n_train=n_train, offsets=torch.tensor([u * n_train for u in data_of])[:, None],
                test_x=test_x, model=model, opt=pack.optimizer(model, lrs, split),
                schedules=pack.MemberSchedules(lrs, cfg.schedule, cfg.budget), test_eps=test_eps,
                recorder=Recorder(members, datas, data_of, test_x) if session.rank == 0 else None,
                fault=FaultPlan.from_env())


def _train_epoch(run: _Run, step: int) -> list[dict[str, float]]:
    """The pack's step `step`: every live member trains its next epoch, each with its own shuffle and noise
    stream for that epoch, as its own run."""
    cfg, members, device, world = run.cfg, run.members, run.device, run.session.world_size
    for m in members.live():
        m.epoch += 1
    run.model.train()
    lrs = run.schedules.lrs()
    pack.set_lrs(run.opt, lrs)
    batches = Batches(run)
    floors = [m.cfg.free_bits for m in members]
    free_bits = floors[0] if max(floors) <= 0 else pack.per_member(floors, device, 1, 1)  # <= 0: no floor
    varying = any(m.cfg.kl_warmup_epochs > 0 or m.cfg.mitigation == "cyclical" for m in members)
    weight = pack.kl_weights(members, 0.0, device)
    sums = torch.zeros(2, len(members), device=device)  # recon, KL: on the device, one host sync an epoch
    kill_at = run.fault.step_in(step, batches.steps, run.session.rank)
    iwae = cfg.objective == "iwae"
    for i, (xb, eps) in enumerate(batches):
        if i == kill_at:
            # step 1 has no checkpoint before it (epoch 0 is not reported), so nothing to wait for
            run.fault.fire(step, lambda: step <= 1 or run.session.restartable(step - 1))
        if varying:
            weight = pack.kl_weights(members, i / batches.steps, device)
        parts = {}
        ahead = aggressive.in_phase(members) if cfg.mitigation == "aggressive" else []  # in the first phase
        if ahead:  # their encoders first, then a step that leaves their encoders alone
            aggressive.encoder_steps(run, batches, i, weight, free_bits, iwae, ahead)
            parts = {"encoder_for": [m.k for m in members if m.k not in ahead]}
        recon, kl_dims = train_step(run.model, run.opt, xb, eps, weight, free_bits, iwae, **parts)
        sums[0] += recon.detach().sum(-1).reshape(-1)
        sums[1] += kl_dims.detach().sum((-2, -1)).reshape(-1)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    n_all = float(batches.idx.shape[1] * world)
    digests = batches.digests()
    return [{"loss": (r + kl) / n_all, "recon": r / n_all, "kl": kl / n_all,
             "kl_weight": pack.kl_weight(m.cfg, m.epoch), "samples": n_all, "lr": lrs[m.k],
             "shard_digest": digests[min(m.k, len(digests) - 1)]}
            for m, (r, kl) in zip(members, sums.T.tolist())]


def _end_diverged(run: _Run, trains: list[dict[str, float]], seconds: float) -> None:
    """A member whose training loss turned NaN/inf is recorded `diverged` at its epoch and frozen; the others
    go on, unchanged by it (every rank sees the same all-reduced losses)."""
    for m in run.members.live():
        train, epoch = trains[m.k], m.epoch
        if math.isfinite(train["loss"]) and math.isfinite(train["kl"]):
            continue
        m.last = {"epoch": epoch, "status": "diverged", "error": f"train loss became {train['loss']} in epoch {epoch}",
                  "train_loss": float("nan"), "test_loss": float("nan"), "active_units": 0, "units_in_use": 0,
                  "final": True, "end_reason": f"diverged in epoch {epoch}"}
        _end(run, m, "diverged", lambda rec: rec.diverged(m, epoch, train, seconds))


def _decide(run: _Run) -> bool:
    """Rank 0's decisions, agreed on every rank: members end (settled, or their budget spent), aggressive phases
    end, and the whole job stops after this step (a stop was asked for: the tables and the checkpoint agree
    on it; returns True)."""
    rec, members = run.recorder, run.members
    asked = rec.results.stop_requested() if rec and members.live() else None
    stop, *flags = from_rank0([asked is not None] + [m.status == LIVE and bool(m.last.get("final")) for m in members]
                              + [m.aggressive for m in members], run.session.world_size, run.device)
    ending = flags[:len(members)]
    for m, still in zip(members, flags[len(members):]):
        m.aggressive = bool(still)
    for m, ends in zip(members, ending):
        if m.status != LIVE:
            continue
        if stop:
            m.last.update(status="interrupted", end_reason=f"interrupted after epoch {m.epoch} ({asked})")
            _end(run, m, "interrupted", lambda rec: rec.write_trial(m, "interrupted", "", m.epoch, m.last))
        elif ends:
            _end(run, m, "finished", lambda rec: rec.finish(m, run.plain()))
    return bool(stop)


def _end(run: _Run, m: pack.Member, status: str, write) -> None:
    """A member's end: rank 0 writes what it must (`write(recorder)`) and closes its tracker; its weights freeze."""
    m.status = status
    if run.recorder:
        write(run.recorder)
        run.recorder.end_tracking(m)
    pack.freeze(run.opt, m.k)


def _param_checksum(model: torch.nn.Module) -> float:
    """Sum of all weights: equal on every rank when DDP keeps the replicas in step."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))
