"""Adaptive search for the collapse boundary: a Ray Tune `Searcher` that brackets the critical beta.

For every (latent size, learning rate) cell it keeps the betas tried so far
and their active fractions (units in use / latent size, averaged over seed
repeats; diverged or errored trials count as no outcome). The boundary is
where the active fraction crosses one half. Each round splits every
unresolved bracket in log beta into k + 1 parts, k being the cell's share of
the trials allowed at once, so a busy cluster gets several points per round
and a single slot gets plain bisection. Where the fraction rises again with
beta (not monotone), every crossing is refined and the cell is flagged.

The state is plain data (JSON), saved with the Tune experiment, so a restored
sweep continues the same brackets without rerunning finished trials.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ray.tune.search import Searcher

from vae.tables.collapse import crossings, reported_units_in_use

from .points import member_report, trial_key


def log_points(lo: float, hi: float, k: int) -> list[float]:
    """k points splitting [lo, hi] into k + 1 equal parts in log scale."""
    a, b = math.log(lo), math.log(hi)
    return [math.exp(a + (b - a) * i / (k + 1)) for i in range(1, k + 1)]


class BoundarySearcher(Searcher):
    def __init__(self, cells: list[tuple[int, float]], beta_range: tuple[float, float], tolerance: float,
                 repeats: int = 1, seed: int = 0, constants: dict[str, Any] | None = None,
                 max_concurrent: int = 1, pack: int = 1):
        super().__init__(metric=None, mode=None)
        self.beta_range, self.tolerance = tuple(beta_range), tolerance
        self.repeats, self.seed = repeats, seed
        self.constants = constants or {}
        self.max_concurrent = max(1, max_concurrent)
        self.pack = max(1, pack)  # points of one cell trained as one packed trial (vae/training/pack.py)
        self.cells = [{"latent_dim": int(z), "lr": float(lr), "outcomes": {}, "pending": 0, "done": False}
                      for z, lr in cells]
        self.queue: list[tuple[int, float, int]] = []  # (cell index, beta, seed)
        self.live: dict[str, list[tuple[int, float, int]]] = {}  # trial_id -> what it runs (a pack: several)

    # ------------------------------------------------------------ the algorithm
    def fractions(self, cell: dict) -> dict[float, float]:
        """Mean active fraction per beta whose repeats are all in (NaN when every repeat diverged)."""
        out = {}
        for beta_key, values in cell["outcomes"].items():
            if len(values) >= self.repeats:
                ok = [v for v in values if not math.isnan(v)]
                out[float(beta_key)] = sum(ok) / len(ok) if ok else float("nan")
        return out

    def brackets(self, index: int) -> tuple[list[tuple[float, float]], bool]:
        return crossings(self.fractions(self.cells[index]))

    def next_round(self, index: int, k: int) -> list[float]:
        """The betas of a cell's next round (empty: the cell is resolved)."""
        cell = self.cells[index]
        lo, hi = self.beta_range
        tried = {float(b) for b in cell["outcomes"]}
        if not tried:
            return [lo, hi] + log_points(lo, hi, max(0, k - 2))
        pairs, _ = self.brackets(index)
        open_pairs = [(a, b) for a, b in pairs if b / a > self.tolerance]
        per = max(1, k // max(1, len(open_pairs)))
        betas = []
        for a, b in open_pairs:
            # Betas inside the bracket already tried gave no outcome (diverged): split the widest gap left.
            ends = sorted({a, b} | {t for t in tried if a < t < b})
            lo_gap, hi_gap = max(zip(ends, ends[1:]), key=lambda g: g[1] / g[0])
            if hi_gap / lo_gap > self.tolerance:
                betas += log_points(lo_gap, hi_gap, per)
        return betas

    def _refill(self) -> None:
        waiting = [i for i, c in enumerate(self.cells) if not c["done"] and c["pending"] == 0]
        if not waiting:
            return
        k = max(1, self.max_concurrent // max(1, len([c for c in self.cells if not c["done"]])))
        for i in waiting:
            betas = self.next_round(i, k)
            if not betas:
                self.cells[i]["done"] = True
                continue
            for beta in betas:
                for r in range(self.repeats):
                    self.queue.append((i, beta, self.seed + r))
                self.cells[i]["pending"] += self.repeats

    # ------------------------------------------------------------ Tune's Searcher API
    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max(1, int(max_concurrent))
        return True

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self.queue:
            self._refill()
        if not self.queue:
            return Searcher.FINISHED if all(c["done"] for c in self.cells) and not self.live else None
        taken = [self.queue.pop(0)]  # a pack: the next points of the same cell, up to its size
        while self.queue and len(taken) < self.pack and self.queue[0][0] == taken[0][0]:
            taken.append(self.queue.pop(0))
        self.live[trial_id] = taken
        points = [self.point(*t) for t in taken]
        return {**self.constants, "members": points}

    def point(self, index: int, beta: float, seed: int) -> dict[str, Any]:
        cell = self.cells[index]
        return {"latent_dim": cell["latent_dim"], "lr": cell["lr"], "beta": beta, "seed": seed}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.live:
            return
        for index, beta, seed in self.live.pop(trial_id):
            cell = self.cells[index]
            mine = member_report(result, trial_key(self.point(index, beta, seed)))
            fraction = float("nan")
            if mine and not error and mine.get("status") != "diverged":
                used = reported_units_in_use(mine)  # counted by the trial with the sweep's thresholds
                if used is not None:
                    fraction = used / cell["latent_dim"]
            cell["outcomes"].setdefault(repr(beta), []).append(fraction)
            cell["pending"] -= 1

    # ------------------------------------------------------------ state, as plain JSON
    def get_state(self) -> dict[str, Any]:
        return {"beta_range": self.beta_range, "tolerance": self.tolerance, "repeats": self.repeats, "pack": self.pack,
                "seed": self.seed, "constants": self.constants, "max_concurrent": self.max_concurrent, "cells": self.cells,
                "queue": self.queue, "live": self.live}

    def set_state(self, state: dict[str, Any]) -> None:
        self.beta_range, self.tolerance = tuple(state["beta_range"]), state["tolerance"]
        self.repeats, self.seed, self.constants = state["repeats"], state["seed"], state["constants"]
        self.max_concurrent, self.cells = state["max_concurrent"], state["cells"]
        self.queue = [tuple(q) for q in state["queue"]]
        self.pack = int(state.get("pack", 1))
        # a state saved before packs holds one (index, beta, seed) per trial
        self.live = {k: [tuple(e) for e in (v if isinstance(v[0], list) else [v])] for k, v in state["live"].items()}

    def save(self, checkpoint_path: str) -> None:
        tmp = checkpoint_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.get_state(), fh, default=float)
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as fh:
            self.set_state(json.load(fh))

    def summary(self) -> list[dict[str, Any]]:
        """Per cell: the betas tried, their fractions, the brackets and whether they are monotone."""
        out = []
        for i, cell in enumerate(self.cells):
            pairs, monotone = self.brackets(i)
            out.append({"latent_dim": cell["latent_dim"], "lr": cell["lr"], "fractions": self.fractions(cell),
                        "brackets": pairs, "monotone": monotone,
                        "trials": sum(len(v) for v in cell["outcomes"].values())})
        return out
