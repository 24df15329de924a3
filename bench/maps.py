"""python -m bench.maps: the collapse maps docs/sweeps.md cites, run and written to docs/maps.md.

Each section runs the documented command (`jobs.sweep`, `jobs.train`) on this machine into a temporary folder,
reads the run's own tables (`trials/`, `collapse_map/`) and writes what they say, with the command and the
wall time, so a rerun replaces the page. The sections (`--only` picks some):
- `linear-mnist`: the linear VAE on full MNIST until settled against its spectrum (Lucas et al. 2019: a
  direction is kept when its eigenvalue exceeds beta * sigma^2);
- `example`: the pytorch/examples VAE's map on 10,000 MNIST images, 5 fixed epochs against until settled;
- `toy-grid` and `toy-boundary`: the 2-D toy's linear VAE, whose second direction collapses at beta 1.5: a
  grid of 12 betas, and the boundary searcher against the grid of the same resolution it replaces;
- `schedules`: the settle rule under each learning-rate schedule (linear VAE, latent 5, 10,000 images);
- `latent50` (only with `--long`, about 10 minutes on 2 cores): the latent-50 MLP on full MNIST until settled
  against a 100-epoch constant-rate reference;
- `eval-subset` (only as `--only eval-subset`, about 35 minutes; its own page, docs/eval-subset.md): the
  until-settled maps of `linear-mnist` and `example` on the whole test set and with `--eval-subset 2000`,
  cell by cell.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd

from bench import pages
from vae.tables.results import Results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Runner:
    """Runs jobs into one temporary storage folder; each run's tables and wall time."""

    def __init__(self, storage: str, env: dict[str, str]):
        self.storage, self.env = storage, env

    def run(self, job: str, name: str, args: list[str]) -> tuple[Results, float, str]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", job, *args, "--storage", self.storage, "--name", name],
                              cwd=ROOT, env=self.env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{job} {name} failed: {proc.stderr.strip().splitlines()[-3:]}")
        print(f"bench.maps: {name}: {wall:.0f} s", flush=True)
        return Results(f"{self.storage}/{name}"), wall, f"python -m {job} {' '.join(args)}"


def _command(cmd: str, wall: float) -> list[str]:
    return [f"```bash\n{cmd}\n```", f"Wall: {wall:.0f} s (Ray's start-up included).", ""]


def _settled(t: pd.Series) -> str:
    return f"yes ({int(t.settle_epoch)})" if t.settled else f"no: {int(t.units_undecided)} undecided"


LINEAR_MNIST = ["--dataset", "mnist", "--model", "linear", "--decoder-var", "1", "--latent-dims", "20", "--lrs", "3e-3",
                "--betas", "0.3,0.5,1,2,3,4.4,6,8", "--until-settled", "--epochs", "20", "--max-epochs", "100",
                "--iw-samples", "0", "--pack", "auto"]
EXAMPLE = ["--dataset", "mnist", "--subset", "10000", "--latent-dims", "2,10,50", "--lrs", "1e-3",
           "--betas", "0.1,0.3,1,2,4,8", "--epochs", "5", "--iw-samples", "0", "--pack", "auto"]
UNTIL_SETTLED = ["--until-settled", "--max-epochs", "60"]  # the example map's until-settled run


def linear_mnist(r: Runner) -> list[str]:
    res, wall, cmd = r.run("jobs.sweep", "linear-mnist", LINEAR_MNIST)
    cells = res.read("collapse_map").sort_values("beta")
    trials = res.read("trials").set_index("beta")
    rows = [(f"{c.beta:g}", int(c.units_in_use_min), int(c.theory_units), "yes" if c.theory_close else "no",
             _settled(trials.loc[c.beta]), int(trials.loc[c.beta].epochs_done)) for c in cells.itertuples()]
    judged = cells[~cells.theory_close]
    match = int((judged.units_in_use_min == judged.theory_units).sum())
    unsettled_close = int((cells.theory_close & (cells.frac_settled < 1)).sum())
    return (["## The linear VAE on MNIST against its spectrum", ""] + _command(cmd, wall)
            + pages.table(["beta", "units in use", "theory (eigenvalues > beta)", "an eigenvalue within 10%",
                           "settled (at epoch)", "stopped at"], rows)
            + [f"Cells theory can judge that match it exactly: **{match} of {len(judged)}**. Cells with an "
               f"eigenvalue within 10% of beta: {int(cells.theory_close.sum())}, of which {unsettled_close} "
               "had not settled by the budget (the map says so).", ""])


