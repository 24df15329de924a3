"""Collapse classification and the collapse map: pure functions of the results tables.

`python -m tune.collapse_map <storage>/<name>` rebuilds the map from the tables at any time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

ACTIVE_THRESHOLD = 0.01  # Var_x E_q[z_j] above this: the unit is active (Burda et al. 2015)
KL_THRESHOLD = 0.01  # nats: a dimension with less test KL carries no information
# Besides the map's axes, these config values separate cells (a sweep may vary them too).
CELL_AXES = ["latent_dim", "lr", "hidden_dim", "kl_warmup_epochs", "free_bits"]
CLASSES = ("healthy", "partial", "collapsed", "diverged")


def in_use(kl, activity, active_threshold: float = ACTIVE_THRESHOLD, kl_threshold: float = KL_THRESHOLD):
    """Per dimension: active (Var_x E_q[z_j] > threshold) and informative (test KL >= threshold).

    A unit whose mean still wanders but which carries no information is not used by the decoder.
    Works elementwise on arrays and pandas columns.
    """
    return (activity > active_threshold) & (kl >= kl_threshold)


def units_in_use(result: dict, active_threshold: float = ACTIVE_THRESHOLD,
                 kl_threshold: float = KL_THRESHOLD) -> int | None:
    """Units in use from a trial's reported metrics (`kl_per_dim`, `activity`); None if it reported neither."""
    kl, activity = result.get("kl_per_dim"), result.get("activity")
    if kl is None or activity is None:
        return None
    return int(in_use(np.asarray(kl, float), np.asarray(activity, float), active_threshold, kl_threshold).sum())


def crossings(points: dict[float, float]) -> tuple[list[tuple[float, float]], bool]:
    """Adjacent (beta, beta') pairs whose active fractions lie on both sides of 1/2, in rising beta;
    and whether the fraction never rises with beta. NaN fractions (diverged) are skipped."""
    pts = sorted((b, f) for b, f in points.items() if f == f)
    pairs = [(b0, b1) for (b0, f0), (b1, f1) in zip(pts, pts[1:]) if (f0 >= 0.5) != (f1 >= 0.5)]
    monotone = all(f0 >= f1 - 1e-9 for (_, f0), (_, f1) in zip(pts, pts[1:]))
    return pairs, monotone


@dataclass(frozen=True)
class Classification:
    status: str  # healthy | partial | collapsed | diverged
    collapsed_dims: int  # dimensions with KL below the threshold
    collapsed_fraction: float


def classify(loss: float, active_units: int, latent_dim: int, kl_per_dim: Sequence[float],
             kl_threshold: float = KL_THRESHOLD) -> Classification:
    """One trial at one epoch.

    diverged: the loss is NaN or infinite. collapsed: no active unit, or the
    total KL is below the threshold (q(z|x) is the prior; the decoder ignores
    z). partial: some dimensions collapsed (KL below the threshold) or
    inactive. healthy: every dimension active and informative.
    """
    if loss is None or not math.isfinite(loss):
        return Classification("diverged", 0, float("nan"))
    kl = np.asarray(kl_per_dim, dtype=float)
    dead = int((kl < kl_threshold).sum()) if len(kl) else 0
    if active_units == 0 or (len(kl) and kl.sum() < kl_threshold):
        return Classification("collapsed", latent_dim, 1.0)
    if dead > 0 or active_units < latent_dim:
        return Classification("partial", max(dead, latent_dim - active_units),
                              max(dead, latent_dim - active_units) / latent_dim)
    return Classification("healthy", 0, 0.0)


def classify_epochs(epochs: pd.DataFrame, kl_per_dim: pd.DataFrame, kl_threshold: float = KL_THRESHOLD,
                    active_threshold: float = ACTIVE_THRESHOLD) -> pd.DataFrame:
    """`epochs` rows with status, collapsed_dims, collapsed_fraction and active_fraction added.

    Here `active_units` counts the units in use (`in_use`), not the activity alone.
    """
    per_dim = kl_per_dim.assign(used=in_use(kl_per_dim.kl, kl_per_dim.activity, active_threshold, kl_threshold))
    grouped = per_dim.groupby(["trial_id", "epoch"])
    dims = grouped["kl"].apply(list)
    used = grouped["used"].sum()
    out = epochs.copy()
    out["active_units"] = [int(used.get((r.trial_id, r.epoch), r.active_units)) for r in epochs.itertuples()]
    classes = [classify(r.test_loss, r.active_units, r.latent_dim, dims.get((r.trial_id, r.epoch), []),
                        kl_threshold) for r in out.itertuples()]  # a diverged epoch has no test loss
    out["status"] = [c.status for c in classes]
    out["collapsed_dims"] = [c.collapsed_dims for c in classes]
    out["collapsed_fraction"] = [c.collapsed_fraction for c in classes]
    out["active_fraction"] = out.active_units / out.latent_dim
    out.loc[out.status == "diverged", "active_fraction"] = np.nan
    return out


