"""The sweep under Ray Tune: one trial per configuration, each running the same train_loop.

With one worker per trial the trial trains inside its Tune process; with more,
the trial launches a Ray Train TorchTrainer (a V2 trainer cannot be passed to
Tune directly) and forwards its reports with TuneReportCallback.

torch and the loop load inside `trial`, in the trial's own process. The driver imports torch only to size a
pack's members (`tune.packing.member_bytes`, on torch's meta device) with `--pack` above 1: its data checks
(`vae.model.sources`), its run record and its Tune callbacks (`driver_callbacks`) do without it.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import posixpath
import time
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from vae import launch
from vae.tables.collapse import reported_units_in_use
from vae.launch import error_line
from vae.tables.results import Results, file_key, run_root, trial_row

from .points import member_report, trial_key
from .space import SweepConfig


def members(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The points a Tune trial trains (its pack's `members`; a pack of one is a trial of one point)."""
    return [dict(p) for p in config.get("members", ())]


def member_results(config: dict[str, Any], result: dict[str, Any] | None) -> list[tuple[dict, dict]]:
    """(point, its latest report) for every member of a trial: the loop reports each under `members`."""
    return [(p, member_report(result, trial_key(p))) for p in members(config)]


def trial(config: dict[str, Any]) -> None:
    """Tune function trainable: the sweep's settings plus this trial's point in the space (or a pack's)."""
    sweep = SweepConfig(**config["sweep"])  # resolved once, by the driver
    points = members(config)
    if sweep.workers_per_trial == 1:
        import torch

        from vae.training.loop import train_pack
        from vae.training.session import TuneSession

        device = "cuda" if sweep.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
        train_pack([sweep.trial_config(trial_id=trial_key(p), **p) for p in points], TuneSession(device),
                   slots=config.get("slots"))
    else:  # one point a trial (--pack needs one worker a trial)
        (where,) = points
        trial_id = trial_key(where)
        cfg = sweep.trial_config(trial_id=trial_id, **where)
        # Ray Train V2's callback: imported once `launch.connect` has set RAY_TRAIN_V2_ENABLED
        from ray.tune.integration.ray_train import TuneReportCallback

        # A stable Train run name per trial: a retried trial resumes its Train run.
        launch.fit(cfg, run_name=f"train-{trial_id}", run_storage=run_root(sweep.storage, sweep.name),
                   callbacks=[TuneReportCallback()])


def collapsed(result: dict) -> bool:
    """A trial's latest report has no unit in use (the loop counts them with the run's thresholds)."""
    return result.get("status") != "diverged" and reported_units_in_use(result) == 0


class CollapseKeepingASHA(ASHAScheduler):
    """ASHA on test loss that never stops a trial because it collapsed: collapsed trials are the data."""

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and collapsed(result):
            return TrialScheduler.CONTINUE
        return decision


class StopWhenSettled(FIFOScheduler):
    """Stops a trial once its collapse state has settled (its cell is answered) after the minimum epochs,
    never before: the Tune-level twin of the loop's own --until-settled stop, for sweeps that keep a
    fixed budget but need not spend it."""

    def __init__(self, min_epochs: int):
        super().__init__()
        self.min_epochs = min_epochs

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("settled") and int(result.get("epoch", 0)) >= self.min_epochs:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


ENDED = ("finished", "diverged")  # a member's status in a pack's report once it trains no more