def example(r: Runner) -> list[str]:
    fixed, wall_f, cmd_f = r.run("jobs.sweep", "example-fixed", EXAMPLE)
    settled, wall_s, cmd_s = r.run("jobs.sweep", "example-settled", EXAMPLE + UNTIL_SETTLED)
    betas = sorted(fixed.read("trials").beta.unique())
    rows = []
    for label, res in (("fixed 5 epochs", fixed), ("until settled (settled at epoch)", settled)):
        t = res.read("trials").set_index(["latent_dim", "beta"])
        for z in sorted({k[0] for k in t.index}):
            cells = []
            for b in betas:
                x = t.loc[(z, b)]
                cells.append(f"{int(x.units_in_use)}" + ("" if res is fixed else
                                                         f" ({int(x.settle_epoch)})" if x.settled else ", unsettled"))
            rows.append((f"{z}: {label}", *cells))
    crit = settled.read("collapse_map").groupby("latent_dim").critical_beta.first()
    fixed_crit = fixed.read("collapse_map").groupby("latent_dim").critical_beta.first()

    def say(c: pd.Series) -> str:
        return ", ".join(f"latent {z}: {'none in range' if math.isnan(v) else f'{v:.2g}'}" for z, v in c.items())

    st = settled.read("trials")
    return (["## The pytorch/examples VAE's map: 5 fixed epochs against until settled", ""]
            + [f"```bash\n{cmd_f}\n{cmd_s}\n```",
               f"Wall: {wall_f:.0f} s fixed, {wall_s:.0f} s until settled (Ray's start-up included).", ""]
            + pages.table(["latent: run", *[f"beta {b:g}" for b in betas]], rows)
            + [f"Critical beta, fixed: {say(fixed_crit)}; until settled: {say(crit)}. Settled trials: "
               f"{int(st.settled.sum())} of {len(st)} (the rest ran to the 60-epoch budget); of the fixed map's "
               f"{len(fixed.read('trials'))}, {int(fixed.read('trials').settled.sum())} had settled at 5 epochs.", ""])


def toy(r: Runner) -> list[str]:
    common = ["--dataset", "gaussian2d", "--model", "linear", "--decoder-var", "1", "--latent-dims", "2",
              "--lrs", "1e-2", "--epochs", "15", "--iw-samples", "0"]
    grid, wall_g, cmd_g = r.run("jobs.sweep", "toy-grid", common + [
        "--betas", "0.1,0.136,0.186,0.253,0.344,0.469,0.639,0.871,1.19,1.62,2.2,3"])
    search, wall_b, cmd_b = r.run("jobs.sweep", "toy-boundary", common + [
        "--search", "boundary", "--beta-range", "0.01,100", "--beta-tolerance", "1.15"])
    g, b = grid.read("collapse_map").iloc[0], search.read("collapse_map")
    lo, hi = b.critical_beta_lower.iloc[0], b.critical_beta_upper.iloc[0]
    needed = math.log(1e4) / math.log(1.15)
    n = len(search.read("trials"))
    return (["## The 2-D toy's linear VAE: the collapse boundary (theory: beta 1.5)", ""]
            + _command(cmd_g, wall_g)
            + [f"Critical beta **{g.critical_beta:.3g}**, bracketed by {g.critical_beta_lower:g} and "
               f"{g.critical_beta_upper:g}; the data's eigenvalues are 1.5 and 0.5, so theory puts the second "
               "direction's collapse at 1.5 and the first's at 0.5.", ""]
            + _command(cmd_b, wall_b)
            + [f"**{n} trials** against the {needed:.0f} betas a log-spaced grid of the same resolution needs "
               f"(ln(10^4) / ln(1.15)): {100 * n / needed:.0f}% of the grid's trials. Final bracket {lo:.4g} to "
               f"{hi:.4g} (ratio {hi / lo:.3g}), critical beta {b.critical_beta.iloc[0]:.3g}, beside the analytic 1.5.",
               ""])


def schedules(r: Runner) -> list[str]:
    rows = []
    for schedule in ("constant", "cosine", "plateau"):
        res, wall, cmd = r.run("jobs.sweep", f"schedule-{schedule}", [
            "--dataset", "mnist", "--subset", "10000", "--model", "linear", "--decoder-var", "1", "--latent-dims",
            "5", "--lrs", "3e-3", "--betas", "0.5,2,4.4,6", "--until-settled", "--epochs", "5", "--max-epochs", "60",
            "--lr-schedule", schedule, "--iw-samples", "0", "--pack", "auto"])
        t = res.read("trials").sort_values("beta")
        m = res.read("collapse_map").sort_values("beta")
        rows.append((schedule, ", ".join(f"{int(u)}" for u in t.units_in_use),
                     ", ".join(f"{int(u)}" for u in m.theory_units),
                     ", ".join(str(int(e)) if s else "-" for e, s in zip(t.settle_epoch, t.settled)),
                     int(t.epochs_done.sum()), f"{wall:.0f}"))
    return (["## The settle rule under each learning-rate schedule", "",
             "```bash\npython -m jobs.sweep --dataset mnist --subset 10000 --model linear --decoder-var 1 "
             "--latent-dims 5 --lrs 3e-3 --betas 0.5,2,4.4,6 --until-settled --epochs 5 --max-epochs 60 "
             "--lr-schedule constant|cosine|plateau\n```", ""]
            + pages.table(["schedule", "units in use (betas 0.5, 2, 4.4, 6)", "theory", "settled at epoch",
                           "epochs in all", "wall (s)"], rows))


