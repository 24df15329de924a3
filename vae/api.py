"""The Python API: train a VAE, open a run's results, load a trained model back.

    from vae import train, open_results, load_model
    run = train(dataset="gaussian2d", model="linear", decoder_var=1, epochs=5, name="toy")
    run.epochs                        # the tables, as DataFrames
    run.plot("loss_curves")           # a matplotlib Figure (inline in a notebook)
    vae = load_model(run.root)        # the trained model, to encode, decode, sample

`train` takes the flags of `python -m jobs.train` as keyword arguments (underscores for dashes) or a
`TrainConfig`, validates them the same way (a bad value raises `ConfigError` with the CLI's one-line
message), and runs through the same function as the CLI (`run_training`). Sweeps: `tune.api.sweep`;
trained models: `vae.trained.load_model`.

Imports: torch (through Ray Train's `TorchTrainer`, in `run_training`) and matplotlib (`vae.figures.plots`) load
inside the one function each that needs them, so `open_results` and the tables stay pandas-only (0.4 s to
import, against about 3 s).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pandas as pd

from vae import launch
from vae.tables.collapse import collapse_map, final_rows, recorded_thresholds
from vae.config import ConfigError, TrainConfig, build, resolve
from vae.model.sources import DataError, preflight
from vae.tables.results import SCHEMAS, Results, StorageError, run_root
from vae.tables.runs import RunError, RunLock, check_identity

EXIT_FOR = {signal.SIGINT: 130, signal.SIGTERM: 143}


class RunFailed(RuntimeError):
    """A run that ended without finishing (failed, diverged, interrupted); the message says how."""


def train_config(config: TrainConfig | Mapping[str, Any] | None = None, **flags: Any) -> TrainConfig:
    """A resolved TrainConfig from a config object or mapping plus flag-named overrides, checked as the CLI
    checks them (`ConfigError`: one line naming the flag)."""
    values = dict(config.to_dict() if isinstance(config, TrainConfig) else config or {})
    values.update({k.replace("-", "_"): v for k, v in flags.items()})
    values = {k: (str(v) if k == "decoder_var" and not isinstance(v, str) else v) for k, v in values.items()}
    return resolve(build(TrainConfig, values, source="train()"))


def run_training(cfg: TrainConfig, argv: list[str], verbose: bool = False, emit: Callable[[str], None] = print,
                 warn: Callable[[str], None] | None = None, handle_signals: bool = False) -> tuple[int, str]:
    """The training job: data check, identity and lock, Ray, resources, fit, summary. Returns (exit code,
    last line). Codes as `jobs.train`'s: 0, 1 failed or diverged, 2 refused, 130 / 143 interrupted."""
    warn = warn or emit
    root = run_root(cfg.storage, cfg.name)
    res = Results(root)
    lock = RunLock(root, ["python -m jobs.train", *argv])
    try:
        preflight(cfg.dataset, cfg.data_dir)  # fail on bad data before any cluster work
        notes = check_identity(res, "train", cfg.to_dict())
        lock.acquire()
    except (DataError, RunError, StorageError) as e:
        return 2, f"error: {e}"
    try:
        return _fit(cfg, argv, verbose, emit, warn, handle_signals, res, lock, notes)
    finally:
        lock.release()


def _fit(cfg, argv, verbose, emit, warn, handle_signals, res, lock, notes) -> tuple[int, str]:
    root = res.root
    if lock.took_over:
        emit(f"took over the lock of a job that is gone ({lock.took_over.get('host')}, "
             f"pid {lock.took_over.get('pid')}, started {lock.took_over.get('started')})")
    for note in notes:
        emit(note)
    for path in res.set_aside_damaged() if res.exists() else []:
        emit(f"{path} could not be read: moved aside to {os.path.basename(path)}.damaged")
    res.clear_stop()
    launch.connect(verbose=verbose)
    cfg = launch.settle_scaling(cfg)
    try:
        pending = launch.check_resources(cfg, emit=emit)
    except RunError as e:
        return 2, f"error: {e}"
    launch.record_run(root, "train", argv, cfg.to_dict())
    emit(f"{cfg.name}: {cfg.dataset}/{cfg.model} z={cfg.latent_dim} beta={cfg.beta:g} lr={cfg.lr:g} "
         f"on {cfg.num_workers} worker(s), {'GPU' if cfg.use_gpu else 'CPU'}; results in {root}")
    follower = launch.EpochFollower(cfg, emit=emit)
    follower.pending = pending
    follower.watch()  # a node lost mid-run: said, and the run ends if the nodes left cannot hold it
    last = follower.resumed_after()
    if last is not None:
        emit(f"resuming {cfg.name}: epochs up to {last} are done")
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        if received:  # the second: stop at once
            warn("stopping now; the epoch in flight is lost (rerun the same command to resume from the last "
                 "whole one)")
            launch.shutdown_quietly()
            os._exit(EXIT_FOR.get(signum, 130))
        received.append(signum)
        warn(f"{signal.Signals(signum).name}: stopping after the epoch in flight (again to stop at once)")
        res.request_stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in EXIT_FOR} if handle_signals else {}
    follower.start()
    try:
        # fit() off the main thread: Ray Train then leaves SIGINT to us (on the main thread it installs its
        # own handler, which aborts the run mid-epoch), and the main thread stays free to take signals.
        result = launch.in_thread(launch.fit, cfg, abandon=lambda: bool(follower.lost))
        error = result.error
    except Exception as e:  # TrainingFailedError and friends: one line, the details are in Ray's logs
        error = e
    finally:
        follower.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    try:
        trial = res.read("trials")
    except StorageError as e:
        return 1, f"error: {e}"
    res.clear_stop()
    trial = trial[trial.trial_id == cfg.run_id]
    if received:
        done = int(trial.epochs_done.iloc[0]) if len(trial) else 0
        launch.shutdown_quietly()
        return EXIT_FOR[received[0]], (f"interrupted: {cfg.name} stopped after epoch {done} (tables and checkpoint "
                                       f"agree); resume with: python -m jobs.train {' '.join(argv)}")
    if follower.lost:  # given up on: Ray's shutdown ends the workers still waiting for a node
        launch.shutdown_quietly()
        return 1, follower.lost
    if error is not None or trial.empty:
        return 1, f"failed: {launch.error_line(error)}; results so far in {root}"
    row = trial.iloc[0]
    iw_on = "all" if not cfg.iw_subset else cfg.iw_subset
    line = (f"{row.status}: {cfg.name} test_loss={row.test_loss:.2f} iw_nll={row.iw_nll:.2f} "
            f"(k={cfg.iw_samples} on {iw_on} test images, {row.iw_seconds:.0f}s) "
            f"units_in_use={row.units_in_use}/{cfg.latent_dim} (active {row.active_units}) epochs={row.epochs_done} "
            f"settled={'yes' if row.settled else 'no'} wall={row.wall_seconds:.0f}s results={root}"
            + (f" ({row.error})" if row.error else "") + (f" [{row.end_reason}]" if row.end_reason else ""))
    return (0 if row.status == "finished" else 1), line


