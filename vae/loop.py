"""`train_loop(config)`: the one training loop.

Ray Train runs it on every worker (`train_func`), a Tune trial runs it in its
own process, and tests call it directly with a `LocalSession`. Rank 0 alone
evaluates and writes the results tables; every rank reports each epoch.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any, Mapping

import torch
import torch.distributed as dist

import numpy as np

from . import checkpoint, diagnostics, kernels, losses, settle, snapshots, streams
from .collapse import Thresholds, units_in_use
from .config import TrainConfig, resolve
from .data import Data, load, shard_indices
from .models import VAE, build_model
from .results import Results, epoch_row, file_key, kl_rows, run_root, trial_row

MI_SUBSET = 2000
TRACKED = ("train_loss", "train_recon", "train_kl", "test_loss", "test_recon", "test_kl", "active_units",
           "units_in_use", "units_undecided", "mutual_info", "kl_weight", "lr_now", "samples_per_second")
IW_BATCH = 250
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
    """Train one VAE as `config` says; returns the last epoch's metrics."""
    cfg = resolve(config if isinstance(config, TrainConfig) else TrainConfig(**config))
    if session is None:
        from .session import RayTrainSession

        session = RayTrainSession()
    return _Trainer(cfg, session).run()


def train_func(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    train_loop(config)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, eps: torch.Tensor,
               weight: float, free_bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the negative ELBO; returns the batch's (recon NLL [B], KL per dim [B, L])."""
    recon, kl_dims = model(xb, eps)
    loss = losses.negative_elbo(recon, kl_dims, weight, free_bits)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return recon, kl_dims


class _Trainer:
    def __init__(self, cfg: TrainConfig, session):
        self.cfg, self.session = cfg, session
        self.rank, self.world = session.rank, session.world_size
        self.device = torch.device(session.device)
        if cfg.cpus_per_worker:
            torch.set_num_threads(cfg.cpus_per_worker)
        if self.device.type == "cpu":
            kernels.tune_allocator()
        self.trial_id = cfg.run_id
        self.results = Results(run_root(cfg.storage, cfg.name)) if self.rank == 0 else None
        self.data: Data = load(cfg.dataset, cfg.data_dir, cfg.seed, cfg.subset)
        self.train_x = self.data.train.x.to(self.device)  # whole split on the device, batched by index
        self.test_x = self.data.test.x.to(self.device)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = build_model(cfg.model, self.train_x.shape[1], cfg.latent_dim, cfg.hidden_dim,
                            cfg.fixed_decoder_var)
        self.model = model.to(self.device)
        # fused Adam: one kernel for every parameter (measured: 0.45 ms a step instead of 1.3 ms on 2 CPU cores)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, fused=True)
        self.scheduler = self._lr_scheduler()
        # Fixed test noise (as the 2-D Gaussian toy's tutorial does): the same eps every epoch, so test losses compare across epochs.
        n_test = len(self.test_x)
        self.test_eps = torch.randn(cfg.num_mc, n_test, cfg.latent_dim,
                                    generator=streams.test_noise(cfg.seed)).to(self.device)
        self.mi_eps = torch.randn(min(MI_SUBSET, n_test), cfg.latent_dim, generator=streams.mi_noise(cfg.seed))
        self.kernels = self._choose_kernels()
        self.snapshot_epochs = snapshots.snapshot_epochs(cfg.budget)
        self.thresholds = Thresholds(cfg.active_threshold, cfg.kl_threshold)
        self.tracker = self._tracker() if self.rank == 0 else None
        self.history: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (KL, activity) per unit
        self.settle_epoch = -1  # the first epoch of the current settled run of epochs
        self.started = time.time()
        self.last_metrics: dict[str, Any] = {}

    def _tracker(self):
        """A TensorBoard writer for this trial's per-epoch metrics (`--tracker tensorboard`), or None."""
        if self.cfg.tracker != "tensorboard":
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=f"{run_root(self.cfg.storage, self.cfg.name)}/tensorboard/{self.trial_id}")

    def _track(self, row: dict[str, Any]) -> None:
        if self.tracker is None:
            return
        for key in TRACKED:
            value = row.get(key)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.tracker.add_scalar(key, float(value), global_step=int(row["epoch"]))
        self.tracker.flush()

    def _lr_scheduler(self):
        """The learning-rate schedule, stepped once per epoch (`cfg.schedule`)."""
        sched = torch.optim.lr_scheduler
        if self.cfg.schedule == "cosine":  # to zero at the end of the budget: lowers the optimiser's noise floor
            return sched.CosineAnnealingLR(self.optimizer, T_max=self.cfg.budget)
        if self.cfg.schedule == "plateau":  # on the training loss, which every rank knows
            return sched.ReduceLROnPlateau(self.optimizer, factor=0.5, patience=3, threshold=1e-3)
        return None

    def _step_schedule(self, train_loss: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(train_loss)
        elif self.scheduler is not None:
            self.scheduler.step()

    def _settle(self, epoch: int, kl: np.ndarray, activity: np.ndarray) -> settle.SettleState:
        """Whether the collapse state has settled after `epoch` (rank 0; from this trial's own history)."""
        self.history[epoch] = (kl, activity)
        trained = sorted(e for e in self.history if e >= 1)
        if not trained:
            return settle.SettleState(False, int(units_in_use(kl, activity, self.thresholds)), 0, 0, "not trained")
        state = settle.settle_state(np.stack([self.history[e][0] for e in trained]),
                                    np.stack([self.history[e][1] for e in trained]), self.thresholds,
                                    epochs_left=self.cfg.budget - epoch)
        if not state.settled:
            self.settle_epoch = -1
        elif self.settle_epoch < 0:
            self.settle_epoch = epoch
        return state

    def _load_history(self, done: int) -> None:
        """A resumed trial's per-unit history, from its own `kl_per_dim/` rows (rank 0)."""
        import pyarrow.dataset as ds

        rows = self.results.read("kl_per_dim", ds.field("trial_id") == self.trial_id)
        for epoch, part in rows[rows.epoch <= done].groupby("epoch"):
            part = part.sort_values("dim")
            self.history[int(epoch)] = (part.kl.to_numpy(), part.activity.to_numpy())

    def _write_spectrum(self) -> None:
        """For the linear VAE with a fixed decoder variance: the training split's covariance spectrum,
        once per (dataset, subset), for the map's theory column."""
        cfg = self.cfg
        if cfg.model != "linear" or cfg.fixed_decoder_var is None:
            return
        key = f"{cfg.dataset}-{cfg.subset}.parquet"
        import pyarrow.dataset as ds

        if not self.results.read("spectrum", (ds.field("dataset") == cfg.dataset)
                                 & (ds.field("subset") == cfg.subset)).empty:
            return
        eig = diagnostics.covariance_spectrum(self.data.train.x)
        self.results.write("spectrum", [{"dataset": cfg.dataset, "subset": cfg.subset, "index": i,
                                         "eigenvalue": float(v)} for i, v in enumerate(eig)], key)

    def _choose_kernels(self) -> dict[str, Any]:
        """Time this model's training step under each CPU kernel path (on scratch copies) and keep the
        fastest (`vae.kernels.choose`); rank 0 records the choice in run.json."""
        import copy

        cfg = self.cfg
        if self.device.type != "cpu" or self.train_x.dtype != torch.float32 or kernels.requested() != "auto":
            applicable = self.device.type == "cpu" and self.train_x.dtype == torch.float32
            choice = kernels.choose(lambda: None, applicable)  # nothing to time: forced, or not CPU float32
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
        if self.rank == 0 and self.cfg.run_id == self.cfg.name:
            self.results.update_json("run.json", **fields)

    # ------------------------------------------------------------- checkpoints
    def _restore(self) -> int:
        """Load the latest checkpoint, if any; returns the last finished epoch (0: none)."""
        with self.session.latest_checkpoint() as folder:
            if folder is None:
                return 0
            try:
                state = checkpoint.load(folder, self.trial_id)
            except checkpoint.CheckpointError as damaged:
                state = self._older_checkpoint(folder, damaged)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state["extra"]:
            self.scheduler.load_state_dict(state["extra"]["scheduler"])
        self.settle_epoch = int(state["extra"].get("settle_epoch", -1))
        self.started -= float(state["extra"].get("wall_seconds", 0.0))
        self.last_metrics = dict(state["extra"].get("metrics", {}))
        return int(state["epoch"])

    def _older_checkpoint(self, folder: str, damaged: Exception) -> dict[str, Any]:
        """The latest readable checkpoint beside an unreadable one (Ray keeps the latest two): the run
        goes on from there, redoing the epochs after it, and says so (stderr, and run.json for a run)."""
        import glob

        parent = os.path.dirname(os.path.abspath(folder))
        candidates = sorted((p for p in glob.glob(os.path.join(parent, "checkpoint_*", checkpoint.FILENAME))
                             if os.path.dirname(p) != os.path.abspath(folder)), key=os.path.getmtime, reverse=True)
        for path in candidates:
            try:
                state = checkpoint.load(os.path.dirname(path), self.trial_id)
            except checkpoint.CheckpointError:
                continue
            note = (f"checkpoint {folder} could not be read ({damaged}); resumed from {os.path.dirname(path)} "
                    f"(epoch {state['epoch']}) instead")
            print(note, file=sys.stderr, flush=True)
            self._note_in_run_json(restored_from=note)
            return state
        raise damaged

    def _report(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            self.session.report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as folder:
            checkpoint.save(folder, model_state=_unwrap(self.model).state_dict(),
                            optimizer_state=self.optimizer.state_dict(), epoch=epoch, trial_id=self.trial_id,
                            extra={"wall_seconds": time.time() - self.started, "metrics": metrics,
                                   "settle_epoch": self.settle_epoch,
                                   **({"scheduler": self.scheduler.state_dict()} if self.scheduler else {})})
            self.session.report(metrics, folder)

    # ------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        done = self._restore()
        self.model = self.session.prepare(self.model)
        metrics: dict[str, Any] = {}
        settled_before = cfg.until_settled and done >= cfg.epochs and bool(self.last_metrics.get("settled"))
        if done >= cfg.budget or settled_before:  # finished before a restart: say so again, so Tune and
            metrics = self.last_metrics if self.rank == 0 else {"epoch": done}  # Train see the result
            self.session.report(metrics, None)
            return metrics
        if self.rank == 0:
            self._write_spectrum()
            self._load_history(done)
        if done == 0 and self.rank == 0:
            self._write_trial("running", "", 0, {})
            metrics = self._evaluate_and_write(0, train=None, seconds=0.0)
        for epoch in range(done + 1, cfg.budget + 1):
            t0 = time.perf_counter()
            train = self._train_epoch(epoch)
            seconds = time.perf_counter() - t0
            if not (math.isfinite(train["loss"]) and math.isfinite(train["kl"])):
                reason = f"train loss became {train['loss']} in epoch {epoch}"
                if self.rank == 0:
                    self._write_epoch_row(epoch, train, None, seconds)
                    self._write_trial("diverged", reason, epoch, {"train_loss": train["loss"],
                                                                  "end_reason": f"diverged in epoch {epoch}"})
                metrics = {"epoch": epoch, "status": "diverged", "error": reason, "train_loss": float("nan"),
                           "test_loss": float("nan"), "active_units": 0, "units_in_use": 0}
                self.session.report(metrics, None)
                return metrics
            metrics = self._evaluate_and_write(epoch, train, seconds) if self.rank == 0 else {"epoch": epoch}
            self._step_schedule(train["loss"])
            asked = self.results.stop_requested() if self.rank == 0 and not metrics.get("final") else None
            final, stop = self._agree(bool(metrics.get("final")), asked is not None)
            if stop and self.rank == 0:  # a signal to the job: this epoch is whole (tables and checkpoint agree)
                reason = f"interrupted after epoch {epoch} ({asked})"
                metrics.update(status="interrupted", end_reason=reason)
                self._write_trial("interrupted", "", epoch, {**metrics, "end_reason": reason})
            final = final or stop
            metrics.update(rank=self.rank, shard_digest=train["shard_digest"], param_checksum=self._param_checksum(),
                           final=final)
            if final and not stop and self.rank == 0:
                self._finish(metrics)
            self._report(epoch, metrics)
            if final:
                break
        return metrics

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """Rank 0's decisions, on every rank, in one broadcast (whether training stops after this epoch)."""
        if self.world > 1 and dist.is_initialized():
            t = torch.tensor([float(f) for f in flags], device=self.device)
            dist.broadcast(t, src=0)
            return tuple(bool(v) for v in t.tolist())
        return flags

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, model, opt = self.cfg, self.model, self.optimizer
        model.train()
        idx = shard_indices(len(self.train_x), self.rank, self.world, epoch, cfg.seed).to(self.device)
        batch = cfg.batch_size // self.world
        steps = -(-len(idx) // batch)
        gen = streams.train_noise(cfg.seed, epoch, self.rank, self.device)  # per epoch: resume replays exactly
        recon_sum = torch.zeros((), device=self.device)
        kl_sum = torch.zeros((), device=self.device)
        fault_at = _fault_step(epoch, steps, self.rank)
        for step in range(steps):
            if step == fault_at:
                _inject_fault()
            xb = torch.index_select(self.train_x, 0, idx[step * batch:(step + 1) * batch])  # 3x x[idx]
            eps = torch.randn(cfg.num_mc, len(xb), cfg.latent_dim, generator=gen, device=self.device)
            weight = losses.kl_weight(cfg.beta, epoch - 1 + step / steps, cfg.kl_warmup_epochs)
            recon, kl_dims = train_step(model, opt, xb, eps, weight, cfg.free_bits)
            recon_sum += recon.detach().sum()  # stays on the device: one host sync per epoch
            kl_sum += kl_dims.detach().sum()
        sums = torch.stack([recon_sum, kl_sum, torch.tensor(float(len(idx)), device=self.device)])
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(sums)
        recon_mean, kl_mean, n = sums.tolist()
        return {"loss": (recon_mean + kl_mean) / n, "recon": recon_mean / n, "kl": kl_mean / n,
                "kl_weight": losses.kl_weight(cfg.beta, epoch, cfg.kl_warmup_epochs), "samples": n,
                "lr": float(opt.param_groups[0]["lr"]),
                "shard_digest": shard_digest(idx)}

    def _param_checksum(self) -> float:
        """Sum of all weights: equal on every rank when DDP keeps the replicas in step."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))

    # ------------------------------------------------------------- rank 0: results
    def _evaluate_and_write(self, epoch: int, train: dict[str, float] | None, seconds: float) -> dict[str, Any]:
        cfg, model = self.cfg, _unwrap(self.model)
        model.eval()
        ev = diagnostics.evaluate(model, self.test_x, self.test_eps)
        n_mi = len(self.mi_eps)
        mu, logvar = ev.mu[:n_mi], ev.logvar[:n_mi]
        mi = diagnostics.mutual_info(mu, logvar, losses.reparameterize(mu, logvar, self.mi_eps))
        activity = diagnostics.unit_activity(ev.mu)
        active = diagnostics.active_units(activity, cfg.active_threshold)
        state = self._settle(epoch, ev.kl_per_dim.numpy().astype(float), activity.numpy().astype(float))
        used = state.units_in_use  # counted by vae.collapse.in_use, with the run's thresholds
        final = epoch >= 1 and (epoch == cfg.budget or (cfg.until_settled and epoch >= cfg.epochs and state.settled))
        row = self._write_epoch_row(epoch, train, ev, seconds, active=active, used=used, mi=mi, state=state)
        self.results.write("kl_per_dim", kl_rows(self.trial_id, epoch, ev.kl_per_dim.tolist(), activity.tolist()),
                           file_key(self.trial_id, epoch))
        if epoch in self.snapshot_epochs or final:
            self.results.write("images", snapshots.image_rows(model, self.data, self.trial_id, epoch, cfg.seed),
                               file_key(self.trial_id, epoch))
            self.results.write("latents", snapshots.latent_rows(ev.mu, self.data.test.y, self.trial_id, epoch),
                               file_key(self.trial_id))
        status = "finished" if final else "running"
        end = ("" if not final else f"settled at epoch {self.settle_epoch}" if state.settled and cfg.until_settled
               else f"epoch budget ({cfg.budget}) reached" + ("" if state.settled else f", not settled: {state.reason}"))
        return {"status": status, "final": final, "settled": state.settled, "settle_epoch": self.settle_epoch,
                "units_undecided": state.undecided, "end_reason": end,
                "kl_per_dim": ev.kl_per_dim.tolist(), "activity": activity.tolist(),
                **{k: row[k] for k in ("epoch", "train_loss", "train_recon", "train_kl", "test_loss", "test_recon",
                                    "test_kl", "active_units", "units_in_use", "mutual_info", "samples_per_second")}}

    def _write_epoch_row(self, epoch, train, ev, seconds, active=0, used=0, mi=float("nan"),
                         state: settle.SettleState | None = None) -> dict[str, Any]:
        cfg = self.cfg
        weight = train["kl_weight"] if train else losses.kl_weight(cfg.beta, 0, cfg.kl_warmup_epochs)
        test = {"loss": ev.loss, "recon": ev.recon, "kl": ev.kl} if ev else None
        lr_now = train["lr"] if train else cfg.lr
        row = epoch_row(cfg, self.trial_id, epoch, weight, train, test, active, used, mi, seconds,
                        self.kernels["summary"], lr_now, state.undecided if state else 0,
                        bool(state and state.settled))
        self.results.write("epochs", [row], file_key(self.trial_id, epoch))
        self._track(row)
        return row

    def _finish(self, last: dict[str, Any]) -> None:
        cfg = self.cfg
        iw = float("nan")
        if cfg.iw_samples:
            model = _unwrap(self.model)
            x = self.test_x[:cfg.iw_subset]
            gen = streams.iw_noise(cfg.seed)
            parts = [diagnostics.iw_nll(model, x[s:s + IW_BATCH], cfg.iw_samples, gen) * len(x[s:s + IW_BATCH])
                     for s in range(0, len(x), IW_BATCH)]
            iw = sum(parts) / len(x)
        last["iw_nll"] = iw
        self._write_trial("finished", "", int(last["epoch"]), {**last, "iw_nll": iw})

    def _write_trial(self, status: str, error: str, epochs_done: int, final: dict[str, Any]) -> None:
        row = trial_row(self.cfg, self.trial_id, status, error, epochs_done, final, time.time() - self.started)
        self.results.write("trials", [row], file_key(self.trial_id))
