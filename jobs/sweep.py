"""python -m jobs.sweep: map posterior collapse over latent size, learning rate and beta with Ray Tune.

parse -> validate -> check data -> start or join Ray -> Tune (or restore) -> settle trials
-> collapse map -> summary. Exit codes: 0 done, 1 some trials errored, 2 bad input (nothing started).
"""

from __future__ import annotations

import math
import sys
import time

from tune.space import parse_sweep_args

PROG = "jobs.sweep"


def main(argv: list[str] | None = None) -> int:
    sweep, args = parse_sweep_args(argv)  # exits 2 on bad input; torch and Ray are not loaded yet
    from vae.data import DataError, preflight
    from vae.results import Results, run_root

    root = run_root(sweep.storage, sweep.name)
    from ray import tune as ray_tune

    if args.resume and not ray_tune.Tuner.can_restore(root):
        print(f"{PROG}: error: --resume: no sweep to finish at {root}", file=sys.stderr)
        return 2
    if not args.resume and Results(root).exists():
        print(f"{PROG}: error: --name: {root} already exists; use --resume to finish it or pick another name",
              file=sys.stderr)
        return 2
    from vae.results import StorageError
    from vae.runs import RunError, RunLock, check_identity

    lock = RunLock(root, ["python -m", PROG, *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.resume:  # the recorded sweep, with only the flags given now changed (and those checked)
            sweep = resumed_config(sweep, args, Results(root))
            for note in check_identity(Results(root), "sweep", sweep.to_dict()):
                print(f"{PROG}: {note}", flush=True)
        preflight(sweep.dataset, sweep.data_dir)
        lock.acquire()
    except (DataError, RunError, StorageError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(sweep, args, argv, root)
    finally:
        lock.release()


def resumed_config(sweep, args, res):
    """`--resume --name N`: the sweep as run.json recorded it, with the flags given now on top."""
    import dataclasses

    from tune.space import SweepConfig
    from vae.config import ConfigError
    from vae.runs import RunError

    info = res.read_json("run.json") or {}
    if info.get("kind") != "sweep":
        raise RunError(f"--resume: {res.root} holds no sweep (no run.json of kind sweep)")
    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    given = {k: getattr(sweep, k) for k in vars(args) if k in fields}
    try:
        return SweepConfig(**{**{k: v for k, v in info["config"].items() if k in fields}, **given})
    except (ConfigError, TypeError) as e:
        raise RunError(f"--resume: {res.root}/run.json does not hold a usable sweep config ({e})") from None


def _run(sweep, args, argv, root) -> int:
    from tune.sweep import settle_trials, tuner
    from vae import collapse, launch
    from vae.results import Results
    from vae.runs import RunError

    launch.connect(verbose=args.verbose)
    cpus, _ = launch.cluster_resources()
    try:
        launch.check_trial_resources(sweep.cpus_per_trial, sweep.gpus_per_trial, sweep.workers_per_trial)
    except RunError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if not args.resume:
        launch.record_run(root, "sweep", list(sys.argv[1:] if argv is None else argv), sweep.to_dict())
    count = f"about {sweep.n_trials()}" if sweep.search == "boundary" else str(sweep.n_trials())
    print(f"{PROG}: {sweep.name}: {count} trials ({sweep.search} search) of {sweep.dataset}/{sweep.model}, "
          + (f"until settled ({sweep.epochs} to {sweep.trial_config().budget} epochs each)" if sweep.until_settled
             else f"{sweep.epochs} epochs each") + f"; results in {root}", flush=True)
    started = time.time()
    grid = tuner(sweep, resume=args.resume, retry_errored=args.retry_errored,
                 emit=lambda line: print(line, flush=True), cluster_cpus=cpus).fit()
    settle_trials(sweep, grid)
    table = collapse.build(root, collapse.Thresholds(sweep.active_threshold, sweep.kl_threshold))
    trials = Results(root).read("trials")
    counts = trials.status.value_counts().to_dict()
    print(f"{PROG}: {sweep.name}: {len(trials)} trials in {time.time() - started:.0f}s "
          f"({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}); collapse map: {len(table)} cells, "
          f"{int((table.frac_settled < 1).sum()) if len(table) else 0} unsettled")
    agree = collapse.theory_agreement(table)
    if agree["cells"]:
        print(f"{PROG}: against the linear VAE's theory: {agree['match']} cells match, {agree['off']} off, "
              f"{agree['too_close']} too close to an eigenvalue to judge")
    for key, cell in table.groupby(collapse.CELL_AXES, dropna=False):
        row = cell.iloc[0]
        crit = (f"{row.critical_beta:.3g} (between {row.critical_beta_lower:g} and {row.critical_beta_upper:g})"
                if not math.isnan(row.critical_beta) else
                ("below the betas tried" if not math.isnan(row.critical_beta_upper) else
                 "above the betas tried"))
        print(f"  latent {row.latent_dim}, lr {row.lr:g}: critical beta {crit}"
              + ("" if row.monotone else " [not monotone in beta]"))
    print(f"{PROG}: tables and collapse_map/ in {root}")
    return 1 if grid.num_errors else 0


if __name__ == "__main__":
    sys.exit(main())
