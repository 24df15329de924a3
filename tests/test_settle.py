"""The settle rule on synthetic per-unit histories: steady, decaying through a threshold, jittering
around it, reviving."""

import numpy as np

from vae.tables.collapse import Thresholds
from vae.training.settle import epochs_to_cross, settle_state, unit_sides

TH = Thresholds(active=0.01, kl=0.01)


def history(*units, epochs=12):
    """units: functions of the epoch (1..epochs) -> (kl, activity)."""
    kl = np.array([[u(e)[0] for u in units] for e in range(1, epochs + 1)])
    act = np.array([[u(e)[1] for u in units] for e in range(1, epochs + 1)])
    return kl, act


def steady_used(e):
    return 2.0, 0.5


def steady_unused(e):
    return 1e-5, 1e-6


def test_steady_units_are_settled():
    s = settle_state(*history(steady_used, steady_used, steady_unused), TH, epochs_left=0)
    assert (s.settled, s.units_in_use, s.undecided, s.moving) == (True, 2, 0, 0)


def test_a_unit_decaying_through_the_threshold_is_not_settled_before_or_after_it_crosses():
    decaying = lambda e: (0.5 * 0.6 ** e, 0.5 * 0.6 ** e)  # noqa: E731  crosses 0.01 near epoch 8
    early = settle_state(*history(steady_used, decaying, epochs=5), TH, epochs_left=50)
    assert not early.settled and early.moving == 1 and early.units_in_use == 2  # clearly used, but falling
    crossing = settle_state(*history(steady_used, decaying, epochs=9), TH, epochs_left=50)
    assert not crossing.settled
    late = settle_state(*history(steady_used, decaying, epochs=20), TH, epochs_left=50)
    assert late.settled and late.units_in_use == 1  # far below now, and the count held for the window


def test_a_fixed_budget_that_ends_mid_decay_is_not_called_settled():
    slow = lambda e: (0.5 * 0.7 ** e, 0.5 * 0.7 ** e)  # noqa: E731  5.9x above at epoch 6, across by 11
    s = settle_state(*history(steady_used, slow, epochs=6), TH, epochs_left=0)
    assert not s.settled and s.moving == 1 and "still drifting or crossing" in s.reason


def test_a_unit_jittering_around_the_threshold_is_undecided():
    rng = np.random.default_rng(0)
    jitter = {e: 0.01 * np.exp(rng.normal(0, 0.6)) for e in range(1, 13)}
    s = settle_state(*history(steady_used, lambda e: (0.02, jitter[e])), TH, epochs_left=100)
    assert not s.settled and s.undecided == 1 and "near a threshold" in s.reason


def test_a_reviving_unit_is_not_settled():
    reviving = lambda e: (1e-4 * 2.0 ** e, 1e-4 * 2.0 ** e)  # noqa: E731  below 1/3 of the thresholds at epoch 4
    kl, act = history(steady_used, reviving, epochs=4)
    assert unit_sides(kl[-1], act[-1], TH).tolist() == [1, -1]
    s = settle_state(*history(steady_used, reviving, epochs=5), TH, epochs_left=100)
    assert not s.settled and s.moving == 1


def test_a_collapsed_unit_whose_tiny_kl_wanders_without_a_trend_is_settled():
    rng = np.random.default_rng(1)
    noise = {e: float(np.exp(rng.normal(0, 0.4))) for e in range(1, 13)}
    wandering = lambda e: (0.002 * noise[e], 0.0015 * noise[e])  # noqa: E731  below a third, no trend
    s = settle_state(*history(steady_used, wandering), TH, epochs_left=100)
    assert s.settled and s.units_in_use == 1 and s.moving == 0


def test_units_in_use_still_drifting_are_not_settled_even_with_a_steady_count():
    rising = lambda e: (0.1 * 1.1 ** e, 0.2 * 1.1 ** e)  # noqa: E731  every unit still gaining 10% an epoch
    s = settle_state(*history(rising, rising, steady_used, epochs=5), TH, epochs_left=0)
    assert not s.settled and s.moving == 2 and s.units_in_use == 3 and "drifting" in s.reason
    slow = lambda e: (1.0 * 1.01 ** e, 0.5)  # noqa: E731  1% an epoch: within the drift tolerance
    assert settle_state(*history(slow, steady_used, epochs=8), TH, epochs_left=0).settled


def test_too_few_epochs_are_never_settled():
    s = settle_state(*history(steady_used, epochs=3), TH, epochs_left=0)
    assert not s.settled and "fewer than" in s.reason