class Progress(tune.Callback):
    """One concise line whenever the sweep's state changes (Tune's own table stays off)."""

    def __init__(self, total: int | str, emit=print):
        self.total, self.emit = total, emit
        self.started = time.time()
        self.last: dict[str, list[tuple[dict, dict]]] = {}  # Tune trial -> (point, latest report) per member
        self.size: dict[str, int] = {}  # Tune trial -> configurations it trains
        self.running: set[str] = set()
        self.done: set[str] = set()
        self.errored: set[str] = set()
        self.line = ""
        self.counts: tuple = ()
        self.said_at = 0.0

    def _say(self) -> None:
        """Counts are of configurations (a pack's members each count once), not of Tune trials."""
        finals = [r for t in self.done for _, r in self.last.get(t, [])]
        losses = [r["test_loss"] for rs in self.last.values() for _, r in rs
                  if isinstance(r.get("test_loss"), float) and math.isfinite(r["test_loss"])]
        n_collapsed = sum(1 for r in finals if collapsed(r))
        diverged = sum(1 for r in finals if r.get("status") == "diverged")
        done, running, errored = (sum(self.size.get(t, 1) for t in group)
                                  for group in (self.done, self.running, self.errored))
        ended = sum(1 for t in self.running for _, r in self.last.get(t, []) if r.get("status") in ENDED)
        queued = sum(1 for t in self.running for _, r in self.last.get(t, []) if r.get("status") == "queued")
        # a pack's members that stopped early (settled, diverged), and those still waiting for a slot
        done, running = done + ended, running - ended - queued
        total = int(str(self.total).lstrip("~"))
        pending = max(0, total - done - errored - running)
        line = (f"trials {done}/{self.total} done, {running} running, {pending} pending, "
                f"{errored} errored | best test loss " + (f"{min(losses):.2f}" if losses else "-"))
        line += f" | collapsed {n_collapsed}, diverged {diverged}"
        counts = (done, errored)  # a trial starting alone does not make a new line
        now = time.time()
        if counts != self.counts or (line != self.line and now - self.said_at >= 10):  # at most every 10 s
            self.line, self.counts, self.said_at = line, counts, now
            self.emit(f"[{now - self.started:6.0f}s] {line}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self.size[trial.trial_id] = max(1, len(members(trial.config or {})))
        self._say()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = member_results(trial.config or {}, result)
        self._say()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done.add(trial.trial_id)
        self._say()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.errored.add(trial.trial_id)
        self._say()


def trial_memory(sweep: SweepConfig, slots: int) -> float:
    """Bytes of device memory one trial may use: its share of a GPU (total memory as torch reports it here,
    when this process sees the GPU), else its share of the cluster's memory resource (0: unknown)."""
    if sweep.gpus_per_trial > 0:
        import torch

        return (torch.cuda.get_device_properties(0).total_memory * sweep.gpus_per_trial
                if torch.cuda.is_available() else 0.0)
    return float(ray.cluster_resources().get("memory", 0.0)) / max(1, slots)


def trainable(sweep: SweepConfig):
    return tune.with_resources(trial, sweep.trial_resources())


def tuner(sweep: SweepConfig, resume: bool = False, retry_errored: bool = False, emit=print,
          cluster_cpus: int = 0) -> tune.Tuner:
    root = run_root(sweep.storage, sweep.name)
    progress = Progress(f"~{sweep.n_trials()}" if sweep.search == "boundary" else sweep.n_trials(), emit)
    if resume:
        restored = tune.Tuner.restore(root, trainable=trainable(sweep), resume_unfinished=True,
                                      resume_errored=False, restart_errored=retry_errored)
        set_restored_callbacks(restored, driver_callbacks(progress))
        return restored
    max_concurrent = sweep.max_concurrent or None
    if sweep.workers_per_trial > 1 and not max_concurrent and cluster_cpus:
        # Tune counts only the trial process, not its Train workers: cap by what the workers need.
        max_concurrent = max(1, int(cluster_cpus // sweep.resources_held()[0]))
    constants = {"sweep": sweep.to_dict()}
    search_alg = None
    slots = max_concurrent or max(1, int(cluster_cpus // sweep.cpus_per_trial))
    pack = sweep.pack_size(slots, trial_memory(sweep, slots))
    if pack > 1:
        emit(f"jobs.sweep: packs of {pack} slots a trial, each slot refilled from its pack's queue "
             "(vae/training/pack.py)")
    if sweep.search == "boundary":
        from .boundary import BoundarySearcher

        cells = [(z, lr) for z in sweep.axis("latent_dims") for lr in sweep.axis("lrs")]
        lo, hi = sweep.axis("beta_range")
        # with packs, a round's points for a cell are trained together: the round may be as wide as a pack
        search_alg = BoundarySearcher(cells, (lo, hi), sweep.beta_tolerance, sweep.repeats, sweep.seed, constants,
                                      slots * pack, pack=pack)
    scheduler = {"asha": lambda: CollapseKeepingASHA(max_t=sweep.trial_config().budget, reduction_factor=3,
                                                     grace_period=max(1, sweep.epochs // 4)),
                 "settled": lambda: StopWhenSettled(sweep.epochs)}.get(sweep.scheduler, lambda: None)()
    return tune.Tuner(
        trainable(sweep),
        param_space=constants if search_alg else {**constants, **sweep.param_space(pack, slots)},
        # Reusing trial processes saves a Python start, the torch import and the data load per trial.
        tune_config=tune.TuneConfig(reuse_actors=sweep.workers_per_trial == 1, num_samples=-1 if search_alg else 1,
                                    search_alg=search_alg,
                                    max_concurrent_trials=max_concurrent, scheduler=scheduler,
                                    metric="test_loss" if scheduler else None, mode="min" if scheduler else None),
        run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.storage, verbose=0,
                                  callbacks=driver_callbacks(progress),
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )


def checkpoints_named_by_saved_state(root: str) -> dict[str, str]:
    """{trial folder: the checkpoint folder Tune's saved experiment state names as that trial's latest}, paths
    under `root` (the newest `experiment_state-*.json`, the one `Tuner.restore` reads; its entries are read with
    Tune's own decoder). Empty when there is no state, or one it cannot read."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    res = Results(root)
    state_file = _find_newest_experiment_checkpoint(res.path, fs=res.fs)
    if state_file is None:
        return {}
    try:
        with res.fs.open_input_stream(state_file) as src:
            state = json.loads(src.read().decode())
        managers = [_TrainingRunMetadata.from_json_state(run_metadata).checkpoint_manager
                    for _, run_metadata in state.get("trial_data", [])]
        paths = [m.latest_checkpoint_result.checkpoint.path.rstrip("/") for m in managers
                 if m is not None and m.latest_checkpoint_result is not None]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pickle.UnpicklingError):
        return {}  # a state this cannot read is Tune's to report, when it restores
    named = {}
    for path in paths:  # as the state recorded it; the storage may have moved since
        trial_dir = posixpath.basename(posixpath.dirname(path))
        named[f"{res.path}/{trial_dir}"] = f"{res.path}/{trial_dir}/{posixpath.basename(path)}"
    return named


def stand_in_for_deleted_checkpoints(root: str) -> list[tuple[str, str]]:
    """Before a sweep resumes: where Tune's saved state names a checkpoint that is gone, copy the newest one kept
    in that trial's folder (the last written: after an earlier mend, Tune's numbers no longer say) under the
    missing name; returns (the name, the copy's source) for each.

    Tune deletes a trial's superseded checkpoint as soon as it registers a newer one (we keep two), but saves the
    experiment's state only at the end of that step, and uploads it after: a driver killed in between leaves a
    state whose latest checkpoint for the trial is gone, and Tune then fails the trial on restore ("does not exist
    on storage anymore"; Tune once fell back to the latest checkpoint kept itself, ray-project/ray#29099, and Ray
    Train V2 saves its state before it deletes). The copy is of a later step than the one named (Tune keeps the
    newest), so the trial resumes where it was; Tune numbers its next checkpoints after the named one and
    overwrites the folders with those numbers as it goes.
    """
    fs = Results(root).fs
    made = []
    for trial_dir, named in checkpoints_named_by_saved_state(root).items():
        if fs.get_file_info(named).type != pafs.FileType.NotFound:
            continue
        written: dict[str, float] = {}  # each kept checkpoint folder: when its newest file was written (none:
        # the trial's folder itself is gone, nothing to resume it from, and Tune says so)
        for i in fs.get_file_info(pafs.FileSelector(trial_dir, recursive=True, allow_not_found=True)):
            parts = posixpath.relpath(i.path, trial_dir).split("/")
            if len(parts) > 1 and parts[0].startswith("checkpoint_") and i.type == pafs.FileType.File:
                folder = f"{trial_dir}/{parts[0]}"
                written[folder] = max(written.get(folder, 0.0), i.mtime.timestamp() if i.mtime else 0.0)
        if not written:
            continue
        newest = max(written, key=lambda folder: (written[folder], folder))
        if isinstance(fs, pafs.LocalFileSystem):  # under a hidden name, then renamed: never half a checkpoint
            part = f"{trial_dir}/.{posixpath.basename(named)}.part"
            if fs.get_file_info(part).type != pafs.FileType.NotFound:
                fs.delete_dir(part)
            fs.create_dir(part)
            pafs.copy_files(newest, part, source_filesystem=fs, destination_filesystem=fs)
            fs.move(part, named)
        else:  # an object store renames no folder, and each file (a checkpoint is one) lands whole or not at all
            pafs.copy_files(newest, named, source_filesystem=fs, destination_filesystem=fs)
        made.append((named, newest))
    return made


def driver_callbacks(progress) -> list:
    """The driver's Tune callbacks: our progress line, and Tune's JSON and CSV loggers (each trial's
    result.json and progress.csv), without the TensorBoardX logger that Tune adds by default: it imports torch
    into the driver (about 2.4 CPU-s; the trials import it in their own processes) to write what
    `--tracker tensorboard` writes from inside the loop with more in it. Tune adds its loggers itself unless
    this process's environment says not to, so this says it (for the rest of the process, as
    `tune.api._graceful_signals` turns Tune's own SIGINT handler off)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return [progress, JsonLoggerCallback(), CSVLoggerCallback()]


def set_restored_callbacks(restored: tune.Tuner, callbacks: list) -> None:
    """Give a restored Tuner our callbacks: they are not saved with the experiment's state.

    Ray has no public way to do this (ray-project/ray#41364), so this reaches into the Tuner's private
    run config, here alone; `tests/test_sweep.py` fails loudly if Ray moves it.
    """
    restored._local_tuner._run_config.callbacks = callbacks


def settle_trials(sweep: SweepConfig, grid, interrupted: str = "") -> None:
    """Make `trials/` say how every trial ended: errored ones 'failed' with the error, stopped ones 'stopped'
    (by the scheduler) or, when the sweep was `interrupted` by a signal, 'interrupted'."""
    res = Results(run_root(sweep.storage, sweep.name))
    table = res.read("trials").set_index("trial_id")
    epochs = res.read("epochs")
    for result in grid:
        for where in members(result.config or {}):
            _settle_one(sweep, res, table, epochs, where, result.error, interrupted)


def _settle_one(sweep, res, table, epochs, where: dict[str, Any], failure, interrupted: str) -> None:
    """`settle_trials` for one configuration (a trial, or one member of a pack)."""
    tid = trial_key(where)
    known = table.loc[tid] if tid in table.index else None
    if failure is None and (known is None or known.status != "running"):
        return
    status = "failed" if failure is not None else "interrupted" if interrupted else "stopped"
    error = error_line(failure)[:500] if failure else "stopped early by the scheduler"
    mine = epochs[epochs.trial_id == tid]
    done = int(mine.epoch.max()) if len(mine) else 0
    last = mine[mine.epoch == done]
    final = last.iloc[0].to_dict() if len(last) else {}
    final.pop("iw_nll", None)
    if failure is None and interrupted:
        final["end_reason"] = f"interrupted after epoch {done} ({interrupted}); --resume continues it"
        error = ""
    elif failure is None:
        settled = bool(final.get("settled"))
        final["end_reason"] = f"stopped by the scheduler at epoch {done}" + (" (settled)" if settled else "")
        error = "" if settled else error
    wall = float(known.wall_seconds) if known is not None else float("nan")
    cfg = sweep.trial_config(trial_id=tid, **where)
    pack = str(known.pack_id) if known is not None and isinstance(known.pack_id, str) else tid
    where_packed = {k: int(known[k]) for k in ("pack_slots", "pack_offset", "pack_slot_steps")
                    if known is not None and pd.notna(known[k])}  # as the loop last wrote them
    res.write("trials", [trial_row(cfg, tid, status, error, done, final, wall, pack_id=pack, **where_packed)],
              file_key(tid))