def latent50(r: Runner) -> list[str]:
    common = ["--dataset", "mnist", "--latent-dim", "50", "--iw-samples", "0"]
    s, wall_s, cmd_s = r.run("jobs.train", "latent50-settled", common + ["--until-settled", "--epochs", "10",
                                                                        "--max-epochs", "100"])
    ref, wall_r, cmd_r = r.run("jobs.train", "latent50-reference", common + ["--epochs", "100"])
    rows = []
    for label, res, wall in (("until settled (cosine over 100 epochs)", s, wall_s), ("100 epochs, constant lr", ref, wall_r)):
        t = res.read("trials").iloc[0]
        rows.append((label, int(t.epochs_done), f"{int(t.units_in_use)} / 50", _settled(t), f"{wall:.0f}"))
    return (["## The latent-50 MLP on full MNIST: until settled against 100 epochs", "",
             f"```bash\n{cmd_s}\n{cmd_r}\n```", ""]
            + pages.table(["run", "stopped at", "units in use", "settled (at epoch)", "wall (s)"], rows))


EVAL_SUBSET = 2000
SETTLED_MAPS = {"linear-mnist": LINEAR_MNIST, "example": EXAMPLE + UNTIL_SETTLED}  # run whole and on EVAL_SUBSET
EVAL_TITLE = f"The settle rule on {EVAL_SUBSET:,} test images against all 10,000"  # its page's title


def eval_subset(r: Runner) -> list[str]:
    """Each until-settled map twice, its settle rule fed the whole test set every epoch or its first EVAL_SUBSET
    images (`--eval-subset`; the last epoch's numbers are on the whole test set either way): the same verdicts?"""
    out = [f"Each until-settled map of docs/maps.md run twice, the second with `--eval-subset {EVAL_SUBSET}`: every "
           f"epoch's diagnostics (and so the settle rule) on the first {EVAL_SUBSET:,} test images; the last epoch's "
           "on all of them. A cell's verdict is its units in use at the end and whether (and when) it settled.", ""]
    keys = ["latent_dim", "beta"]
    for name, args in SETTLED_MAPS.items():
        whole, wall_w, cmd = r.run("jobs.sweep", f"{name}-whole", args)
        part, wall_p, _ = r.run("jobs.sweep", f"{name}-subset", args + ["--eval-subset", str(EVAL_SUBSET)])
        a = whole.read("trials").set_index(keys).sort_index()
        b = part.read("trials").set_index(keys).sort_index()
        rows, same = [], 0
        for key in a.index:
            x, y = a.loc[key], b.loc[key]
            agree = int(x.units_in_use) == int(y.units_in_use) and bool(x.settled) == bool(y.settled)
            same += agree
            rows.append((f"{key[0]}", f"{key[1]:g}", f"{int(x.units_in_use)} / {int(y.units_in_use)}",
                         f"{_settled(x)} / {_settled(y)}", f"{int(x.epochs_done)} / {int(y.epochs_done)}",
                         "yes" if agree else "**no**"))
        out += ([f"### `{name}`", "", f"```bash\n{cmd}\n{cmd} --eval-subset {EVAL_SUBSET}\n```",
                 f"Wall: {wall_w:.0f} s on the whole test set, {wall_p:.0f} s on {EVAL_SUBSET:,} images "
                 f"({wall_w / wall_p:.2f}x; Ray's start-up included).", ""]
                + pages.table(["latent", "beta", "units in use (whole / subset)", "settled (whole / subset)",
                               "epochs (whole / subset)", "same verdict"], rows)
                + [f"Same verdict in **{same} of {len(rows)}** cells.", ""])
    return out


SECTIONS = {"linear-mnist": linear_mnist, "example": example, "toy-grid": toy, "schedules": schedules,
            "latent50": latent50, "eval-subset": eval_subset}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.maps", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("VAE_DATA_DIR", "./data"))
    parser.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)} (default: all "
                                                   "but latent50 and eval-subset)")
    parser.add_argument("--long", action="store_true", help="also the latent-50 section (about 10 minutes)")
    parser.add_argument("--page", default="", help="where the page goes (default: docs/maps.md; docs/eval-subset.md "
                                                   "for --only eval-subset)")
    args = parser.parse_args(argv)
    chosen = [s for s in args.only.split(",") if s] or [s for s in SECTIONS
                                                         if s != "eval-subset" and (s != "latent50" or args.long)]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}")
    if "eval-subset" in chosen and len(chosen) > 1:
        parser.error("--only: eval-subset writes a page of its own; run it alone")
    alone = chosen == ["eval-subset"]
    page = args.page or os.path.join(ROOT, "docs", "eval-subset.md" if alone else "maps.md")
    env = {**os.environ, "VAE_DATA_DIR": os.path.abspath(args.data_dir)}
    env.pop("RAY_ADDRESS", None)
    body = [] if alone else [__doc__.split("\n\n", 1)[1].strip(), ""]
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(tmp, env)
        for name in chosen:
            body += SECTIONS[name](runner)
    title = EVAL_TITLE if alone else "The collapse maps the docs cite"
    print(pages.write(page, title, "bench.maps", argv, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
