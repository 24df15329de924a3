"""python -m jobs.report ROOT [--trial ID]: draw the report from a run's or a sweep's Parquet tables.

Needs no Ray and no model: copy a results folder off a cluster and draw it anywhere.
"""

from __future__ import annotations

import os
import sys

from vae.tables.collapse import Thresholds, recorded_thresholds
from vae.config import OneLineParser
from vae.tables.results import Results, StorageError

PROG = "jobs.report"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the run's or sweep's folder or URI: <storage>/<name>")
    parser.add_argument("--trial", metavar="TRIAL_ID", help="draw one trial's detail page (with t-SNE)")
    parser.add_argument("--out", help="where the pages and PNGs go (default: ROOT/report, or ./NAME-report "
                                      "when ROOT is a URI)")
    parser.add_argument("--active-threshold", type=float, metavar="VAR",
                        help="count a unit active when Var_x E_q[z_j] exceeds this (default: the run's own)")
    parser.add_argument("--kl-threshold", type=float, metavar="NATS",
                        help="count an active unit in use when its test KL is at least this (default: the run's own)")
    args = parser.parse_args(argv)
    for name in ("active_threshold", "kl_threshold"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')}: must be a number > 0 (got {value})")
    try:
        return _report(args)
    except StorageError as e:  # a damaged table file, an unreadable bucket: one line
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _report(args) -> int:
    from vae.figures.report import build_report  # torch and matplotlib: after the arguments are checked

    res = Results(args.root)
    if not res.exists() or res.read("trials").empty:
        print(f"{PROG}: error: no results tables at {args.root}", file=sys.stderr)
        return 2
    thresholds = None
    if args.active_threshold is not None or args.kl_threshold is not None:
        recorded = recorded_thresholds(res)
        thresholds = Thresholds(args.active_threshold or recorded.active, args.kl_threshold or recorded.kl)
        print(f"{PROG}: thresholds overridden: active > {thresholds.active:g}, KL >= {thresholds.kl:g} nats "
              f"(the run recorded {recorded.active:g} and {recorded.kl:g})")
    try:
        page = build_report(args.root, args.out, args.trial, thresholds,
                            progress=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True),
                            processes=os.cpu_count() or 1)
    except KeyError:
        print(f"{PROG}: error: --trial: no trial {args.trial!r} in {args.root}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