def critical_beta(betas: Sequence[float], active_fraction: Sequence[float]) -> tuple[float, float, float, bool]:
    """Where the active fraction first falls below 1/2 as beta grows, interpolated in log beta.

    Returns (critical, lower, upper, monotone). NaN fractions (diverged
    cells) are skipped. Below the range: (nan, nan, smallest beta); above it:
    (nan, largest beta, nan). `monotone` says whether the fraction never rises with beta.
    """
    points = {b: f for b, f in zip(betas, active_fraction) if f == f}
    nan = float("nan")
    if not points:
        return nan, nan, nan, True
    pairs, monotone = crossings(points)
    lowest, highest = min(points), max(points)
    if points[lowest] < 0.5:
        return nan, nan, lowest, monotone
    for b0, b1 in pairs:
        f0, f1 = points[b0], points[b1]
        if f0 >= 0.5:  # the first fall below one half
            t = (f0 - 0.5) / (f0 - f1)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0))), b0, b1, monotone
    return nan, highest, nan, monotone


def final_rows(trials: pd.DataFrame, epochs: pd.DataFrame, kl_per_dim: pd.DataFrame,
               kl_threshold: float = KL_THRESHOLD, active_threshold: float = ACTIVE_THRESHOLD) -> pd.DataFrame:
    """One row per trial: its config, last epoch's metrics and classification, and its iw_nll."""
    if epochs.empty:
        return pd.DataFrame()
    classified = classify_epochs(epochs, kl_per_dim, kl_threshold, active_threshold)
    last = classified.sort_values("epoch").groupby("trial_id").tail(1).set_index("trial_id")
    info = trials.set_index("trial_id")[["status", "iw_nll"]].rename(columns={"status": "trial_status"})
    last = last.join(info, how="left")
    last.loc[last.trial_status == "diverged", "status"] = "diverged"
    last.loc[last.status == "diverged", "active_fraction"] = np.nan
    last["total_kl"] = last.test_kl
    return last.reset_index()


def collapse_map(trials: pd.DataFrame, epochs: pd.DataFrame, kl_per_dim: pd.DataFrame,
                 kl_threshold: float = KL_THRESHOLD, active_threshold: float = ACTIVE_THRESHOLD) -> pd.DataFrame:
    """The `collapse_map` table: one row per cell, aggregated over repeats, with critical betas."""
    from vae.results import SCHEMAS

    final = final_rows(trials, epochs, kl_per_dim, kl_threshold, active_threshold)
    columns = SCHEMAS["collapse_map"].names
    if final.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for key, cell in final.groupby(CELL_AXES + ["beta"], dropna=False):
        ok = cell[cell.status != "diverged"]
        counts = cell.status.value_counts()
        n = len(cell)
        majority = max(CLASSES, key=lambda c: (counts.get(c, 0), -CLASSES.index(c)))
        rows.append({**dict(zip(CELL_AXES + ["beta"], key)), "n_trials": n,
                     "active_units_mean": ok.active_units.mean(), "active_units_min": ok.active_units.min(),
                     "active_units_max": ok.active_units.max(), "active_fraction": ok.active_fraction.mean(),
                     "total_kl": ok.total_kl.mean(), "mutual_info": ok.mutual_info.mean(),
                     "test_loss": ok.test_loss.mean(), "iw_nll": ok.iw_nll.mean(),
                     "frac_collapsed": counts.get("collapsed", 0) / n, "frac_partial": counts.get("partial", 0) / n,
                     "frac_diverged": counts.get("diverged", 0) / n, "status": majority})
    table = pd.DataFrame(rows)
    for key, idx in table.groupby(CELL_AXES, dropna=False).groups.items():
        cell = table.loc[idx]
        crit, lo, hi, mono = critical_beta(cell.beta.tolist(), cell.active_fraction.tolist())
        table.loc[idx, ["critical_beta", "critical_beta_lower", "critical_beta_upper"]] = [crit, lo, hi]
        table.loc[idx, "monotone"] = mono
    table["monotone"] = table.monotone.astype(bool)
    return table.sort_values(CELL_AXES + ["beta"]).reset_index(drop=True)[columns]


def build(root: str, kl_threshold: float = KL_THRESHOLD, active_threshold: float = ACTIVE_THRESHOLD) -> pd.DataFrame:
    """Read a run's tables, compute the map, write `collapse_map/`; returns it."""
    from vae.results import Results

    res = Results(root)
    table = collapse_map(res.read("trials"), res.read("epochs"), res.read("kl_per_dim"), kl_threshold,
                         active_threshold)
    res.write("collapse_map", table, "collapse_map.parquet")
    return table
