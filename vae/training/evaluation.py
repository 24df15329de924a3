"""Evaluation and its rows (rank 0): each epoch's test-set diagnostics of every member, written to the
results tables (vae/tables/results.py) and the member's tracker.

Per member and epoch: the fixed-noise test loss, KL per unit, unit activity, units in use (with the run's
thresholds), whether the collapse state has settled (vae/training/settle.py); at snapshot epochs and the last (and
every epoch of an aggressive phase), mutual information on `MI_SUBSET` test images; at snapshot epochs, images
and latents; at the end, the IW NLL on `iw_subset` test images.
An epoch's rows of every member are written as one file per table (`flush`), keyed by the pack, so a redone
epoch replaces them.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import pyarrow.dataset as ds
import torch

from vae.model import diagnostics, fast, losses, streams
from vae.training import aggressive, snapshots, tracking
from vae.tables.collapse import Thresholds, units_in_use
from vae.model.data import Data
from vae.model.models import VAE, model_for
from vae.training.pack import Member, Members, member_model
from vae.tables.results import Results, epoch_row, file_key, kl_rows, run_root, trial_row

MI_SUBSET = 2000
IW_BATCH = 250
IMPLEMENTATION = "torch"  # the `kernels` column: which implementation trained (vae/model/fast.py: one since the probe went)


class Recorder:
    """Rank 0's evaluation and writing for one pack."""

    def __init__(self, members: Members, datas: list[Data], data_of: list[int], test_x: torch.Tensor):
        cfg = members[0].cfg
        self.members, self.datas, self.data_of, self.test_x = members, datas, data_of, test_x
        self.results = Results(run_root(cfg.storage, cfg.name))
        n_test = test_x.shape[-2]
        self.mi_eps = [torch.randn(min(MI_SUBSET, n_test), cfg.latent_dim, generator=streams.mi_noise(m.cfg.seed))
                       for m in members]
        self.snapshot_epochs = snapshots.snapshot_epochs(cfg.budget)
        self.thresholds = Thresholds(cfg.active_threshold, cfg.kl_threshold)
        self.trackers: dict[str, Any] = {}
        self.pending: dict[str, list[dict[str, Any]]] = {"epochs": [], "kl_per_dim": [], "images": []}
        self.started = time.time()
        self.began: dict[str, float] = {}  # when a refilled slot's member began (the others: `started`)

    # ------------------------------------------------------------- the run's start
    def start(self, done: int, model: VAE, test_eps: torch.Tensor) -> None:
        """Before training: the spectrum table (linear VAE), resumed settle histories, and at a fresh start every
        member's 'running' trial row and epoch 0 (the untrained model)."""
        self.write_spectrum()
        self.load_history(done)
        if done:
            return
        self.begin(list(self.members), model, test_eps)
        self.flush(0)

    def begin(self, members: Sequence[Member], model: VAE, test_eps: torch.Tensor) -> None:
        """Members that take their slots now: their 'running' trial rows and their epoch 0 (the untrained model;
        written with the pack's next `flush`)."""
        for m in members:
            self.write_trial(m, "running", "", 0, {})
        self.evaluate(model, test_eps, members, None, 0.0)

    def keep(self, slots: Sequence[int], test_x: torch.Tensor) -> None:
        """Only `slots` stay, renumbered in order (the pack gave up the others: vae/training/loop.py's `shrink`),
        with the pack's test images as they now are."""
        self.test_x = test_x
        self.data_of = [self.data_of[k] for k in slots]
        self.mi_eps = [self.mi_eps[k] for k in slots]

    def place(self, m: Member, data_index: int) -> None:
        """Slot m.k now holds member m, whose data is `datas[data_index]`: its own fixed MI noise."""
        self.data_of[m.k] = data_index
        self.mi_eps[m.k] = torch.randn(len(self.mi_eps[m.k]), m.cfg.latent_dim, generator=streams.mi_noise(m.cfg.seed))

    def write_spectrum(self) -> None:
        """For the linear VAE with a fixed decoder variance: the training split's covariance spectrum, once per
        (dataset, subset), for the map's theory column."""
        cfg = self.members[0].cfg
        if cfg.model != "linear" or cfg.fixed_decoder_var is None:
            return
        if not self.results.read("spectrum", (ds.field("dataset") == cfg.dataset)
                                 & (ds.field("subset") == cfg.subset)).empty:
            return
        eig = diagnostics.covariance_spectrum(self.datas[0].train.x)
        self.results.write("spectrum", [{"dataset": cfg.dataset, "subset": cfg.subset, "index": i,
                                         "eigenvalue": float(v)} for i, v in enumerate(eig)],
                           f"{cfg.dataset}-{cfg.subset}.parquet")

    def load_history(self, done: int) -> None:
        """A resumed pack's per-unit histories, from its live members' own `kl_per_dim/` rows (up to the epoch
        each had trained at the checkpoint)."""
        by_id = {m.trial_id: m for m in self.members}
        rows = self.results.read("kl_per_dim", ds.field("trial_id").isin(list(by_id)))
        upto = [by_id[t].epoch for t in rows.trial_id]
        for (tid, epoch), part in rows[rows.epoch.to_numpy() <= upto].groupby(["trial_id", "epoch"]):
            part = part.sort_values("dim")
            by_id[tid].history[int(epoch)] = (part.kl.to_numpy(), part.activity.to_numpy())

    # ------------------------------------------------------------- each epoch
    def evaluate(self, model: VAE, test_eps: torch.Tensor, members: Sequence[Member], trains: Sequence[dict] | None,
                 seconds: float) -> None:
        """`members`' diagnostics on the test set after their latest epoch (`m.epoch`), into their rows and `m.last`:
        on the first `eval_subset` test images (0: all), and a member's last epoch on all of them."""
        if not members:
            return
        n = self.members[0].cfg.eval_subset or self.test_x.shape[-2]
        evs = diagnostics.evaluate_members(model, self.test_x[..., :n, :], test_eps[..., :n, :])
        for m in members:
            self._evaluate_member(m, model, test_eps, evs[m.k], m.epoch, trains[m.k] if trains else None, seconds)

    def _whole_test_set(self, model: VAE, test_eps: torch.Tensor, m: Member) -> diagnostics.Evaluation:
        """Member m on every test image, with its fixed test noise (its last epoch under --eval-subset)."""
        x = self.test_x if self.test_x.dim() == 2 else self.test_x[m.k]
        eps = test_eps if len(self.members) == 1 else test_eps[:, m.k]
        return diagnostics.evaluate(self.member_model(model, m), x, eps)

    def _mutual_info(self, m: Member, ev: diagnostics.Evaluation) -> float:
        """I(x; z) on the first MI_SUBSET images with the member's fixed noise."""
        n_mi = min(len(self.mi_eps[m.k]), len(ev.mu))
        mu, logvar = ev.mu[:n_mi], ev.logvar[:n_mi]
        return diagnostics.mutual_info(mu, logvar, losses.reparameterize(mu, logvar, self.mi_eps[m.k][:n_mi]))

    def _evaluate_member(self, m: Member, model: VAE, test_eps: torch.Tensor, ev: diagnostics.Evaluation, epoch: int,
                         train: dict[str, float] | None, seconds: float) -> None:
        """Member m's row after `epoch`. Each unit's KL and activity every epoch (the settle rule's); I(x; z), an
        O(N^2) estimate that cost about a third of an epoch's evaluation, at the snapshot epochs, the last, and
        every epoch of an aggressive phase (which ends on it); images and latents at the snapshot epochs and the
        last."""
        cfg = m.cfg
        model.eval()
        activity, active = _activity(ev, cfg.active_threshold)
        state = m.observe(epoch, ev.kl_per_dim.numpy().astype(float), activity.numpy().astype(float), self.thresholds)
        used = state.units_in_use  # counted by vae.tables.collapse.in_use, with the run's thresholds
        final = epoch >= 1 and (epoch == cfg.budget or (cfg.until_settled and epoch >= cfg.epochs and state.settled))
        snapshot = epoch in self.snapshot_epochs or final
        if final and len(ev.mu) < self.test_x.shape[-2]:  # the numbers it ends with: on the whole test set
            ev = self._whole_test_set(model, test_eps, m)
            activity, active = _activity(ev, cfg.active_threshold)
            used = units_in_use(ev.kl_per_dim.numpy(), activity.numpy(), self.thresholds)
        mi = self._mutual_info(m, ev) if snapshot or m.aggressive else float("nan")
        aggressive.end_of_epoch(m, mi)  # aggressive training's phase ends once I(x; z) stops rising
        row = self.epoch_row(m, epoch, train, ev, seconds, active=active, used=used, mi=mi, state=state)
        self.pending["kl_per_dim"] += kl_rows(m.trial_id, epoch, ev.kl_per_dim.tolist(), activity.tolist())
        if snapshot:
            plain, data = self.member_model(model, m), self.datas[self.data_of[m.k]]
            self.pending["images"] += snapshots.image_rows(plain, data, m.trial_id, epoch, cfg.seed)
            self.results.write("latents", snapshots.latent_rows(ev.mu, data.test.y, m.trial_id, epoch),
                               file_key(m.trial_id))
        end = ("" if not final else f"settled at epoch {m.settle_epoch}" if state.settled and cfg.until_settled
               else f"epoch budget ({cfg.budget}) reached" + ("" if state.settled else f", not settled: {state.reason}"))
        m.last = {"status": "finished" if final else "running", "final": final, "settled": state.settled,
                  "settle_epoch": m.settle_epoch, "units_undecided": state.undecided, "end_reason": end,
                  "kl_per_dim": ev.kl_per_dim.tolist(), "activity": activity.tolist(),
                  **{k: row[k] for k in ("epoch", "train_loss", "train_recon", "train_kl", "test_loss", "test_recon",
                                      "test_kl", "active_units", "units_in_use", "mutual_info", "samples_per_second")}}

    def epoch_row(self, m: Member, epoch, train, ev, seconds, active=0, used=0, mi=float("nan"),
                  state=None) -> dict[str, Any]:
        cfg = m.cfg
        weight = train["kl_weight"] if train else losses.kl_weight(cfg.beta, 0, cfg.kl_warmup_epochs)
        test = {"loss": ev.loss, "recon": ev.recon, "kl": ev.kl} if ev else None
        row = epoch_row(cfg, m.trial_id, epoch, weight, train, test, active, used, mi, seconds, IMPLEMENTATION,
                        train["lr"] if train else cfg.lr, state.undecided if state else 0,
                        bool(state and state.settled), len(ev.mu) if ev else 0)
        self.pending["epochs"].append(row)
        if cfg.tracker != "none":  # per-epoch metrics to the tracker `--tracker` asks for: one per trial
            if m.trial_id not in self.trackers:
                self.trackers[m.trial_id] = tracking.open_tracker(cfg, m.trial_id)
            self.trackers[m.trial_id].log(row)
        return row

    def flush(self, step: int) -> None:
        """The pack's step's `epochs/`, `kl_per_dim/` and `images/` rows of every member: one file per table,
        keyed by the pack (a trial alone: by the trial) and the step, so a redone step replaces it. (`latents/` keeps one file per
        trial: its latest snapshot, which a member that stopped early must keep.)"""
        for table, rows in self.pending.items():
            if rows:
                self.results.write(table, rows, file_key(self.members.pack_id, step))
            self.pending[table] = []

    # ------------------------------------------------------------- a member's end
    def member_model(self, model: VAE, m: Member) -> VAE:
        """Member m as a plain model (the pack's weights for it), for snapshots and the final IW NLL."""
        plain = member_model(model, model_for(m.cfg, self.datas[0].train.x.shape[1]), m.k)
        if plain is not model:
            fast.accelerate(plain).eval()
        return plain

    def finish(self, m: Member, model: VAE) -> None:
        """A member that ended well: its IW NLL on `iw_subset` test images (0: all), and its trial row."""
        cfg, iw, t0 = m.cfg, float("nan"), time.perf_counter()
        if cfg.iw_samples:
            plain = self.member_model(model, m)
            x = self.test_x if self.test_x.dim() == 2 else self.test_x[m.k]
            x = x[:cfg.iw_subset] if cfg.iw_subset else x
            gen = streams.iw_noise(cfg.seed)
            parts = [diagnostics.iw_nll(plain, x[s:s + IW_BATCH], cfg.iw_samples, gen) * len(x[s:s + IW_BATCH])
                     for s in range(0, len(x), IW_BATCH)]
            iw = sum(parts) / len(x)
        m.last.update(iw_nll=iw, iw_seconds=time.perf_counter() - t0)
        self.write_trial(m, "finished", "", int(m.last["epoch"]), m.last)

    def diverged(self, m: Member, epoch: int, train: dict[str, float], seconds: float) -> None:
        self.epoch_row(m, epoch, train, None, seconds)
        self.write_trial(m, "diverged", m.last["error"], epoch, {"train_loss": train["loss"],
                                                               "end_reason": m.last["end_reason"]})

    def write_trial(self, m: Member, status: str, error: str, epochs_done: int, final: dict[str, Any]) -> None:
        began = self.began.setdefault(m.trial_id, time.time() if m.offset else self.started)
        row = trial_row(m.cfg, m.trial_id, status, error, epochs_done, final, time.time() - began,
                        pack_id=self.members.pack_id, pack_slots=len(self.members), pack_offset=m.offset,
                        pack_slot_steps=self.members.slot_steps)
        self.results.write("trials", [row], file_key(m.trial_id))

    def end_tracking(self, m: Member) -> None:
        tracker = self.trackers.pop(m.trial_id, None)
        if tracker is not None:
            tracker.close(m.status)


def _activity(ev: diagnostics.Evaluation, threshold: float) -> tuple[torch.Tensor, int]:
    """Each unit's activity (the variance of its posterior mean over the test images) and the active units' count."""
    activity = diagnostics.unit_activity(ev.mu)
    return activity, diagnostics.active_units(activity, threshold)
