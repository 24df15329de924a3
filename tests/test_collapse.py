"""Collapse classification, critical-beta interpolation and the map, against hand-made tables."""

import math

import pandas as pd
import pytest

from vae.tables.collapse import Thresholds, classify, collapse_map, critical_beta, units_in_use
from vae.tables.results import SCHEMAS


def test_classify_each_class():
    assert classify(100.0, 4, 4, 3.8) == "healthy"
    assert classify(100.0, 2, 4, 3.0) == "partial"
    assert classify(100.0, 0, 4, 0.0) == "collapsed"
    assert classify(100.0, 1, 4, 0.003) == "collapsed"  # total KL under the threshold
    assert classify(100.0, 1, 4, 0.003, Thresholds(kl=0.001)) == "partial"  # the thresholds given are used
    assert classify(float("nan"), 4, 4, 4.0) == "diverged"
    assert classify(float("inf"), 4, 4, 4.0) == "diverged"


def test_a_unit_is_in_use_when_active_and_informative():
    kl, activity = [1.0, 0.005, 1.0, 0.0], [0.5, 0.5, 0.001, 0.0]
    assert units_in_use(kl, activity) == 1  # the second carries no information, the third does not move
    assert units_in_use(kl, activity, Thresholds(active=1e-4, kl=1e-3)) == 3


def test_critical_beta_interpolates_in_log_beta():
    crit, lo, hi, mono = critical_beta([0.1, 1.0, 10.0], [1.0, 0.75, 0.25])
    assert (lo, hi, mono) == (1.0, 10.0, True)
    assert crit == pytest.approx(10 ** 0.5)  # half-way between 0.75 and 0.25, in log beta
    assert critical_beta([1.0, 2.0], [1.0, 0.5])[0] != critical_beta([1.0, 2.0], [1.0, 0.5])[0]  # nan: not below
    below = critical_beta([1.0, 2.0], [0.4, 0.0])
    assert math.isnan(below[0]) and math.isnan(below[1]) and below[2] == 1.0
    above = critical_beta([1.0, 2.0], [1.0, 0.9])
    assert math.isnan(above[0]) and above[1] == 2.0 and math.isnan(above[2])


def test_critical_beta_skips_diverged_cells_and_flags_non_monotone_results():
    crit, lo, hi, mono = critical_beta([0.1, 0.3, 1.0, 3.0], [1.0, float("nan"), 0.0, 1.0])
    assert (lo, hi, mono) == (0.1, 1.0, False)
    assert 0.1 < crit < 1.0


def _tables(cells):
    """cells: (trial_id, latent_dim, beta, seed, active_units, kl per dim, diverged)."""
    base = {c: 0 for c in SCHEMAS["epochs"].names}
    epochs, dims, trials = [], [], []
    for tid, z, beta, seed, active, kls, diverged in cells:
        row = {**base, "trial_id": tid, "epoch": 2, "dataset": "gaussian2d", "model": "linear", "latent_dim": z,
               "hidden_dim": 64, "lr": 0.01, "beta": beta, "seed": seed, "kl_warmup_epochs": 0.0, "free_bits": 0.0,
               "active_units": active, "units_in_use": active, "test_kl": sum(kls), "mutual_info": 0.1,
               "test_loss": float("nan") if diverged else 3.0, "train_loss": float("nan") if diverged else 3.0}
        epochs.append(row)
        dims += [{"trial_id": tid, "epoch": 2, "dim": j, "kl": k, "activity": 1.0 if k > 0.01 else 0.0}
                 for j, k in enumerate(kls)]
        trials.append({"trial_id": tid, "status": "diverged" if diverged else "finished", "iw_nll": 2.9})
    return pd.DataFrame(trials), pd.DataFrame(epochs), pd.DataFrame(dims)


def test_collapse_map_aggregates_repeats_and_finds_the_boundary():
    trials, epochs, dims = _tables([
        ("a0", 2, 0.3, 0, 2, [0.8, 0.2], False), ("a1", 2, 0.3, 1, 2, [0.7, 0.3], False),
        ("b0", 2, 1.0, 0, 1, [0.2, 0.0], False), ("b1", 2, 1.0, 1, 2, [0.3, 0.05], False),
        ("c0", 2, 3.0, 0, 0, [0.0, 0.0], False), ("c1", 2, 3.0, 1, 0, [0.0, 0.0], True),
    ])
    table = collapse_map(trials, epochs, dims)
    assert list(table.columns) == SCHEMAS["collapse_map"].names
    assert table.beta.tolist() == [0.3, 1.0, 3.0] and table.n_trials.tolist() == [2, 2, 2]
    assert table.fraction_in_use.tolist() == [1.0, 0.75, 0.0]
    assert table.status.tolist() == ["healthy", "healthy", "collapsed"]  # ties go to the healthier class
    assert table.frac_diverged.tolist() == [0.0, 0.0, 0.5] and table.frac_partial.tolist() == [0.0, 0.5, 0.0]
    crit = table.critical_beta.iloc[0]
    assert (table.critical_beta_lower.iloc[0], table.critical_beta_upper.iloc[0]) == (1.0, 3.0)
    assert crit == pytest.approx(math.exp(math.log(1.0) + (0.25 / 0.75) * math.log(3.0)))
    assert table.monotone.all()
