"""python -m tune.collapse_map <storage>/<name>: rebuild the collapse map from the tables."""

from __future__ import annotations

import argparse
import sys

from tune.collapse import KL_THRESHOLD, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tune.collapse_map", description=__doc__)
    parser.add_argument("root", help="the sweep's folder or URI: <storage>/<name>")
    parser.add_argument("--kl-threshold", type=float, default=KL_THRESHOLD,
                        help=f"nats: a dimension with less test KL counts as collapsed (default {KL_THRESHOLD})")
    args = parser.parse_args(argv)
    from vae.results import Results

    if not Results(args.root).exists():
        parser.exit(2, f"tune.collapse_map: error: no results at {args.root}\n")
    table = build(args.root, args.kl_threshold)
    with __import__("pandas").option_context("display.width", 200, "display.max_columns", 30):
        print(table[["latent_dim", "lr", "beta", "n_trials", "active_fraction", "total_kl", "test_loss", "status",
                     "critical_beta"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
