"""python -m bench.refill: continuous packing against packs without a queue, on the same maps in one command.

Each map runs twice under `jobs.sweep` on this machine, back to back (`--refilled-only`: the second alone):
- *packs without a queue* (`--pack N`, N the configurations of a shape: each shape is dealt to the trials at
  once as below, and each pack holds all its configurations from its first step, so no slot is ever refilled;
  before refilling, one such pack a shape ran with every slot to its slowest member's end), and
- *refilled* (`--pack auto`: each shape dealt to queues, a multiple of the trials at once, more where a queue
  would pass more than about 4 configurations through a slot; slots refilled as members end and given up once
  the queue is empty; the costliest queues first; on MNIST with `--eval-subset 2000`: the epochs before a
  member's last measured on 2,000 test images, its last on all 10,000).
For each: the sweep's wall (Ray's start-up included), the slot utilisation (member-epochs / slot-steps the packs
trained, from `trials/`), where the time went (the packs' training steps, `epoch_seconds` of each pack step
counted once, as a share of the wall of the trials the sweep ran at once; the rest is evaluation, tables,
checkpoints, Ray, and trials not yet or no longer running), split in two: how long the trials ran (Tune's own
`time_total_s`, summed) as a share of the trials the sweep could run at once x its wall, and the training
steps' share of the trials' own time; the training floor (training steps x slot utilisation / trials at
once: the wall with every slot full and nothing but training, at that run's cost of a member-epoch, which
packs without a queue's shared batches lower); and how their verdicts compare, configuration by configuration
(units in use and settled; `compare_verdicts`: rounding may move an unsettled count within its own undecided
units, and nothing else may differ). The maps: the pytorch/examples MLP on MNIST until settled (the
README's map, or a smaller one by the flags), and the 2-D toy's linear map of bench.pack (96 configurations,
fixed budget: refilling has nothing to refill there, and must not be slower). Writes docs/refill.md
(or `--page`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd

from bench import pages
from bench.pack import log_betas, pack_steps
from vae.tables.results import Results, pack_utilisation, slot_utilisation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep(args: list[str], storage: str, name: str, pack: str, env: dict[str, str]) -> dict:
    """One `jobs.sweep` run; its wall, utilisation, training time and per-configuration verdicts."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.sweep", *args, "--pack", pack, "--iw-samples", "0",
                           "--storage", storage, "--name", name], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} failed: {proc.stderr.strip().splitlines()[-3:]}")
    root = f"{storage}/{name}"
    trials = Results(root).read("trials")
    packs = pack_utilisation(trials)
    steps = pack_steps(root)
    training = steps.drop_duplicates(["pack_id", "step"]).epoch_seconds.sum()
    verdicts = trials.set_index("trial_id")[["units_in_use", "settled", "units_undecided"]]  # ids: from the points
    at_once = min(len(packs), os.cpu_count() or 1)  # trials the sweep ran at once (a CPU each)
    utilisation = slot_utilisation(packs)
    running = trial_seconds(root)
    return {"running": running, "running_share": running / (wall * at_once), "in_trial": float(training) / max(running, 1e-9),
            "wall": wall, "packs": len(packs), "slots": int(packs.slots.max()), "utilisation": utilisation,
            "member_epochs": int(packs.member_epochs.sum()), "training": float(training),
            "share": float(training) / (wall * at_once), "at_once": at_once,
            # the wall at this run's own training rate with every slot full and nothing but training running
            "floor": float(training) * utilisation / at_once,
            "settled": int(trials.settled.sum()), "trials": len(trials), "verdicts": verdicts.sort_index()}


def trial_seconds(root: str) -> float:
    """Tune's own record of how long the sweep's trials ran (the last `time_total_s` in each trial's
    result.json: from its start, set-up included, to its last report), summed over the trials."""
    total = 0.0
    for path in glob.glob(f"{root}/*/result.json"):
        with open(path) as fh:
            lines = [line for line in fh.read().splitlines() if line.strip()]
        total += float(json.loads(lines[-1]).get("time_total_s", 0.0)) if lines else 0.0
    return total


def compare(label: str, args: list[str], per_shape: int, storage: str, env: dict[str, str],
            eval_subset: int, refilled_only: bool = False) -> list[str]:
    """Both runs of a map (or, `refilled_only`, the refilled run alone) as the page's table and lines."""
    before = None if refilled_only else sweep(args, storage, f"{label}-shape", str(per_shape), env)
    after = sweep(args + (["--eval-subset", str(eval_subset)] if eval_subset else []), storage, f"{label}-refill",
                  "auto", env)
    rows = []
    refilled = "refilled (--pack auto" + (f" --eval-subset {eval_subset})" if eval_subset else ")")
    for name, r in (("packs without a queue", before), (refilled, after)):
        if r is not None:
            rows.append((name, f"{r['wall']:.0f}", r["packs"], r["slots"], f"{100 * r['utilisation']:.0f}%",
                         r["member_epochs"], f"{r['training']:.0f} ({100 * r['share']:.0f}%)",
                         f"{r['running']:.0f} ({100 * r['running_share']:.0f}%)", f"{100 * r['in_trial']:.0f}%",
                         f"{r['floor']:.0f}", f"{r['settled']}/{r['trials']}"))
    lines = [f"```bash\npython -m jobs.sweep {' '.join(args)} --pack {'auto' if refilled_only else 'N|auto'}\n```", ""]
    lines += pages.table(["run", "wall (s)", "packs", "slots a pack", "slot utilisation", "member-epochs",
                          f"training steps (s; share of {after['at_once']} trials' wall)",
                          f"trials running (s; share of {after['at_once']} x wall)", "training in the trials' time",
                          "training floor (s)", "settled"], rows)
    if before is None:
        print(f"bench.refill: {label}: refilled wall {after['wall']:.0f}s, utilisation "
              f"{100 * after['utilisation']:.0f}%", flush=True)
        return lines + ["The run of packs without a queue was not made (`--refilled-only`).", ""]
    verdicts = compare_verdicts(before["verdicts"], after["verdicts"])
    print(f"bench.refill: {label}: wall {before['wall']:.0f}s -> {after['wall']:.0f}s "
          f"({before['wall'] / after['wall']:.2f}x), utilisation {100 * before['utilisation']:.0f}% -> "
          f"{100 * after['utilisation']:.0f}%; {verdicts}", flush=True)
    return lines + [f"Wall: **{before['wall'] / after['wall']:.2f}x** faster refilled. Verdicts, configuration by "
                    f"configuration: {verdicts}.", ""]


