"""python -m jobs.sweep: map posterior collapse over latent size, learning rate and beta with Ray Tune.

parse -> validate -> check data -> identity and lock -> start or join Ray -> Tune (or restore) -> settle
trials -> collapse map -> summary (`tune.api.run_sweep`, the same function `tune.api.sweep` runs).
Exit codes: 0 done, 1 some trials errored, 2 bad input or a refused start (nothing started), 130 / 143
ended by SIGINT / SIGTERM with its state saved (finish it with --resume).
"""

from __future__ import annotations

import dataclasses
import sys

from tune.space import SweepConfig, parse_sweep_args

PROG = "jobs.sweep"


def main(argv: list[str] | None = None) -> int:
    sweep, args = parse_sweep_args(argv)  # exits 2 on bad input (0 after --print-config); no torch, no Ray yet
    from tune.api import run_sweep  # after parsing: --help and bad input answer without pandas and pyarrow

    given = [f.name for f in dataclasses.fields(SweepConfig) if f.name in vars(args)]
    code, line = run_sweep(sweep, list(sys.argv[1:] if argv is None else argv), args.resume, args.retry_errored,
                           args.verbose, given, emit=lambda text: print(text, flush=True))
    print(f"{PROG}: {line}", file=sys.stderr if code in (2, 130, 143) else sys.stdout, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