def train(config: TrainConfig | Mapping[str, Any] | None = None, *, verbose: bool = False,
          quiet: bool = False, **flags: Any) -> "RunResults":
    """Train one VAE (Ray Train, a local Ray instance unless one is running) and return its results.

    Keyword arguments are the CLI's flags (`latent_dim=2`, `until_settled=True`, ...). Raises `ConfigError`
    for a bad value and `RunFailed` when the run does not finish (its results so far stay on disk)."""
    cfg = train_config(config, **flags)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    code, line = run_training(cfg, argv, verbose, emit=(lambda _: None) if quiet else print)
    if code != 0:
        raise RunFailed(line)
    if not quiet:
        print(line)
    return open_results(run_root(cfg.storage, cfg.name))


# ------------------------------------------------------------------ results
@dataclass
class RunResults:
    """A run's or a sweep's folder: its tables as DataFrames, its config, and its figures."""

    root: str
    _res: Results = field(repr=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self._res = Results(self.root)

    def table(self, name: str) -> pd.DataFrame:
        if name not in SCHEMAS:
            raise KeyError(f"no table {name!r}; tables: {', '.join(SCHEMAS)}")
        return self._res.read(name)

    def __getattr__(self, name: str) -> pd.DataFrame:
        if name in SCHEMAS:
            return self.table(name)
        raise AttributeError(name)

    @property
    def info(self) -> dict[str, Any]:
        """run.json: what the folder is, the command, the config, versions."""
        return self._res.read_json("run.json") or {}

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.info.get("config", {}))

    def plot(self, name: str, trial_id: str | None = None, ax=None, **kwargs: Any):
        """A figure of `vae.figures.plots` by name, drawn from the tables it needs (one trial's, for trial figures:
        the run's own, or `trial_id`); returns the matplotlib Figure."""
        from vae.figures import plots  # matplotlib

        fn = getattr(plots, name, None)
        if fn is None or name.startswith("_"):
            raise KeyError(f"no figure {name!r}")
        if name in ("collapse_heatmaps", "brackets"):
            table = self.table("collapse_map")
            if table.empty:
                table = collapse_map(self.trials, self.epochs, self.kl_per_dim, recorded_thresholds(self._res),
                                     self.spectrum)
            return fn(table, ax=ax, **kwargs)
        if name == "rate_distortion":
            return fn(final_rows(self.trials, self.epochs, self.kl_per_dim, recorded_thresholds(self._res)),
                      ax=ax, **kwargs)
        source = {"loss_curves": "epochs", "activity_curves": "epochs", "kl_heatmap": "kl_per_dim",
                  "kl_bars": "kl_per_dim", "latent_space": "latents"}.get(name, "images")
        rows = self.table(source)
        ids = sorted(rows.trial_id.unique()) if len(rows) else []
        tid = trial_id or (ids[0] if len(ids) == 1 else None)
        if tid is None and len(ids) > 1:
            raise ValueError(f"{self.root} holds {len(ids)} trials: pass trial_id= (e.g. {ids[0]!r})")
        return fn(rows[rows.trial_id == tid] if tid else rows, ax=ax, **kwargs)


def open_results(path_or_uri: str) -> RunResults:
    """A run's or a sweep's results (`<storage>/<name>`, a local path or a pyarrow.fs URI)."""
    res = Results(path_or_uri)
    if not res.exists():
        raise FileNotFoundError(f"no results at {path_or_uri}")
    return RunResults(path_or_uri)


__all__ = ["ConfigError", "RunFailed", "RunResults", "open_results", "run_training", "train", "train_config"]
