"""python -m jobs.train: train one VAE with Ray Train and write the Parquet tables.

parse -> validate -> check data -> check the run's identity and take its lock -> start or join Ray ->
check resources -> fit -> one-line summary.
Exit codes: 0 finished, 1 the run failed or diverged, 2 bad input (nothing started), 130 / 143 stopped by
SIGINT / SIGTERM after a whole epoch (rerun the same command to resume).
"""

from __future__ import annotations

import os
import signal
import sys

from vae.config import parse_train_args

PROG = "jobs.train"
EXIT_FOR = {signal.SIGINT: 130, signal.SIGTERM: 143}


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_train_args(argv)  # exits 2 on bad input; torch and Ray are not loaded yet
    argv = list(sys.argv[1:] if argv is None else argv)
    from vae.data import DataError, preflight
    from vae.results import Results, StorageError, run_root
    from vae.runs import RunError, RunLock, check_identity

    root = run_root(cfg.storage, cfg.name)
    res = Results(root)
    lock = RunLock(root, ["python -m", PROG, *argv])
    try:
        preflight(cfg.dataset, cfg.data_dir)  # fail on bad data before any cluster work
        notes = check_identity(res, "train", cfg.to_dict())
        lock.acquire()
    except (DataError, RunError, StorageError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(cfg, args, argv, res, lock, notes)
    finally:
        lock.release()


def _run(cfg, args, argv, res, lock, notes) -> int:
    from vae import launch
    from vae.results import StorageError
    from vae.runs import RunError

    root = res.root
    if lock.took_over:
        print(f"{PROG}: took over the lock of a job that is gone ({lock.took_over.get('host')}, "
              f"pid {lock.took_over.get('pid')}, started {lock.took_over.get('started')})", flush=True)
    for note in notes:
        print(f"{PROG}: {note}", flush=True)
    moved = res.set_aside_damaged() if res.exists() else []
    for path in moved:
        print(f"{PROG}: {path} could not be read: moved aside to {os.path.basename(path)}.damaged", flush=True)
    res.clear_stop()
    launch.connect(verbose=args.verbose)
    cfg = launch.settle_scaling(cfg)
    try:
        launch.check_resources(cfg, emit=lambda line: print(f"{PROG}: {line}", flush=True))
    except RunError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    launch.record_run(root, "train", argv, cfg.to_dict())
    print(f"{PROG}: {cfg.name}: {cfg.dataset}/{cfg.model} z={cfg.latent_dim} beta={cfg.beta:g} lr={cfg.lr:g} "
          f"on {cfg.num_workers} worker(s), {'GPU' if cfg.use_gpu else 'CPU'}; results in {root}", flush=True)
    follower = launch.EpochFollower(cfg, emit=lambda line: print(line, flush=True))
    last = follower.resumed_after()
    if last is not None:
        print(f"{PROG}: resuming {cfg.name}: epochs up to {last} are done", flush=True)
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        if received:  # the second: stop at once
            print(f"{PROG}: stopping now; the epoch in flight is lost (rerun the same command to resume "
                  "from the last whole one)", file=sys.stderr, flush=True)
            launch.shutdown_quietly()
            os._exit(EXIT_FOR.get(signum, 130))
        received.append(signum)
        print(f"{PROG}: {signal.Signals(signum).name}: stopping after the epoch in flight "
              "(again to stop at once)", file=sys.stderr, flush=True)
        res.request_stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in EXIT_FOR}
    follower.start()
    try:
        # fit() off the main thread: Ray Train then leaves SIGINT to us (on the main thread it installs its
        # own handler, which aborts the run mid-epoch), and the main thread stays free to take signals.
        result = launch.in_thread(launch.fit, cfg)
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
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    res.clear_stop()
    trial = trial[trial.trial_id == cfg.run_id]
    if received:
        done = int(trial.epochs_done.iloc[0]) if len(trial) else 0
        print(f"{PROG}: interrupted: {cfg.name} stopped after epoch {done} (tables and checkpoint agree); "
              f"resume with: python -m {PROG} {' '.join(argv)}", file=sys.stderr, flush=True)
        launch.shutdown_quietly()
        return EXIT_FOR[received[0]]
    if error is not None or trial.empty:
        print(f"{PROG}: failed: {launch.error_line(error)}; results so far in {root}", file=sys.stderr)
        return 1
    row = trial.iloc[0]
    print(f"{PROG}: {row.status}: {cfg.name} test_loss={row.test_loss:.2f} iw_nll={row.iw_nll:.2f} "
          f"units_in_use={row.units_in_use}/{cfg.latent_dim} (active {row.active_units}) epochs={row.epochs_done} "
          f"settled={'yes' if row.settled else 'no'} wall={row.wall_seconds:.0f}s results={root}"
          + (f" ({row.error})" if row.error else "") + (f" [{row.end_reason}]" if row.end_reason else ""))
    return 0 if row.status == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
