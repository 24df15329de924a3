"""Collapse classification and the collapse map: pure functions of the results tables.

Two counts, one function each:
- `active_units` (vae.model.diagnostics): units whose mean moves with x, Var_x E_q[z_j] > active threshold;
- `units_in_use` (here): active *and* informative (test KL >= KL threshold): the map's definition,
  used by the loop's rows, the map, ASHA, the progress line, the boundary searcher and the report.

The thresholds' defaults live in `vae.config`; every reader here takes the thresholds the run recorded
(`recorded_thresholds`) unless a caller overrides them, and the map writes the ones it used.
`python -m jobs.collapse_map <storage>/<name>` rebuilds the map from the tables at any time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from vae.axes import CELL_AXES
from vae.config import ACTIVE_THRESHOLD, KL_THRESHOLD
from vae.tables.results import SCHEMAS, Results

CLASSES = ("healthy", "partial", "collapsed", "diverged")
THEORY_CLOSE = 1.1  # an eigenvalue within this factor of beta * sigma^2: too close to judge


@dataclass(frozen=True)
class Thresholds:
    active: float = ACTIVE_THRESHOLD  # Var_x E_q[z_j]
    kl: float = KL_THRESHOLD  # nats of test KL

    @classmethod
    def of(cls, config: Mapping[str, Any] | None) -> "Thresholds":
        """The thresholds a run's config (or a sweep's) recorded; the defaults for what it lacks."""
        config = config or {}
        return cls(float(config.get("active_threshold", ACTIVE_THRESHOLD)), float(config.get("kl_threshold", KL_THRESHOLD)))


def in_use(kl, activity, thresholds: Thresholds = Thresholds()):
    """Per dimension: active (Var_x E_q[z_j] > threshold) and informative (test KL >= threshold).

    A unit whose mean still wanders but which carries no information is not used by the decoder.
    Works elementwise on tensors, arrays and pandas columns.
    """
    return (activity > thresholds.active) & (kl >= thresholds.kl)


def units_in_use(kl, activity, thresholds: Thresholds = Thresholds()) -> int:
    """How many dimensions are in use (`in_use`), from per-dimension KL and activity."""
    return int(in_use(np.asarray(kl, float), np.asarray(activity, float), thresholds).sum())


def reported_units_in_use(result: Mapping[str, Any]) -> int | None:
    """Units in use from a trial's report (the loop computes them with the run's thresholds); None if absent."""
    used = result.get("units_in_use")
    return None if used is None else int(used)


def crossings(points: dict[float, float]) -> tuple[list[tuple[float, float]], bool]:
    """Adjacent (beta, beta') pairs whose fractions in use lie on both sides of 1/2, in rising beta;
    and whether the fraction never rises with beta. NaN fractions (diverged) are skipped."""
    pts = sorted((b, f) for b, f in points.items() if not math.isnan(f))
    pairs = [(b0, b1) for (b0, f0), (b1, f1) in zip(pts, pts[1:]) if (f0 >= 0.5) != (f1 >= 0.5)]
    monotone = all(f0 >= f1 - 1e-9 for (_, f0), (_, f1) in zip(pts, pts[1:]))
    return pairs, monotone


def classify(loss: float, used: int, latent_dim: int, total_kl: float,
             thresholds: Thresholds = Thresholds()) -> str:
    """One trial at one epoch, from its units in use.

    diverged: the loss is NaN or infinite. collapsed: no unit in use, or the total KL is below the
    KL threshold (q(z|x) is the prior; the decoder ignores z). partial: some units in use, not all.
    healthy: every unit in use.
    """
    if loss is None or not math.isfinite(loss):
        return "diverged"
    if used == 0 or total_kl < thresholds.kl:
        return "collapsed"
    return "partial" if used < latent_dim else "healthy"


def classify_epochs(epochs: pd.DataFrame, kl_per_dim: pd.DataFrame,
                    thresholds: Thresholds = Thresholds()) -> pd.DataFrame:
    """`epochs` rows with units_in_use (recomputed from `kl_per_dim` with `thresholds`), status,
    collapsed_dims and fraction_in_use added."""
    used = (kl_per_dim.assign(used=in_use(kl_per_dim.kl, kl_per_dim.activity, thresholds))
            .groupby(["trial_id", "epoch"])["used"].sum())
    out = epochs.copy()
    out["units_in_use"] = [int(used.get((r.trial_id, r.epoch), r.units_in_use)) for r in epochs.itertuples()]
    out["status"] = [classify(r.test_loss, r.units_in_use, r.latent_dim, r.test_kl, thresholds)
                     for r in out.itertuples()]  # a diverged epoch has no test loss
    out["collapsed_dims"] = out.latent_dim - out.units_in_use
    out["fraction_in_use"] = out.units_in_use / out.latent_dim
    out.loc[out.status == "diverged", ["fraction_in_use", "collapsed_dims"]] = np.nan
    return out


def critical_beta(betas: Sequence[float], fraction: Sequence[float]) -> tuple[float, float, float, bool]:
    """Where the fraction of units in use first falls below 1/2 as beta grows, interpolated in log beta.

    Returns (critical, lower, upper, monotone). NaN fractions (diverged
    cells) are skipped. Below the range: (nan, nan, smallest beta); above it:
    (nan, largest beta, nan). `monotone` says whether the fraction never rises with beta.
    """
    points = {b: f for b, f in zip(betas, fraction) if not math.isnan(f)}
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
               thresholds: Thresholds = Thresholds()) -> pd.DataFrame:
    """One row per trial: its config, last epoch's metrics and classification, and its iw_nll."""
    if epochs.empty:
        return pd.DataFrame()
    classified = classify_epochs(epochs, kl_per_dim, thresholds)
    last = classified.sort_values("epoch").groupby("trial_id").tail(1).set_index("trial_id")
    cols = [c for c in ("status", "iw_nll", "settled", "units_undecided") if c in trials.columns]
    info = trials.set_index("trial_id")[cols].rename(columns={"status": "trial_status", "settled": "trial_settled",
                                                             "units_undecided": "trial_undecided"})
    last = last.join(info, how="left")
    last.loc[last.trial_status == "diverged", "status"] = "diverged"
    last.loc[last.status == "diverged", "fraction_in_use"] = np.nan
    last["total_kl"] = last.test_kl
    # a trial's own verdict when it wrote one (it saw its whole history), else the last epoch's
    last["settled"] = (last.trial_settled if "trial_settled" in last else last.settled).fillna(False).astype(bool)
    last["units_undecided"] = (last.trial_undecided if "trial_undecided" in last else last.units_undecided).fillna(0)
    return last.reset_index()


def theory_units(eigenvalues: Sequence[float], latent_dim: int, beta: float, decoder_var: float) -> tuple[int, bool]:
    """The linear VAE's units in use at the optimum (Lucas et al. 2019): of the `latent_dim` largest
    data-covariance eigenvalues, those above beta * sigma^2; and whether one lies within `THEORY_CLOSE`
    of that boundary (too close for a finite run to judge)."""
    top = np.sort(np.asarray(eigenvalues, float))[::-1][:latent_dim]
    boundary = beta * decoder_var
    close = bool(np.any((top > boundary / THEORY_CLOSE) & (top < boundary * THEORY_CLOSE)))
    return int((top > boundary).sum()), close


def _theory(cell: pd.DataFrame, spectra: pd.DataFrame | None) -> tuple[float, bool]:
    """A cell's theory_units (NaN where theory does not apply) from the `spectrum` table."""
    first = cell.iloc[0]
    if spectra is None or spectra.empty or first.model != "linear" or first.decoder_var == "learned":
        return float("nan"), False
    eig = spectra[(spectra.dataset == first.dataset) & (spectra.subset == first.subset)]
    if eig.empty:
        return float("nan"), False
    units, close = theory_units(eig.sort_values("index").eigenvalue, int(first.latent_dim), float(first.beta),
                                float(first.decoder_var))
    return float(units), close


def collapse_map(trials: pd.DataFrame, epochs: pd.DataFrame, kl_per_dim: pd.DataFrame,
                 thresholds: Thresholds = Thresholds(), spectra: pd.DataFrame | None = None) -> pd.DataFrame:
    """The `collapse_map` table: one row per cell, aggregated over repeats, with critical betas."""
    final = final_rows(trials, epochs, kl_per_dim, thresholds)
    columns = SCHEMAS["collapse_map"].names
    if final.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for key, cell in final.groupby(CELL_AXES + ["beta"], dropna=False):
        ok = cell[cell.status != "diverged"]
        counts = cell.status.value_counts()
        n = len(cell)
        majority = max(CLASSES, key=lambda c: (counts.get(c, 0), -CLASSES.index(c)))
        theory, close = _theory(cell, spectra)
        rows.append({**dict(zip(CELL_AXES + ["beta"], key)), "n_trials": n,
                     "units_in_use_mean": ok.units_in_use.mean(), "units_in_use_min": ok.units_in_use.min(),
                     "units_in_use_max": ok.units_in_use.max(), "fraction_in_use": ok.fraction_in_use.mean(),
                     "total_kl": ok.total_kl.mean(), "mutual_info": ok.mutual_info.mean(),
                     "test_loss": ok.test_loss.mean(), "iw_nll": ok.iw_nll.mean(),
                     "frac_collapsed": counts.get("collapsed", 0) / n, "frac_partial": counts.get("partial", 0) / n,
                     "frac_diverged": counts.get("diverged", 0) / n, "status": majority,
                     "active_threshold": thresholds.active, "kl_threshold": thresholds.kl,
                     "frac_settled": float(cell.settled.mean()), "units_in_use_std": float(ok.units_in_use.std(ddof=0))
                     if len(ok) else float("nan"), "units_undecided_mean": float(ok.units_undecided.mean())
                     if len(ok) else float("nan"), "theory_units": theory, "theory_close": close})
    table = pd.DataFrame(rows)
    for key, idx in table.groupby(CELL_AXES, dropna=False).groups.items():
        cell = table.loc[idx]
        crit, lo, hi, mono = critical_beta(cell.beta.tolist(), cell.fraction_in_use.tolist())
        table.loc[idx, ["critical_beta", "critical_beta_lower", "critical_beta_upper"]] = [crit, lo, hi]
        table.loc[idx, "monotone"] = mono
    table["monotone"] = table.monotone.astype(bool)
    table["theory_close"] = table.theory_close.astype(bool)
    return table.sort_values(CELL_AXES + ["beta"]).reset_index(drop=True)[columns]


def theory_agreement(table: pd.DataFrame) -> dict[str, int]:
    """How a map's measured units in use compare with the linear VAE's theory, over the cells it applies to:
    matching (every settled trial's count equals theory), off, too close to an eigenvalue to judge."""
    cells = table[table.theory_units.notna()] if "theory_units" in table else table.iloc[:0]
    close = cells[cells.theory_close]
    judged = cells[~cells.theory_close]
    match = judged[(judged.units_in_use_min == judged.theory_units) & (judged.units_in_use_max == judged.theory_units)]
    return {"cells": len(cells), "match": len(match), "off": len(judged) - len(match), "too_close": len(close)}


def recorded_thresholds(res) -> Thresholds:
    """The thresholds a run recorded in `run.json` (the defaults for a run that predates them)."""
    info = res.read_json("run.json") or {}
    return Thresholds.of(info.get("config"))


def build(root: str, thresholds: Thresholds | None = None) -> pd.DataFrame:
    """Read a run's tables, compute the map (with the run's own thresholds unless given), write
    `collapse_map/`; returns it."""
    res = Results(root)
    thresholds = thresholds or recorded_thresholds(res)
    table = collapse_map(res.read("trials"), res.read("epochs"), res.read("kl_per_dim"), thresholds,
                         res.read("spectrum"))
    res.write("collapse_map", table, "collapse_map.parquet")
    return table


METHOD_KEYS = ["decoder", "decoder_context", "beta", "mitigation"]


def method_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per method (mitigation) of each (decoder, context, beta), in the form of He et al. (2019)'s Table 1: the IW
    NLL bound, test KL, I(x; z), units in use and wall time relative to the plain VAE (mitigation none) of the
    same decoder, context and beta; means over seeds. Finished trials only."""
    done = trials[trials.status == "finished"]
    if done.empty:
        return pd.DataFrame(columns=METHOD_KEYS + ["n_trials", "iw_nll", "kl", "mutual_info", "units_in_use",
                                                   "latent_dim", "wall_seconds", "relative_cost"])
    table = done.groupby(METHOD_KEYS, dropna=False).agg(
        n_trials=("trial_id", "size"), iw_nll=("iw_nll", "mean"), kl=("test_kl", "mean"),
        mutual_info=("mutual_info", "mean"), units_in_use=("units_in_use", "mean"), latent_dim=("latent_dim", "first"),
        wall_seconds=("wall_seconds", "mean")).reset_index()
    plain = table[table.mitigation == "none"].set_index(METHOD_KEYS[:3]).wall_seconds
    base = [plain.get(tuple(k), float("nan")) for k in table[METHOD_KEYS[:3]].itertuples(index=False)]
    table["relative_cost"] = table.wall_seconds / pd.Series(base, index=table.index)
    order = {m: i for i, m in enumerate(("none", "warmup", "cyclical", "free-bits", "aggressive"))}
    return table.sort_values(METHOD_KEYS[:3] + ["mitigation"], key=lambda s: s.map(order) if s.name == "mitigation"
                             else s).reset_index(drop=True)
