"""python -m jobs.train: train one VAE with Ray Train and write the Parquet tables.

parse -> validate -> check data -> start or join Ray -> fit -> one-line summary.
Exit codes: 0 finished, 1 the run failed or diverged, 2 bad input (nothing started).
"""

from __future__ import annotations

import sys

from vae.config import parse_train_args

PROG = "jobs.train"


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_train_args(argv)  # exits 2 on bad input; torch and Ray are not loaded yet
    from vae.data import DataError, preflight
    from vae.results import Results, run_root

    try:
        preflight(cfg.dataset, cfg.data_dir)  # fail on bad data before any cluster work
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    from vae import launch

    launch.connect(verbose=args.verbose)
    cfg = launch.settle_scaling(cfg)
    root = run_root(cfg.storage, cfg.name)
    launch.record_run(root, "train", list(sys.argv[1:] if argv is None else argv), cfg.to_dict())
    print(f"{PROG}: {cfg.name}: {cfg.dataset}/{cfg.model} z={cfg.latent_dim} beta={cfg.beta:g} lr={cfg.lr:g} "
          f"on {cfg.num_workers} worker(s), {'GPU' if cfg.use_gpu else 'CPU'}; results in {root}", flush=True)
    follower = launch.EpochFollower(cfg, emit=lambda line: print(line, flush=True))
    last = follower.resumed_after()
    if last is not None:
        print(f"{PROG}: resuming {cfg.name}: epochs up to {last} are done", flush=True)
    follower.start()
    try:
        result = launch.fit(cfg)
        error = result.error
    except Exception as e:  # TrainingFailedError and friends: one line, the details are in Ray's logs
        error = e
    finally:
        follower.stop()
    trial = Results(root).read("trials")
    trial = trial[trial.trial_id == cfg.run_id]
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
