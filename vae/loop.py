"""`train_loop(config)`: the one training loop.

Ray Train runs it on every worker (`train_func`), a Tune trial runs it in its
own process, and tests call it directly with a `LocalSession`. Rank 0 alone
evaluates and writes the results tables; every rank reports each epoch.

The loop trains a pack of K configurations of one shape (`train_pack`, vae/pack.py): one stacked model,
each member with its own seed, data order, noise, optimiser state, schedule, settle history and rows. A
pack of one is a plain trial: the plain model, torch's fused Adam, the rows and reports as ever.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

import numpy as np
import pyarrow.dataset as ds

from . import checkpoint, diagnostics, kernels, losses, pack, resume, settle, snapshots, streams, tracking
from .collapse import Thresholds, units_in_use
from .config import TrainConfig, is_resolved, resolve
from .data import Data, load, shard_indices
from .models import VAE, build_model
from .results import Results, epoch_row, file_key, kl_rows, run_root, trial_row
from .session import RayTrainSession

MI_SUBSET = 2000
IW_BATCH = 250
TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32: below it, the CPU's slow path
# What a pack reports per member each epoch (the sweep's progress line and boundary search read these).
MEMBER_KEYS = ("epoch", "test_loss", "units_in_use", "active_units", "settled", "final", "end_reason")
# Fault injection for the reliability tests: SIGKILL this worker half-way through epoch K,
# once (the marker file records that it happened, so the restarted worker goes on).
FAULT_EPOCH_ENV, FAULT_MARKER_ENV = "VAE_FAULT_KILL_EPOCH", "VAE_FAULT_MARKER"


def _fault_step(epoch: int, steps: int, rank: int) -> int:
    """The step of this epoch at which to inject the fault (-1: none); read once per epoch, not per step."""
    return steps // 2 if os.environ.get(FAULT_EPOCH_ENV) == str(epoch) and rank == 0 else -1


def _inject_fault() -> None:
    marker = os.environ.get(FAULT_MARKER_ENV, "")
    if marker and os.path.exists(marker):
        return
    if marker:
        open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


def _unwrap(model: torch.nn.Module) -> VAE:
    return model.module if hasattr(model, "module") else model  # DDP keeps the model in .module


def shard_digest(idx: torch.Tensor) -> str:
    """A short fingerprint of the indices a rank trained on in one epoch."""
    return hashlib.sha1(idx.cpu().numpy().tobytes()).hexdigest()[:16]


def train_loop(config: TrainConfig | Mapping[str, Any], session=None) -> dict[str, Any]:
    """Train one VAE as `config` says; returns the last epoch's metrics.

    `config` may also be {"members": [config, ...]}: a pack (vae/pack.py), trained as one model."""
    if isinstance(config, Mapping) and "members" in config:
        return train_pack(list(config["members"]), session)
    return train_pack([config], session)


def train_pack(configs: Sequence[TrainConfig | Mapping[str, Any]], session=None) -> dict[str, Any]:
    """Train K configurations of one shape as one packed model (a pack of one: one plain model).

    Every member writes the rows its own run would, under its own trial id; returns the last report. The
    entry points (the CLI, the Python API, a sweep's trial) hand in resolved configs; a direct caller's
    (tests, benchmarks) are resolved here, once."""
    cfgs = [c if isinstance(c, TrainConfig) else TrainConfig(**c) for c in configs]
    cfgs = [c if is_resolved(c) else resolve(c) for c in cfgs]
    if session is None:
        session = RayTrainSession()
    return _Trainer(cfgs, session).run()


def train_func(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    train_loop(config)


def train_step(model: torch.nn.Module, opt, xb: torch.Tensor, eps: torch.Tensor, weight: float | torch.Tensor,
               free_bits: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the negative ELBO; returns the batch's (recon NLL [B], KL per dim [B, L]).

    A pack: x [K, B, D], eps [S, K, B, L]; the members' objectives are summed. Their gradients stay separable
    (member k's depend on member k's slices alone, even when another's loss is NaN), and `PackAdam` leaves
    a frozen member's weights alone, so nothing needs masking here."""
    recon, kl_dims = model(xb, eps)
    loss = losses.negative_elbo(recon, kl_dims, weight, free_bits).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return recon, kl_dims


LIVE = "training"  # a member still training; else finished | diverged | interrupted


@dataclass
class _Member:
    """One configuration of a pack: its config, its own settle history and where it stands."""

    k: int
    cfg: TrainConfig
    status: str = LIVE
    settle_epoch: int = -1  # the first epoch of the current settled run of epochs
    history: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # epoch -> (KL, activity)
    last: dict[str, Any] = field(default_factory=dict)  # the last metrics it reported

    @property
    def trial_id(self) -> str:
        return self.cfg.run_id


class _Trainer:
    def __init__(self, cfgs: TrainConfig | Sequence[TrainConfig], session):
        cfgs = [cfgs] if isinstance(cfgs, TrainConfig) else list(cfgs)
        pack.check_members(cfgs)
        self.cfg, self.session = cfgs[0], session  # cfg: what the members share (vae.pack.SHAPE_KEYS)
        self.members = [_Member(k, c) for k, c in enumerate(cfgs)]
        self.k = len(cfgs)
        self.pack_id = pack.pack_id([m.trial_id for m in self.members])
        cfg = self.cfg
        self.rank, self.world = session.rank, session.world_size
        self.device = torch.device(session.device)
        if cfg.cpus_per_worker:
            torch.set_num_threads(cfg.cpus_per_worker)
        if self.device.type == "cpu":
            kernels.tune_allocator()
        self.results = Results(run_root(cfg.storage, cfg.name)) if self.rank == 0 else None
        self._load_data()
        models = []
        for m in self.members:
            torch.manual_seed(m.cfg.seed)  # the same initial weights on every rank, and as its own run would
            models.append(self._build(m.cfg))
        self.model = (models[0] if self.k == 1 else pack.stack_models(models)).to(self.device)
        if self.k == 1:
            # fused Adam: one kernel for every parameter (measured: 0.45 ms a step instead of 1.3 ms on 2 CPU cores)
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, fused=True)
        else:
            self.optimizer = pack.PackAdam(self.model.parameters(), [m.cfg.lr for m in self.members])
        self.schedules = pack.MemberSchedules([m.cfg.lr for m in self.members], cfg.schedule, cfg.budget)
        # Fixed test noise (as the 2-D Gaussian toy's tutorial does): the same eps every epoch, so test losses
        # compare across epochs; each member draws its own, as its own run would.
        n_test = self.test_x.shape[-2]
        eps = [torch.randn(cfg.num_mc, n_test, cfg.latent_dim, generator=streams.test_noise(m.cfg.seed))
               for m in self.members]
        self.test_eps = (eps[0] if self.k == 1 else torch.stack(eps, 1)).to(self.device)
        self.mi_eps = [torch.randn(min(MI_SUBSET, n_test), cfg.latent_dim, generator=streams.mi_noise(m.cfg.seed))
                       for m in self.members]
        self.kernels = self._choose_kernels()
        self.snapshot_epochs = snapshots.snapshot_epochs(cfg.budget)
        self.thresholds = Thresholds(cfg.active_threshold, cfg.kl_threshold)
        self.trackers: dict[str, Any] = {}
        # an epoch's rows of every member, written as one file per table (`_flush`)
        self.pending: dict[str, list[dict[str, Any]]] = {"epochs": [], "kl_per_dim": [], "images": []}
        self.started = time.time()
        self.last_report: dict[str, Any] = {}

    def _build(self, cfg: TrainConfig) -> VAE:
        return build_model(cfg.model, self.train_x.shape[1], cfg.latent_dim, cfg.hidden_dim, cfg.fixed_decoder_var)

    def _load_data(self) -> None:
        """Each member's splits (the 2-D toy's depend on the seed; MNIST is one): the distinct training
        splits side by side in one tensor on the device, batched by index with each member's offset."""
        sets: dict[tuple, int] = {}
        self.datas: list[Data] = []
        self.data_of: list[int] = []
        for m in self.members:
            key = (m.cfg.dataset, m.cfg.seed if m.cfg.dataset == "gaussian2d" else 0, m.cfg.subset)
            if key not in sets:
                sets[key] = len(self.datas)
                self.datas.append(load(m.cfg.dataset, m.cfg.data_dir, m.cfg.seed, m.cfg.subset))
            self.data_of.append(sets[key])
        self.data = self.datas[0]
        self.n_train = len(self.data.train)
        train = [d.train.x for d in self.datas]
        self.train_x = (train[0] if len(train) == 1 else torch.cat(train)).to(self.device)  # whole splits on the device
        self.offsets = torch.tensor([u * self.n_train for u in self.data_of])[:, None]
        # [N, D] when the members share the data (a pack's stacked layers then take it as it is), else [K, N, D]
        self.test_x = (self.data.test.x if len(self.datas) == 1 else
                       torch.stack([self.datas[u].test.x for u in self.data_of])).to(self.device)
        # One seed for every member: the same shuffle and noise, so a step's batch is gathered once and its
        # first products are one wide product for the whole pack (vae.kernels.linear).
        self.shared = self.k > 1 and len({m.cfg.seed for m in self.members}) == 1

    # ------------------------------------------------------------- trackers
    def _track(self, member: _Member, row: dict[str, Any]) -> None:
        """Per-epoch metrics to the tracker `--tracker` asks for (vae/tracking.py): one per trial."""
        if member.cfg.tracker == "none":
            return
        if member.trial_id not in self.trackers:
            self.trackers[member.trial_id] = tracking.open_tracker(member.cfg, member.trial_id)
        self.trackers[member.trial_id].log(row)

    def _end_tracking(self, member: _Member) -> None:
        tracker = self.trackers.pop(member.trial_id, None)
        if tracker is not None:
            tracker.close(member.status)

    # ------------------------------------------------------------- settle state
    def _settle(self, member: _Member, epoch: int, kl: np.ndarray, activity: np.ndarray) -> settle.SettleState:
        """Whether a member's collapse state has settled after `epoch` (rank 0; from its own history)."""
        member.history[epoch] = (kl, activity)
        trained = sorted(e for e in member.history if e >= 1)
        if not trained:
            return settle.SettleState(False, int(units_in_use(kl, activity, self.thresholds)), 0, 0, "not trained")
        state = settle.settle_state(np.stack([member.history[e][0] for e in trained]),
                                    np.stack([member.history[e][1] for e in trained]), self.thresholds,
                                    epochs_left=self.cfg.budget - epoch)
        if not state.settled:
            member.settle_epoch = -1
        elif member.settle_epoch < 0:
            member.settle_epoch = epoch
        return state

    def _load_history(self, done: int) -> None:
        """A resumed pack's per-unit histories, from its members' own `kl_per_dim/` rows (rank 0)."""
        ids = [m.trial_id for m in self.members]
        rows = self.results.read("kl_per_dim", ds.field("trial_id").isin(ids))
        by_id = {m.trial_id: m for m in self.members}
        for (tid, epoch), part in rows[rows.epoch <= done].groupby(["trial_id", "epoch"]):
            part = part.sort_values("dim")
            by_id[tid].history[int(epoch)] = (part.kl.to_numpy(), part.activity.to_numpy())

    def _write_spectrum(self) -> None:
        """For the linear VAE with a fixed decoder variance: the training split's covariance spectrum,
        once per (dataset, subset), for the map's theory column."""
        cfg = self.cfg
        if cfg.model != "linear" or cfg.fixed_decoder_var is None:
            return
        key = f"{cfg.dataset}-{cfg.subset}.parquet"
        if not self.results.read("spectrum", (ds.field("dataset") == cfg.dataset)
                                 & (ds.field("subset") == cfg.subset)).empty:
            return
        eig = diagnostics.covariance_spectrum(self.data.train.x)
        self.results.write("spectrum", [{"dataset": cfg.dataset, "subset": cfg.subset, "index": i,
                                         "eigenvalue": float(v)} for i, v in enumerate(eig)], key)

    def _choose_kernels(self) -> dict[str, Any]:
        """Time this model's training step under each CPU kernel path (on scratch copies) and keep the
        fastest (`vae.kernels.choose`); rank 0 records the choice in run.json. A pack's stacked layers
        are batched products on every path, so there is nothing to choose."""
        cfg = self.cfg
        cpu_f32 = self.device.type == "cpu" and self.train_x.dtype == torch.float32
        if not cpu_f32 or self.k > 1 or kernels.requested() != "auto":
            choice = kernels.choose(lambda: None, cpu_f32 and self.k == 1)  # forced, or nothing to time
            if self.k > 1:
                choice["reason"] = f"a pack of {self.k}: batched products (vae/pack.py)"
            choice["summary"] = kernels.describe(choice)
            self._note_in_run_json(kernels=choice)
            return choice
        scratch = copy.deepcopy(self.model)
        opt = torch.optim.Adam(scratch.parameters(), lr=cfg.lr, fused=True)
        batch = max(1, cfg.batch_size // self.world)
        gen = torch.Generator(device=self.device).manual_seed(0)
        xb = self.train_x[torch.randint(len(self.train_x), (batch,), generator=gen, device=self.device)]
        eps = torch.randn(cfg.num_mc, batch, cfg.latent_dim, generator=gen, device=self.device)

        def step() -> None:
            train_step(scratch, opt, xb, eps, cfg.beta, cfg.free_bits)

        choice = kernels.choose(step)
        choice["summary"] = kernels.describe(choice)
        self._note_in_run_json(kernels=choice)
        return choice

    def _note_in_run_json(self, **fields: Any) -> None:
        """Rank 0 of a run of its own adds to its run.json (a sweep's trials say it in their rows instead)."""
        if self.rank == 0 and self.k == 1 and self.cfg.run_id == self.cfg.name:
            self.results.update_json("run.json", **fields)

    # ------------------------------------------------------------- checkpoints
    def _restore(self) -> int:
        """Load the checkpoint vae/resume.py chooses, if any; returns the last finished epoch (0: none)."""
        with self.session.latest_checkpoint() as folder:
            if folder is None:
                return 0
            state = resume.latest_readable(folder, self.pack_id, self._say)
            gap, lacking = self._first_gap(int(state["epoch"]), resume.saved_members(state["extra"]))
            if gap >= 0:
                state = resume.before(folder, self.pack_id, gap, lacking, self._say)
                if state is None:
                    return 0
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        extra = state["extra"]
        if "schedules" in extra:
            self.schedules.load_state_dict(extra["schedules"])
        elif "scheduler" in extra and self.schedules.schedulers:  # a checkpoint from before packs
            self.schedules.schedulers[0].load_state_dict(extra["scheduler"])
            self.schedules.holders[0].param_groups[0]["lr"] = float(state["optimizer"]["param_groups"][0]["lr"])
        self.started -= float(extra.get("wall_seconds", 0.0))
        done = int(state["epoch"])
        for m, s in zip(self.members, resume.saved_members(extra)):
            m.settle_epoch, m.last = int(s.get("settle_epoch", -1)), dict(s.get("metrics", {}))
            # diverged stays so; finished is judged again (a rerun may raise the budget); interrupted goes on
            m.status = "diverged" if s.get("status") == "diverged" else self._ended(m, done)
            self._freeze(m, m.status != LIVE)
        return done

    def _first_gap(self, done: int, saved: list[dict[str, Any]]) -> tuple[int, str]:
        """`resume.first_gap` of this pack's rows: rank 0 reads the tables, every rank hears the epoch."""
        gap, lacking = -1, ""
        if self.rank == 0:
            ids = [m.trial_id for m in self.members]
            have = {t: set(zip(rows.trial_id, rows.epoch.astype(int))) for t in resume.EPOCH_TABLES
                    for rows in [self.results.read(t, ds.field("trial_id").isin(ids))]}
            gap, lacking = resume.first_gap(have, ids, saved, done)
        if self.world > 1 and dist.is_initialized():
            t = torch.tensor([gap], device=self.device)
            dist.broadcast(t, src=0)
            gap = int(t.item())
        return gap, lacking

    def _say(self, note: str, key: str) -> None:
        """A note on how the run resumed (rank 0: every rank makes the same choice): stderr, and run.json for
        a run of its own."""
        if self.rank == 0:
            print(note, file=sys.stderr, flush=True)
            self._note_in_run_json(**{key: note})

    def _ended(self, m: _Member, done: int) -> str:
        """A restored member is finished when its budget was spent or it had settled under --until-settled
        after the minimum epochs; else it trains on."""
        settled = m.cfg.until_settled and done >= m.cfg.epochs and bool(m.last.get("settled"))
        return "finished" if done >= m.cfg.budget or settled else LIVE

    def _report(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            self.session.report(metrics, None)
            return
        one = self.members[0]
        with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as folder:
            checkpoint.save(folder, model_state=_unwrap(self.model).state_dict(),
                            optimizer_state=self.optimizer.state_dict(), epoch=epoch, trial_id=self.pack_id,
                            extra={"wall_seconds": time.time() - self.started, "metrics": one.last,
                                   "settle_epoch": one.settle_epoch, "schedules": self.schedules.state_dict(),
                                   "members": [{"trial_id": m.trial_id, "status": m.status,
                                                "settle_epoch": m.settle_epoch, "metrics": m.last}
                                               for m in self.members]})
            self.session.report(metrics, folder)

    # ------------------------------------------------------------- the loop
    def live(self) -> list[_Member]:
        return [m for m in self.members if m.status == LIVE]

    def _freeze(self, m: _Member, frozen: bool = True) -> None:
        if self.k > 1:
            self.optimizer.freeze(m.k, frozen)

    def run(self) -> dict[str, Any]:
        """Train every member to its end. On CPU, denormal floats (below 1.2e-38) take the slow path, up to
        100x an operation: they build up in long runs (the decoder weights and Adam moments of MNIST's
        always-black pixels decay towards zero; a linear VAE pack's epoch went from 2 s to 14 s). So while
        the loop runs, this thread flushes them to zero (as GPUs do), and after every epoch the weights and
        optimiser moments are cleared of them (that covers torch's other threads too); the caller's
        floating-point mode is restored on the way out."""
        flushing = self.device.type == "cpu" and (torch.tensor([1e-39]) * 1.0).item() != 0.0
        if flushing:
            torch.set_flush_denormal(True)
        try:
            return self._run()
        finally:
            if flushing:
                torch.set_flush_denormal(False)

    @torch.no_grad()
    def _clear_denormals(self) -> None:
        """Denormal weights and optimiser moments set to zero (CPU; a no-op when there are none)."""
        if self.device.type != "cpu":
            return
        opt = self.optimizer
        moments = (opt.exp_avg + opt.exp_avg_sq if isinstance(opt, pack.PackAdam) else
                   [t for st in opt.state.values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq")])
        for t in list(self.model.parameters()) + moments:
            t.masked_fill_(t.abs() < TINY, 0.0)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        done = self._restore()
        self.model = self.session.prepare(self.model)
        if not self.live():  # finished before a restart: say so again, so Tune and Train see the result
            metrics = self._pack_metrics(done) if self.rank == 0 else {"epoch": done}
            self.session.report(metrics, None)
            return metrics
        if self.rank == 0:
            self._write_spectrum()
            self._load_history(done)
        metrics: dict[str, Any] = {}
        if done == 0 and self.rank == 0:
            for m in self.members:
                self._write_trial(m, "running", "", 0, {})
            evs = diagnostics.evaluate_members(_unwrap(self.model), self.test_x, self.test_eps)
            for m in self.members:
                self._evaluate_and_write(m, evs[m.k], 0, train=None, seconds=0.0)
            self._flush(0)
        for epoch in range(done + 1, cfg.budget + 1):
            t0 = time.perf_counter()
            trains = self._train_epoch(epoch)
            self._clear_denormals()
            seconds = time.perf_counter() - t0
            self._diverged(epoch, trains, seconds)
            if self.rank == 0 and self.live():
                evs = diagnostics.evaluate_members(_unwrap(self.model), self.test_x, self.test_eps)
                for m in self.live():
                    self._evaluate_and_write(m, evs[m.k], epoch, trains[m.k], seconds)
            if self.rank == 0:
                self._flush(epoch)
            live_before = [m.status == LIVE for m in self.members]
            self.schedules.step([t["loss"] for t in trains], live_before)
            asked = self.results.stop_requested() if self.rank == 0 and self.live() else None
            stop, *ending = self._agree(asked is not None, *[m.status == LIVE and bool(m.last.get("final"))
                                                             for m in self.members])
            if stop and self.rank == 0:  # a signal to the job: this epoch is whole (tables and checkpoint agree)
                reason = f"interrupted after epoch {epoch} ({asked})"
                for m in self.live():
                    m.last.update(status="interrupted", end_reason=reason)
                    self._write_trial(m, "interrupted", "", epoch, m.last)
            for m, ends in zip(self.members, ending):
                if m.status != LIVE:
                    continue
                if stop:
                    m.status = "interrupted"
                elif ends:
                    if self.rank == 0:
                        self._finish(m)
                    m.status = "finished"
                if m.status != LIVE:
                    self._freeze(m)
                    self._end_tracking(m)
            metrics = self._pack_metrics(epoch) if self.rank == 0 else {"epoch": epoch}
            metrics.update(rank=self.rank, shard_digest=trains[0]["shard_digest"],
                           param_checksum=self._param_checksum(), final=not self.live())
            self._report(epoch, metrics)
            if not self.live():
                break
        return metrics

    def _flush(self, epoch: int) -> None:
        """The epoch's `epochs/`, `kl_per_dim/` and `images/` rows of every member: one file per table, keyed by
        the pack (a trial alone: by the trial, as ever), so a redone epoch replaces it. (`latents/` keeps one
        file per trial: its latest snapshot, which a member that stopped early must keep.)"""
        for table, rows in self.pending.items():
            if rows:
                self.results.write(table, rows, file_key(self.pack_id, epoch))
            self.pending[table] = []

    def _diverged(self, epoch: int, trains: list[dict[str, float]], seconds: float) -> None:
        """A member whose training loss turned NaN/inf is recorded `diverged` at this epoch and frozen;
        the others go on, unchanged by it (every rank sees the same all-reduced losses)."""
        for m in self.live():
            train = trains[m.k]
            if math.isfinite(train["loss"]) and math.isfinite(train["kl"]):
                continue
            reason = f"train loss became {train['loss']} in epoch {epoch}"
            m.status = "diverged"
            m.last = {"epoch": epoch, "status": "diverged", "error": reason, "train_loss": float("nan"),
                      "test_loss": float("nan"), "active_units": 0, "units_in_use": 0, "final": True,
                      "end_reason": f"diverged in epoch {epoch}"}
            if self.rank == 0:
                self._write_epoch_row(m, epoch, train, None, seconds)
                self._write_trial(m, "diverged", reason, epoch, {"train_loss": train["loss"],
                                                                 "end_reason": m.last["end_reason"]})
            self._freeze(m)
            self._end_tracking(m)

    def _pack_metrics(self, epoch: int) -> dict[str, Any]:
        """What the session hears after an epoch: a pack of one, its trial's metrics (as ever); a pack,
        every member's under `members`, and the pack's own summary for Tune's schedulers and progress."""
        if self.k == 1:
            return dict(self.members[0].last) or {"epoch": epoch}
        members = {m.trial_id: {k: m.last.get(k) for k in MEMBER_KEYS} | {"status": m.status}
                   for m in self.members}
        losses_ = [m.last.get("test_loss") for m in self.members]
        finite = [v for v in losses_ if isinstance(v, float) and math.isfinite(v)]
        return {"epoch": epoch, "pack_id": self.pack_id, "members": members,
                "test_loss": min(finite) if finite else float("nan"),
                "settled": all(bool(m.last.get("settled")) for m in self.members),
                "status": "running" if self.live() else "finished"}

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """Rank 0's decisions, on every rank, in one broadcast (whether training stops after this epoch)."""
        if self.world > 1 and dist.is_initialized():
            t = torch.tensor([float(f) for f in flags], device=self.device)
            dist.broadcast(t, src=0)
            return tuple(bool(v) for v in t.tolist())
        return flags

    def _train_epoch(self, epoch: int) -> list[dict[str, float]]:
        """One epoch for every live member: each with its own shuffle and noise stream, as its own run."""
        cfg, model, opt, k = self.cfg, self.model, self.optimizer, self.k
        model.train()
        lrs = self.schedules.lrs()
        if k == 1:
            opt.param_groups[0]["lr"] = lrs[0]
        else:
            opt.set_lrs(lrs)
        drawing = self.members[:1] if self.shared else self.members  # one seed: one shuffle, one noise stream
        idx = torch.stack([shard_indices(self.n_train, self.rank, self.world, epoch, m.cfg.seed)
                           for m in drawing])  # [K, n] (or [1, n])
        flat = (idx + self.offsets[:len(drawing)]).to(self.device)
        n = idx.shape[1]
        batch = cfg.batch_size // self.world
        steps = -(-n // batch)
        gens = [streams.train_noise(m.cfg.seed, epoch, self.rank, self.device) for m in drawing]  # per epoch: resume replays exactly
        floors = [m.cfg.free_bits for m in self.members]
        # one floor per member ([K, 1, 1]) only where some member has one: a floor <= 0 is no floor
        free_bits = floors[0] if k == 1 or max(floors) <= 0 else torch.tensor(floors, device=self.device).view(k, 1, 1)
        warm = any(m.cfg.kl_warmup_epochs > 0 for m in self.members)
        weight = self._kl_weights(epoch - 1) if not warm else None
        recon_sum = torch.zeros(k, device=self.device)
        kl_sum = torch.zeros(k, device=self.device)
        fault_at = _fault_step(epoch, steps, self.rank)
        dim = self.train_x.shape[1]
        for step in range(steps):
            if step == fault_at:
                _inject_fault()
            rows = flat[:, step * batch:(step + 1) * batch]
            xb = torch.index_select(self.train_x, 0, rows.reshape(-1))  # 3x x[idx]
            size = rows.shape[1]
            if len(drawing) == 1:
                eps = torch.randn(cfg.num_mc, size, cfg.latent_dim, generator=gens[0], device=self.device)
                if k > 1:  # every member's own stream, which is the same stream
                    eps = eps.unsqueeze(1).expand(-1, k, -1, -1)
            else:
                xb = xb.view(k, size, dim)
                eps = torch.stack([torch.randn(cfg.num_mc, size, cfg.latent_dim, generator=g, device=self.device)
                                   for g in gens], 1)
            if warm:
                weight = self._kl_weights(epoch - 1 + step / steps)
            recon, kl_dims = train_step(model, opt, xb, eps, weight, free_bits)
            recon_sum += recon.detach().sum(-1).reshape(k)  # stays on the device: one host sync per epoch
            kl_sum += kl_dims.detach().sum((-2, -1)).reshape(k)
        sums = torch.stack([recon_sum, kl_sum])
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(sums)
        n_all = float(n * self.world)
        digests = [shard_digest(i) for i in idx]  # one per order drawn
        out = []
        for m, (r, kl) in zip(self.members, sums.T.tolist()):
            out.append({"loss": (r + kl) / n_all, "recon": r / n_all, "kl": kl / n_all,
                        "kl_weight": losses.kl_weight(m.cfg.beta, epoch, m.cfg.kl_warmup_epochs), "samples": n_all,
                        "lr": lrs[m.k], "shard_digest": digests[min(m.k, len(digests) - 1)]})
        return out

    def _kl_weights(self, progress: float) -> float | torch.Tensor:
        """Each member's KL weight at `progress` epochs (a float for a pack of one, else [K, 1])."""
        weights = [losses.kl_weight(m.cfg.beta, progress, m.cfg.kl_warmup_epochs) for m in self.members]
        return weights[0] if self.k == 1 else torch.tensor(weights, device=self.device).view(self.k, 1)

    def _param_checksum(self) -> float:
        """Sum of all weights: equal on every rank when DDP keeps the replicas in step."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))

    # ------------------------------------------------------------- rank 0: results
    def _member_model(self, m: _Member) -> VAE:
        """Member m as a plain model (the pack's weights for it), for snapshots and the final IW NLL."""
        model = _unwrap(self.model)
        if self.k == 1:
            return model
        plain = pack.member_model(model, self._build(m.cfg), m.k)
        plain.eval()
        return plain

    def _evaluate_and_write(self, m: _Member, ev: diagnostics.Evaluation, epoch: int,
                            train: dict[str, float] | None, seconds: float) -> None:
        cfg = m.cfg
        _unwrap(self.model).eval()
        n_mi = len(self.mi_eps[m.k])
        mu, logvar = ev.mu[:n_mi], ev.logvar[:n_mi]
        mi = diagnostics.mutual_info(mu, logvar, losses.reparameterize(mu, logvar, self.mi_eps[m.k]))
        activity = diagnostics.unit_activity(ev.mu)
        active = diagnostics.active_units(activity, cfg.active_threshold)
        state = self._settle(m, epoch, ev.kl_per_dim.numpy().astype(float), activity.numpy().astype(float))
        used = state.units_in_use  # counted by vae.collapse.in_use, with the run's thresholds
        final = epoch >= 1 and (epoch == cfg.budget or (cfg.until_settled and epoch >= cfg.epochs and state.settled))
        row = self._write_epoch_row(m, epoch, train, ev, seconds, active=active, used=used, mi=mi, state=state)
        self.pending["kl_per_dim"] += kl_rows(m.trial_id, epoch, ev.kl_per_dim.tolist(), activity.tolist())
        if epoch in self.snapshot_epochs or final:
            model, data = self._member_model(m), self.datas[self.data_of[m.k]]
            self.pending["images"] += snapshots.image_rows(model, data, m.trial_id, epoch, cfg.seed)
            self.results.write("latents", snapshots.latent_rows(ev.mu, data.test.y, m.trial_id, epoch),
                               file_key(m.trial_id))
        status = "finished" if final else "running"
        end = ("" if not final else f"settled at epoch {m.settle_epoch}" if state.settled and cfg.until_settled
               else f"epoch budget ({cfg.budget}) reached" + ("" if state.settled else f", not settled: {state.reason}"))
        m.last = {"status": status, "final": final, "settled": state.settled, "settle_epoch": m.settle_epoch,
                  "units_undecided": state.undecided, "end_reason": end,
                  "kl_per_dim": ev.kl_per_dim.tolist(), "activity": activity.tolist(),
                  **{k: row[k] for k in ("epoch", "train_loss", "train_recon", "train_kl", "test_loss", "test_recon",
                                      "test_kl", "active_units", "units_in_use", "mutual_info", "samples_per_second")}}

    def _write_epoch_row(self, m: _Member, epoch, train, ev, seconds, active=0, used=0, mi=float("nan"),
                         state: settle.SettleState | None = None) -> dict[str, Any]:
        cfg = m.cfg
        weight = train["kl_weight"] if train else losses.kl_weight(cfg.beta, 0, cfg.kl_warmup_epochs)
        test = {"loss": ev.loss, "recon": ev.recon, "kl": ev.kl} if ev else None
        lr_now = train["lr"] if train else cfg.lr
        row = epoch_row(cfg, m.trial_id, epoch, weight, train, test, active, used, mi, seconds,
                        self.kernels["summary"], lr_now, state.undecided if state else 0,
                        bool(state and state.settled))
        self.pending["epochs"].append(row)
        self._track(m, row)
        return row

    def _finish(self, m: _Member) -> None:
        cfg = m.cfg
        iw = float("nan")
        if cfg.iw_samples:
            model = self._member_model(m)
            x = self.test_x if self.test_x.dim() == 2 else self.test_x[m.k]
            x = x[:cfg.iw_subset]
            gen = streams.iw_noise(cfg.seed)
            parts = [diagnostics.iw_nll(model, x[s:s + IW_BATCH], cfg.iw_samples, gen) * len(x[s:s + IW_BATCH])
                     for s in range(0, len(x), IW_BATCH)]
            iw = sum(parts) / len(x)
        m.last["iw_nll"] = iw
        self._write_trial(m, "finished", "", int(m.last["epoch"]), m.last)

    def _write_trial(self, m: _Member, status: str, error: str, epochs_done: int, final: dict[str, Any]) -> None:
        row = trial_row(m.cfg, m.trial_id, status, error, epochs_done, final, time.time() - self.started,
                        pack_id=self.pack_id)
        self.results.write("trials", [row], file_key(m.trial_id))
