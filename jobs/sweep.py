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
    try:
        preflight(sweep.dataset, sweep.data_dir)
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    from tune.sweep import settle_trials, tuner
    from vae import collapse, launch

    launch.connect(verbose=args.verbose)
    cpus, _ = launch.cluster_resources()
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
