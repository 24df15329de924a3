"""The Python API of sweeps: `sweep(...)` takes the flags of `python -m jobs.sweep` as keyword arguments
(or a `SweepConfig`), validates them the same way, and runs through the same function as the CLI
(`run_sweep`); it returns the sweep's results (`vae.api.RunResults`: tables, config, figures).

    from tune.api import sweep
    s = sweep(dataset="gaussian2d", model="linear", decoder_var=1, latent_dims="2", betas="0.3,1,3", epochs=5)
    s.collapse_map; s.plot("collapse_heatmaps")

Imports: Ray (`ray.tune`, `tune.sweep`) loads inside the functions that run a sweep, so building and checking a
SweepConfig stays light; torch loads in the trials' processes (tune/sweep.py says when the driver needs it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from vae import launch
from vae.tables import collapse
from vae.api import RunFailed, RunResults, open_results
from vae.config import ConfigError, build
from vae.model.sources import DataError, preflight
from vae.tables.results import Results, StorageError, pack_utilisation, run_root, slot_utilisation
from vae.tables.runs import RunError, RunLock, check_identity

from .space import SweepConfig, finish_parse

PROG = "jobs.sweep"


def sweep_config(config: SweepConfig | Mapping[str, Any] | None = None, **flags: Any) -> SweepConfig:
    """A resolved SweepConfig from a config object or mapping plus flag-named overrides (`ConfigError`:
    the CLI's one-line message)."""
    values = dict(config.to_dict() if isinstance(config, SweepConfig) else config or {})
    values.update({k.replace("-", "_"): (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
                   for k, v in flags.items()})
    if "decoder_var" in values and not isinstance(values["decoder_var"], str):
        values["decoder_var"] = str(values["decoder_var"])
    return finish_parse(build(SweepConfig, values, source="sweep()"))


def run_sweep(sweep: SweepConfig, argv: list[str], resume: bool = False, retry_errored: bool = False,
              verbose: bool = False, given_flags: Iterable[str] = (), emit: Callable[[str], None] = print
              ) -> tuple[int, str]:
    """The sweep job: identity and lock, Ray, resources, Tune, trials settled, collapse map, summary.
    Returns (exit code, last line): 0 done, 1 some trials errored, 2 refused."""
    from ray import tune as ray_tune

    root = run_root(sweep.storage, sweep.name)
    if resume and not ray_tune.Tuner.can_restore(root):
        return 2, f"error: --resume: no sweep to finish at {root}"
    if not resume and Results(root).exists():
        return 2, f"error: --name: {root} already exists; use --resume to finish it or pick another name"
    lock = RunLock(root, ["python -m", PROG, *argv])
    try:
        if resume:  # the recorded sweep, with only the flags given now changed (and those checked)
            sweep = resumed_config(sweep, given_flags, Results(root))
            for note in check_identity(Results(root), "sweep", sweep.to_dict()):
                emit(f"{PROG}: {note}")
        preflight(sweep.dataset, sweep.data_dir)
        lock.acquire()
    except (DataError, RunError, StorageError) as e:
        return 2, f"error: {e}"
    try:
        return _run(sweep, argv, root, resume, retry_errored, verbose, emit)
    finally:
        lock.release()


EXIT_FOR = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _graceful_signals(emit: Callable[[str], None]) -> dict:
    """SIGINT and SIGTERM end the sweep the way Ray Tune's own Ctrl-C does (its experiment state saved for
    --resume; Tune takes SIGUSR1 for that), and a second signal stops at once. Returns a record that gets
    'first' (the signal) and holds the handlers to restore ('previous')."""
    received: dict = {"previous": {}}
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return received
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours, so a SIGTERM is handled the same way

    def on_signal(signum, frame) -> None:
        if "first" in received:
            emit(f"{PROG}: stopping now")
            launch.shutdown_quietly()
            os._exit(EXIT_FOR.get(signum, 130))
        received["first"] = signum
        emit(f"{PROG}: {signal.Signals(signum).name}: ending the sweep and saving its state (again to stop at once)")
        os.kill(os.getpid(), signal.SIGUSR1)

    received["previous"] = {s: signal.signal(s, on_signal) for s in EXIT_FOR}
    return received


def sweep(config: SweepConfig | Mapping[str, Any] | None = None, *, resume: bool = False,
          retry_errored: bool = False, verbose: bool = False, quiet: bool = False, **flags: Any) -> RunResults:
    """Run a sweep (a local Ray instance unless one is running) and return its results. Raises
    `ConfigError` for a bad value and `RunFailed` when the sweep is refused or a trial errored."""
    cfg = sweep_config(config, **flags)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()] + (["--resume"] if resume else [])
    code, line = run_sweep(cfg, argv, resume, retry_errored, verbose, given_flags=flags,
                           emit=(lambda _: None) if quiet else print)
    if code != 0:
        raise RunFailed(line)
    return open_results(run_root(cfg.storage, cfg.name))


def resumed_config(sweep, given_flags, res):
    """`--resume --name N`: the sweep as run.json recorded it, with the flags given now on top."""
    info = res.read_json("run.json") or {}
    if info.get("kind") != "sweep":
        raise RunError(f"--resume: {res.root} holds no sweep (no run.json of kind sweep)")
    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    given = {k: getattr(sweep, k) for k in given_flags if k in fields}
    try:
        return SweepConfig(**{**{k: v for k, v in info["config"].items() if k in fields}, **given})
    except (ConfigError, TypeError) as e:
        raise RunError(f"--resume: {res.root}/run.json does not hold a usable sweep config ({e})") from None


def _run(sweep, argv, root, resume, retry_errored, verbose, emit) -> tuple[int, str]:
    from .sweep import settle_trials, stand_in_for_deleted_checkpoints, tuner  # Ray

    for path in Results(root).set_aside_damaged() if resume else []:
        emit(f"{PROG}: {path} could not be read: moved aside to {os.path.basename(path)}.damaged (a trial that "
             "resumes redoes that epoch; Tune does not rerun a finished trial, which keeps the gap)")
    for named, source in stand_in_for_deleted_checkpoints(root) if resume else []:
        emit(f"{PROG}: Tune's saved state names {named}, which Tune had deleted before it saved that state (the "
             f"driver stopped in between): the trial resumes from its newest checkpoint, "
             f"{os.path.basename(source)}, copied there")
    launch.connect(verbose=verbose)
    cpus, _ = launch.cluster_resources()
    try:
        launch.check_trial_resources(*sweep.resources_held())
    except RunError as e:
        return 2, f"error: {e}"
    if not resume:
        launch.record_run(root, "sweep", argv, sweep.to_dict())
    count = f"about {sweep.n_trials()}" if sweep.search == "boundary" else str(sweep.n_trials())
    emit(f"{PROG}: {sweep.name}: {count} trials ({sweep.search} search) of {sweep.dataset}/{sweep.model}, "
          + (f"until settled ({sweep.epochs} to {sweep.trial_config().budget} epochs each)" if sweep.until_settled
             else f"{sweep.epochs} epochs each") + f"; results in {root}")
    started = time.time()
    received = _graceful_signals(emit)
    try:
        grid = tuner(sweep, resume=resume, retry_errored=retry_errored, emit=emit, cluster_cpus=cpus).fit()
    finally:
        for sig, handler in received.pop("previous").items():
            signal.signal(sig, handler)
    interrupted = signal.Signals(received["first"]).name if "first" in received else ""
    settle_trials(sweep, grid, interrupted)
    if interrupted:
        launch.shutdown_quietly()
        return EXIT_FOR[received["first"]], (f"interrupted ({interrupted}): {sweep.name} stopped, its state saved; "
                                             f"finish it with: python -m {PROG} --resume --name {sweep.name}"
                                             + (f" --storage {sweep.storage}" if "--storage" in " ".join(argv) else ""))
    table = collapse.build(root, collapse.Thresholds(sweep.active_threshold, sweep.kl_threshold))
    trials = Results(root).read("trials")
    counts = trials.status.value_counts().to_dict()
    emit(f"{PROG}: {sweep.name}: {len(trials)} trials in {time.time() - started:.0f}s "
          f"({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}); collapse map: {len(table)} cells, "
          f"{int((table.frac_settled < 1).sum()) if len(table) else 0} unsettled")
    packs = pack_utilisation(trials)
    if len(packs) and (packs.slots > 1).any():
        emit(f"{PROG}: {len(packs)} packs, slot utilisation {100 * slot_utilisation(packs):.0f}% "
             f"({packs.member_epochs.sum()} member-epochs in {packs.slot_steps.sum()} slot-steps; per pack "
             f"{', '.join(f'{100 * u:.0f}%' for u in packs.utilisation)})")
    agree = collapse.theory_agreement(table)
    if agree["cells"]:
        emit(f"{PROG}: against the linear VAE's theory: {agree['match']} cells match, {agree['off']} off, "
              f"{agree['too_close']} too close to an eigenvalue to judge")
    for key, cell in table.groupby(collapse.CELL_AXES, dropna=False):
        row = cell.iloc[0]
        crit = (f"{row.critical_beta:.3g} (between {row.critical_beta_lower:g} and {row.critical_beta_upper:g})"
                if not math.isnan(row.critical_beta) else
                ("below the betas tried" if not math.isnan(row.critical_beta_upper) else
                 "above the betas tried"))
        emit(f"  latent {row.latent_dim}, lr {row.lr:g}: critical beta {crit}"
              + ("" if row.monotone else " [not monotone in beta]"))
    return (1 if grid.num_errors else 0), f"tables and collapse_map/ in {root}"