def compare_verdicts(a: pd.DataFrame, b: pd.DataFrame) -> str:
    """The two runs' verdicts (units in use, settled; `units_undecided`: how many units of the count sit near a
    threshold), configuration by configuration. The runs take different float paths (a pack whose members share
    one seed and epoch gathers one batch and runs wide products; refilled slots run per-member products), so a
    trajectory can drift by rounding, and a count may move within its own undecided units: a difference is
    only a disagreement where both runs settled, or where it exceeds the undecided units either run reports."""
    both = a.merge(b, left_index=True, right_index=True, how="inner", suffixes=("", "_b"))
    same = both[(both.units_in_use == both.units_in_use_b) & (both.settled == both.settled_b)]
    rest = both.drop(same.index)
    gap = (rest.units_in_use - rest.units_in_use_b).abs()
    within = rest[(gap <= rest[["units_undecided", "units_undecided_b"]].max(axis=1)) & ~(rest.settled & rest.settled_b)]
    beyond = rest.drop(within.index)
    text = f"**{len(same)} of {len(both)}** the same"
    if len(within):
        text += (f"; {len(within)} moved within their undecided units, unsettled in at least one run ("
                 + "; ".join(f"{t}: {int(r.units_in_use)}{'' if r.settled else ' unsettled'} against "
                             f"{int(r.units_in_use_b)}{'' if r.settled_b else ' unsettled'}, "
                             f"{int(max(r.units_undecided, r.units_undecided_b))} undecided"
                             for t, r in within.iterrows()) + ")")
    return text + f"; **{len(beyond)}** disagree beyond that" + ("" if not len(beyond) else " (" + ", ".join(beyond.index) + ")")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.refill", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("VAE_DATA_DIR", "./data"))
    parser.add_argument("--latent-dims", default="2,5,10,20,50")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    parser.add_argument("--betas", default="0.1,0.3,1,2,4,8")
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=5, help="the minimum epochs of --until-settled")
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--eval-subset", type=int, default=2000,
                        help="the refilled MNIST run's --eval-subset (0: the whole test set every epoch, as before)")
    parser.add_argument("--skip-mnist", action="store_true", help="the toy map only")
    parser.add_argument("--skip-toy", action="store_true", help="the MNIST map only")
    parser.add_argument("--refilled-only", action="store_true",
                        help="the refilled runs alone (no run of packs without a queue to compare with)")
    parser.add_argument("--page", default=os.path.join(ROOT, "docs", "refill.md"))
    args = parser.parse_args(argv)
    env = {**os.environ, "VAE_DATA_DIR": os.path.abspath(args.data_dir)}
    env.pop("RAY_ADDRESS", None)
    body = [__doc__.split("\n\n", 1)[1].strip(), ""]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_mnist:
            per_shape = len(args.lrs.split(",")) * len(args.betas.split(","))
            mnist = ["--dataset", "mnist", "--subset", str(args.subset), "--latent-dims", args.latent_dims,
                     "--lrs", args.lrs, "--betas", args.betas, "--epochs", str(args.epochs), "--until-settled",
                     "--max-epochs", str(args.max_epochs)]
            body += ["## The MNIST map until settled", ""] + compare("mnist", mnist, per_shape, tmp, env,
                                                                       args.eval_subset, args.refilled_only)
        if args.skip_toy:
            return _write(args.page, argv, body, args.refilled_only)
        toy = ["--dataset", "gaussian2d", "--model", "linear", "--decoder-var", "1", "--latent-dims", "2",
               "--lrs", "1e-3,3e-3", "--betas", ",".join(map(str, log_betas(48))), "--epochs", "15"]
        body += ["## The toy linear map, fixed budget (96 configurations)", ""] + compare("toy", toy, 48, tmp, env, 0,
                                                                                           args.refilled_only)
    return _write(args.page, argv, body, args.refilled_only)


def _write(page: str, argv: list[str] | None, body: list[str], refilled_only: bool) -> int:
    title = "Continuous packing: " + ("refilled slots" if refilled_only else "refilled slots against packs without a queue")
    print(pages.write(page, title, "bench.refill", argv, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
