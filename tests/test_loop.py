"""The training loop called directly, as a Tune trial or a unit test would: no Ray."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from vae.config import TrainConfig, resolve
from vae.model.data import GAUSSIAN_COV, GAUSSIAN_MEAN
from vae.training.loop import train_loop
from vae.tables.results import IMAGE_KINDS, SCHEMAS, Results
from vae.training.session import LocalSession


def toy(tmp_path, **kw) -> TrainConfig:
    base = dict(dataset="gaussian2d", storage=str(tmp_path), name="toy", epochs=3, iw_samples=20, iw_subset=100)
    base.update(kw)
    return TrainConfig(**base)


def test_gaussian_decoder_vae_learns_the_toy_distribution(tmp_path):
    cfg = toy(tmp_path, model="gaussian-mlp", num_mc=8, epochs=12, lr=3e-3)
    train_loop(cfg, LocalSession())
    res = Results(f"{tmp_path}/toy")
    images = res.read("images")
    moments = {}
    for epoch in (0, 12):
        pts = images[(images.kind == "generated_noisy") & (images.epoch == epoch)]
        x = torch.tensor(np.stack(pts["values"]))
        moments[epoch] = (x.mean(0), torch.cov(x.T))
    true_mean, true_cov = torch.tensor(GAUSSIAN_MEAN), torch.tensor(GAUSSIAN_COV)
    err = {e: (m - true_mean).norm().item() + (c - true_cov).norm().item() for e, (m, c) in moments.items()}
    assert err[12] < 0.35 and err[12] < 0.5 * err[0], err
    epochs = res.read("epochs").sort_values("epoch")
    assert list(epochs.epoch) == list(range(13))
    assert epochs.test_loss.iloc[-1] < epochs.test_loss.iloc[0]
    # the fixed-noise test loss at epoch 0 is repeatable: same eps, same initial weights
    train_loop(toy(tmp_path, name="again", model="gaussian-mlp", num_mc=8, epochs=1, lr=3e-3), LocalSession())
    again = Results(f"{tmp_path}/again").read("epochs").sort_values("epoch")
    assert again.test_loss.iloc[0] == pytest.approx(epochs.test_loss.iloc[0], rel=1e-6)


def test_every_table_follows_the_contract(tmp_path, data_dir):
    cfg = TrainConfig(dataset="mnist", subset=512, epochs=2, storage=str(tmp_path), name="m", iw_samples=10,
                      iw_subset=50, latent_dim=4, hidden_dim=32)
    metrics = train_loop(cfg, LocalSession())
    res = Results(f"{tmp_path}/m")
    for table in ("epochs", "kl_per_dim", "trials", "latents", "images"):
        df = pd.read_parquet(f"{tmp_path}/m/{table}")  # plain pandas reads every table
        assert list(df.columns) == SCHEMAS[table].names, table
    assert len(res.read("epochs")) == 3 and len(res.read("kl_per_dim")) == 3 * 4
    trial = res.read("trials").iloc[0]
    assert trial.status == "finished" and trial.epochs_done == 2 and math.isfinite(trial.iw_nll)
    assert trial.test_loss == pytest.approx(metrics["test_loss"])
    kinds = res.read("images").groupby("kind").size().to_dict()
    assert set(kinds) <= set(IMAGE_KINDS)
    assert kinds == {"original": 3 * 16, "reconstruction": 3 * 16, "prior_sample": 3 * 64, "interpolation": 3 * 40}
    latents = res.read("latents")
    assert len(latents) == 2000 and latents.epoch.unique().tolist() == [2] and len(latents.mu.iloc[0]) == 4


def test_rerun_with_a_checkpoint_resumes_and_writes_each_epoch_once(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    train_loop(toy(tmp_path, epochs=2), LocalSession(ckpt))
    straight = toy(tmp_path, epochs=4, name="straight")
    train_loop(straight, LocalSession())
    from vae.training.loop import _set_up

    probe = _set_up([resolve(toy(tmp_path, epochs=4))], LocalSession(ckpt))
    assert probe.restore() == 2  # the optimiser's state comes back with the weights: Adam's step count
    steps = {int(st["step"]) for st in probe.opt.state.values()}
    assert steps == {2 * -(-10_000 // 128)}
    second = LocalSession(ckpt)
    resumed = train_loop(toy(tmp_path, epochs=4), second)
    assert [r["epoch"] for r in second.reports] == [3, 4]  # the second call trained only what was left
    epochs = Results(f"{tmp_path}/toy").read("epochs")
    assert sorted(epochs.epoch) == [0, 1, 2, 3, 4]
    reference = Results(f"{tmp_path}/straight").read("epochs").set_index("epoch")
    assert resumed["test_loss"] == pytest.approx(reference.loc[4, "test_loss"], rel=1e-5)


def test_a_diverging_trial_is_recorded_with_its_reason(tmp_path):
    out = train_loop(toy(tmp_path, lr=10.0, model="gaussian-mlp", epochs=4), LocalSession())
    trial = Results(f"{tmp_path}/toy").read("trials").iloc[0]
    assert out["status"] == "diverged" and trial.status == "diverged"
    assert "train loss became" in trial.error and f"epoch {trial.epochs_done}" in trial.error


def test_data_model_and_noise_move_to_the_sessions_device(tmp_path):
    """The GPU path's placement logic, without a GPU: on the `meta` device (not the CPU default), so a
    tensor left behind on the CPU fails this test."""
    from vae.training.loop import _set_up

    session = LocalSession(device="meta")
    run = _set_up([resolve(toy(tmp_path, epochs=1))], session)
    meta = torch.device("meta")
    assert run.train_x.device == meta and run.recorder.test_x.device == meta and run.test_eps.device == meta
    assert all(p.device == meta for p in run.model.parameters())


def test_the_loop_flushes_denormal_floats_while_it_runs_and_restores_the_callers_mode(tmp_path):
    """Denormals (below 1.2e-38) build up in long runs and take the CPU's slow path: flushed while training,
    cleared from weights and moments every epoch; the caller's floating-point mode comes back after."""
    from vae.config import TrainConfig
    from vae.training.loop import train_loop
    from vae.training.session import LocalSession

    seen = []

    class Watch(LocalSession):
        def report(self, metrics, checkpoint_dir):
            seen.append((torch.tensor([1e-39]) * 1.0).item())
            super().report(metrics, checkpoint_dir)

    torch.set_flush_denormal(False)
    train_loop(TrainConfig(dataset="gaussian2d", model="linear", decoder_var="1", epochs=2, iw_samples=0,
                           storage=str(tmp_path), name="d"), Watch())
    assert seen == [0.0, 0.0]  # flushed during training
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0  # and the caller's mode is back


