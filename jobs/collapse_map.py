"""python -m jobs.collapse_map <storage>/<name>: rebuild the collapse map from the tables.

The map counts units in use with the thresholds the run recorded (run.json); --active-threshold and
--kl-threshold override them, and the output says so.
"""

from __future__ import annotations

import sys

import pandas as pd

from vae.tables.collapse import Thresholds, build, method_table, recorded_thresholds
from vae.config import OneLineParser
from vae.tables.results import Results, StorageError

PROG = "jobs.collapse_map"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the sweep's folder or URI: <storage>/<name>")
    parser.add_argument("--active-threshold", type=float, metavar="VAR",
                        help="a unit is active when Var_x E_q[z_j] exceeds this (default: the run's own)")
    parser.add_argument("--kl-threshold", type=float, metavar="NATS",
                        help="an active unit is in use when its test KL is at least this (default: the run's own)")
    args = parser.parse_args(argv)
    res = Results(args.root)
    try:
        if not res.exists() or res.read("trials").empty:
            parser.exit(2, f"{PROG}: error: no results tables at {args.root} (nothing written)\n")
    except StorageError as e:
        parser.exit(2, f"{PROG}: error: {e}\n")
    recorded = recorded_thresholds(res)
    thresholds = Thresholds(args.active_threshold if args.active_threshold is not None else recorded.active,
                            args.kl_threshold if args.kl_threshold is not None else recorded.kl)
    for name, value in (("active", thresholds.active), ("kl", thresholds.kl)):
        if not value > 0:
            parser.exit(2, f"{PROG}: error: --{name}-threshold: must be a number > 0 (got {value})\n")
    try:
        table = build(args.root, thresholds)
    except StorageError as e:
        parser.exit(2, f"{PROG}: error: {e}\n")
    source = "the run's own" if thresholds == recorded else f"overridden (the run recorded {recorded.active:g} / {recorded.kl:g})"
    print(f"{PROG}: units in use = activity > {thresholds.active:g} and test KL >= {thresholds.kl:g} nats ({source})")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table[["latent_dim", "lr", *[k for k in ("decoder_context", "mitigation") if table[k].nunique() > 1],
                     "beta", "n_trials", "units_in_use_mean", "fraction_in_use", "total_kl", "test_loss", "status",
                     "critical_beta"]].to_string(index=False))
        methods = method_table(res.read("trials"))
        if methods.mitigation.nunique() > 1:
            print(f"{PROG}: mitigations compared (IW NLL, test KL, I(x; z) on 2,000 test images, units in use, "
                  "wall time relative to none):")
            print(methods.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
