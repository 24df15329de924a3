"""Has a trial's collapse state settled? A pure rule over its per-unit history (the rows of `kl_per_dim/`).

A count of units in use is a claim about where training ends up, so a trial is **settled** only when

1. every unit is *clearly* on one side: in use with its activity and its test KL both at least `MARGIN`
   times their thresholds, or unused with its activity or its KL below 1 / `MARGIN` of its threshold.
   A unit in the band between is *undecided* (the optimiser's noise can hold a collapsed unit's activity
   just above the threshold: it jitters there and the count with it);
2. no unit is still moving across: the log-linear trend of each quantity over the last `WINDOW` epochs
   does not reach the threshold within the horizon, for a unit in use decaying towards it or an unused
   unit reviving. The horizon is the epochs left in the budget, but never less than the epochs trained so
   far ("would it cross if we trained as long again?"), so the last epoch of a fixed budget is not called
   settled merely because no epochs are left;
3. no unit in use is still drifting: a clear trend (as in 2) in its KL or activity of more than `DRIFT`
   (2%) per epoch, up or down. Early in training every unit is still busy finding its share of the KL; a
   count taken then says nothing about where it ends (MNIST, latent 50: all 50 in use after 400 steps,
   every unit's KL still rising by 5-25% an epoch; 24 in use from epoch 25 on);
4. the count of units in use has not changed over the last `WINDOW` epochs.

The undecided units are the count's uncertainty: the true count lies in [in use - undecided in use,
in use + undecided not in use].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vae.tables.collapse import Thresholds, in_use

MARGIN = 3.0  # "clearly": this factor away from a threshold
WINDOW = 5  # epochs: the count must hold this long, and trends are fitted over it
DRIFT = 0.02  # per epoch: a unit in use whose KL or activity still trends by more than 2% an epoch is moving


@dataclass(frozen=True)
class SettleState:
    settled: bool
    units_in_use: int
    undecided: int  # units in the band around a threshold
    moving: int  # units clearly on one side but trending across within the horizon
    reason: str  # why not settled ("" when settled)


def unit_sides(kl: np.ndarray, activity: np.ndarray, thresholds: Thresholds, margin: float = MARGIN) -> np.ndarray:
    """Per unit: +1 clearly in use, -1 clearly unused, 0 undecided."""
    clearly_used = (activity >= margin * thresholds.active) & (kl >= margin * thresholds.kl)
    clearly_unused = (activity < thresholds.active / margin) | (kl < thresholds.kl / margin)
    return np.where(clearly_used, 1, np.where(clearly_unused, -1, 0))


def clear_slope(series: np.ndarray) -> float:
    """The log-linear slope of `series` per epoch when it is clear (beyond two standard errors), else 0."""
    y = np.log(np.maximum(np.asarray(series, float), 1e-30))
    if len(y) < 3:
        return 0.0
    t = np.arange(len(y), dtype=float)
    slope, intercept = np.polyfit(t, y, 1)
    resid = y - (slope * t + intercept)
    se = math.sqrt(float(resid @ resid) / (len(y) - 2) / float(((t - t.mean()) ** 2).sum()))
    return float(slope) if abs(slope) > 2 * se else 0.0


def epochs_to_cross(series: np.ndarray, threshold: float) -> float:
    """Epochs until the log-linear trend of `series` (one value per epoch) reaches `threshold`; inf when
    it moves away from it or has no clear trend (a slope within two standard errors of zero: the noise of
    a collapsed unit's tiny KL wanders in log space without going anywhere)."""
    slope = clear_slope(series)
    gap = math.log(threshold) - math.log(max(float(np.asarray(series, float)[-1]), 1e-30))
    if slope == 0 or gap == 0 or (gap > 0) != (slope > 0):
        return 0.0 if gap == 0 else math.inf
    return gap / slope


def settle_state(kl: np.ndarray, activity: np.ndarray, thresholds: Thresholds, epochs_left: int,
                 window: int = WINDOW, margin: float = MARGIN, drift: float = DRIFT) -> SettleState:
    """kl, activity: [epochs, units] of one trial, oldest first (epoch 0, before training, excluded)."""
    kl, activity = np.atleast_2d(np.asarray(kl, float)), np.atleast_2d(np.asarray(activity, float))
    used_now = int(in_use(kl[-1], activity[-1], thresholds).sum())
    sides = unit_sides(kl[-1], activity[-1], thresholds, margin)
    undecided = int((sides == 0).sum())
    if len(kl) < window:
        return SettleState(False, used_now, undecided, 0, f"fewer than {window} epochs trained")
    horizon = max(epochs_left, len(kl))
    recent_kl, recent_act = kl[-window:], activity[-window:]
    moving = 0
    for j, side in enumerate(sides):
        if side > 0:  # in use: still drifting, or falling to a threshold within the horizon?
            drifting = max(abs(clear_slope(recent_kl[:, j])), abs(clear_slope(recent_act[:, j]))) > drift
            cross = 0.0 if drifting else min(epochs_to_cross(recent_kl[:, j], thresholds.kl),
                                             epochs_to_cross(recent_act[:, j], thresholds.active))
        elif side < 0:  # unused: do the quantities below their thresholds all rise to them?
            below = [(recent_kl[:, j], thresholds.kl)] * bool(kl[-1, j] < thresholds.kl) + \
                    [(recent_act[:, j], thresholds.active)] * bool(activity[-1, j] <= thresholds.active)
            cross = max((epochs_to_cross(s, th) for s, th in below), default=math.inf)
        else:
            continue
        moving += int(cross <= horizon)
    counts = in_use(recent_kl, recent_act, thresholds).sum(axis=1)
    steady = bool((counts == counts[-1]).all())
    reasons = [f"{undecided} unit(s) near a threshold"] * bool(undecided) + \
              [f"{moving} unit(s) still drifting or crossing"] * bool(moving) + \
              [f"the count changed within {window} epochs"] * (not steady)
    return SettleState(not reasons, used_now, undecided, moving, "; ".join(reasons))
