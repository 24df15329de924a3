"""python -m jobs.train: train one VAE with Ray Train and write the Parquet tables.

parse -> validate -> check data -> check the run's identity and take its lock -> start or join Ray ->
check resources -> fit -> one-line summary (`vae.api.run_training`, the same function `vae.train` runs).
Exit codes: 0 finished, 1 the run failed or diverged, 2 bad input (nothing started), 130 / 143 stopped by
SIGINT / SIGTERM after a whole epoch (rerun the same command to resume).
"""

from __future__ import annotations

import os
import sys

from vae.config import parse_train_args

PROG = "jobs.train"


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_train_args(argv)  # exits 2 on bad input (0 after --print-config); no torch, no Ray yet
    from vae.api import run_training  # after parsing: --help and bad input answer without pandas and pyarrow

    code, line = run_training(cfg, list(sys.argv[1:] if argv is None else argv), args.verbose,
                              emit=lambda text: print(f"{PROG}: {text}" if not text.startswith("epoch ") else text,
                                                      flush=True),
                              warn=lambda text: print(f"{PROG}: {text}", file=sys.stderr, flush=True),
                              handle_signals=True)
    print(f"{PROG}: {line}", file=sys.stderr if code else sys.stdout, flush=True)
    from vae import launch  # loaded with vae.api above (pyarrow): after parsing, as that one

    if launch.left_a_thread():  # a fit given up on (a lost node): end here, not in finalisers under that thread
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