def test_epochs_to_cross_follows_the_log_linear_trend():
    assert abs(epochs_to_cross([1.0, 0.5, 0.25], 0.0625) - 2.0) < 1e-9
    assert epochs_to_cross([0.25, 0.5, 1.0], 0.01) == float("inf")  # moving away
    assert epochs_to_cross([1.0, 1.0, 1.0], 0.01) == float("inf")


def test_theory_units_counts_eigenvalues_above_beta_sigma2_among_the_top_latent_dims():
    from vae.tables.collapse import theory_units

    eig = [5.0, 3.0, 1.5, 0.5, 0.1]
    assert theory_units(eig, latent_dim=5, beta=1.0, decoder_var=1.0) == (3, False)
    assert theory_units(eig, latent_dim=2, beta=1.0, decoder_var=1.0) == (2, False)  # only 2 latents to use
    assert theory_units(eig, latent_dim=5, beta=0.5, decoder_var=2.0) == (3, False)  # beta * sigma^2 matters
    assert theory_units(eig, latent_dim=5, beta=1.45, decoder_var=1.0) == (3, True)  # 1.5 is within 10%


def test_settled_linear_vae_trials_agree_with_the_spectrum_exactly(tmp_path):
    """Until settled, the 2-D toy's linear VAE keeps exactly the units theory keeps, at betas away from the
    eigenvalues (1.5 and 0.5); the map records the theory beside the measurement."""
    from vae.tables import collapse
    from vae.config import TrainConfig
    from vae.training.loop import train_loop
    from vae.tables.results import Results
    from vae.training.session import LocalSession

    for beta in (0.3, 1.0, 3.0):
        cfg = TrainConfig(dataset="gaussian2d", model="linear", decoder_var="1", beta=beta, lr=1e-2, epochs=6,
                          until_settled=True, max_epochs=60, storage=str(tmp_path), name="s", trial_id=f"b{beta}",
                          iw_samples=0)
        last = train_loop(cfg, LocalSession())
        assert last["settled"] and last["epoch"] < 60 and last["end_reason"].startswith("settled at epoch")
    table = collapse.build(str(tmp_path / "s"), collapse.Thresholds())
    assert table.theory_units.tolist() == [2.0, 1.0, 0.0] == table.units_in_use_mean.tolist()
    assert collapse.theory_agreement(table) == {"cells": 3, "match": 3, "off": 0, "too_close": 0}
    trials = Results(str(tmp_path / "s")).read("trials")
    assert trials.settled.all() and (trials.settle_epoch >= 1).all() and (trials.status == "finished").all()
    epochs = Results(str(tmp_path / "s")).read("epochs")
    lrs = epochs[epochs.trial_id == "b1.0"].sort_values("epoch").lr_now.tolist()
    assert lrs[1] > lrs[-1]  # the cosine schedule, the default with --until-settled, lowered it


def test_a_fixed_budget_run_says_whether_it_had_settled(tmp_path):
    from vae.config import TrainConfig
    from vae.training.loop import train_loop
    from vae.training.session import LocalSession

    cfg = TrainConfig(dataset="gaussian2d", model="linear", decoder_var="1", beta=1.0, lr=1e-2, epochs=2,
                      storage=str(tmp_path), name="f", iw_samples=0)
    last = train_loop(cfg, LocalSession())
    assert last["epoch"] == 2 and not last["settled"]  # two epochs cannot show a count that held for five
    assert "not settled" in last["end_reason"]


def test_settled_linear_vae_trials_agree_with_mnists_spectrum_exactly(data_dir, tmp_path):
    """The self-check on real data: MNIST (10,000 images), latent 5, decoder variance 1, betas away from the
    eigenvalues; every trial settles and keeps exactly the units theory keeps (5, 5, 1, 0)."""
    from vae.tables import collapse
    from vae.config import TrainConfig
    from vae.training.loop import train_loop
    from vae.training.session import LocalSession

    for beta in (0.5, 2.0, 4.4, 6.0):
        cfg = TrainConfig(dataset="mnist", data_dir=data_dir, subset=10_000, model="linear", decoder_var="1",
                          latent_dim=5, beta=beta, lr=3e-3, epochs=10, until_settled=True, max_epochs=60,
                          storage=str(tmp_path), name="m", trial_id=f"b{beta}", iw_samples=0)
        assert train_loop(cfg, LocalSession())["settled"]
    table = collapse.build(str(tmp_path / "m"), collapse.Thresholds())
    assert table.theory_units.tolist() == [5.0, 5.0, 1.0, 0.0] == table.units_in_use_mean.tolist()
    assert collapse.theory_agreement(table) == {"cells": 4, "match": 4, "off": 0, "too_close": 0}