def test_denormal_weights_and_moments_are_cleared_after_an_epoch(tmp_path):
    from vae.training import cpu, pack
    from vae.config import TrainConfig, resolve
    from vae.training.loop import _set_up, _train_epoch
    from vae.training.session import LocalSession

    run = _set_up([resolve(TrainConfig(dataset="gaussian2d", model="linear", decoder_var="1", epochs=1,
                                       storage=str(tmp_path), name="c"))], LocalSession())
    _train_epoch(run, 1)
    weight = run.model.dec.weight
    moment = run.opt.state[next(i for i, p in enumerate(run.opt.params) if p is weight)]["exp_avg"]
    with torch.no_grad():
        weight[0, 0], moment[0, 0], weight[1, 0] = 1e-39, -1e-40, 1e-3
    cpu.clear_denormals(list(run.model.parameters()) + pack.moments(run.opt))
    assert weight[0, 0].item() == 0.0 and moment[0, 0].item() == 0.0 and weight[1, 0].item() == pytest.approx(1e-3)


def test_mutual_information_is_measured_at_the_snapshot_epochs_and_the_last(tmp_path):
    """I(x; z) costs O(N^2): measured at epochs 0, 1, 2, 4, 8, ..., the budget's last and a run's last (here one
    that settled before its budget), empty between; the settle rule's KL and activity every epoch."""
    train_loop(toy(tmp_path, name="mi", model="linear", decoder_var="1", lr=1e-2, iw_samples=0, epochs=5,
                   until_settled=True, max_epochs=40), LocalSession())
    e = Results(f"{tmp_path}/mi").read("epochs").sort_values("epoch")
    last = int(e.epoch.max())
    assert 5 <= last < 40  # it settled before its budget (a last epoch that is no snapshot epoch of its own)
    assert list(e.epoch[e.mutual_info.notna()]) == sorted({0, 1, 2, 4, 8, 16, 32} & set(range(last)) | {last})
    kl = Results(f"{tmp_path}/mi").read("kl_per_dim")
    assert sorted(kl.epoch.unique()) == list(range(last + 1))


def test_an_eval_subset_measures_epochs_on_its_images_and_the_last_on_all_of_them(tmp_path):
    """--eval-subset N: the epochs before the last are measured on the first N test images (the training is the
    same), the last epoch on the whole test set: its row and the trial's equal a run measured on all throughout."""
    full, part = f"{tmp_path}/full", f"{tmp_path}/part"
    train_loop(toy(tmp_path, name="full"), LocalSession())
    train_loop(toy(tmp_path, name="part", eval_subset=300), LocalSession())
    a, b = Results(full).read("epochs").sort_values("epoch"), Results(part).read("epochs").sort_values("epoch")
    assert list(a.test_examples) == [2000] * 4 and list(b.test_examples) == [300, 300, 300, 2000]  # the toy: 2,000
    np.testing.assert_allclose(b.train_loss.to_numpy()[1:], a.train_loss.to_numpy()[1:], rtol=1e-6)
    assert not np.allclose(b.test_loss.to_numpy()[:3], a.test_loss.to_numpy()[:3])  # fewer images, other numbers
    for col in ("test_loss", "test_kl", "mutual_info", "units_in_use", "active_units"):
        assert b[col].iloc[-1] == pytest.approx(a[col].iloc[-1], rel=1e-6), col
    kl_a, kl_b = Results(full).read("kl_per_dim"), Results(part).read("kl_per_dim")
    np.testing.assert_allclose(kl_b[kl_b.epoch == 3].sort_values("dim").kl, kl_a[kl_a.epoch == 3].sort_values("dim").kl,
                               rtol=1e-6)
    ta, tb = Results(full).read("trials").iloc[0], Results(part).read("trials").iloc[0]
    assert tb.test_loss == pytest.approx(ta.test_loss, rel=1e-6) and tb.iw_nll == pytest.approx(ta.iw_nll, rel=1e-6)
