"""Decoders strong enough to ignore z, and the mitigations of posterior collapse (issue: collapse where the
literature finds it): autoregressive masks, W = 0 as the factorised decoder, the PixelCNN's receptive field,
cyclical annealing, aggressive training's phase, packs over decoder contexts."""

from __future__ import annotations

import math

import pytest
import torch

from vae.config import TrainConfig, resolve
from vae.model import losses
from vae.model.models import AutoregressiveConfig, AutoregressiveMLPVAE, MLPConfig, MLPVAE, PixelCNNConfig, PixelCNNVAE
from vae.training import aggressive
from vae.training.loop import train_loop
from vae.training.session import LocalSession
from tests.test_pack import _rows, packed_equals_alone

D = 784


def _dependence(model, latent: int) -> torch.Tensor:
    """[D, D] with 1 where output logit i depends on input pixel j (from the Jacobian at a random x)."""
    x = torch.rand(1, D, requires_grad=True)
    z = torch.randn(1, latent)
    rows = []
    logits = model.decode(z, x)[0]
    for i in range(D):
        (g,) = torch.autograd.grad(logits[i], x, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros(D) if g is None else (g[0] != 0).float())
    return torch.stack(rows)


@pytest.mark.parametrize("context", [0, 28, 784])
def test_an_autoregressive_decoder_sees_exactly_the_w_pixels_before_each_one(context):
    torch.manual_seed(0)
    model = AutoregressiveMLPVAE(AutoregressiveConfig(input_dim=D, hidden_widths=(64,), latent_dim=3, context=context))
    dep = _dependence(model, 3)
    i, j = torch.meshgrid(torch.arange(D), torch.arange(D), indexing="ij")
    allowed = (j < i) & (j >= i - context)
    assert not dep[~allowed].any()  # never itself, a later pixel, or one beyond the context
    if context:  # and the context is used: every pixel after the first sees the one just before it
        assert dep[torch.arange(1, D), torch.arange(D - 1)].all()


def _draws_as_the_whole_pass_does(model, z: torch.Tensor) -> None:
    """model.sample_x (its fast sampler) against VAE.sample_x (decode(z, x) over the whole image at every
    pixel), from one generator seed, with weights drawn large enough that pixels depend on those before them."""
    from vae.model.models import VAE

    for p in model.parameters():
        p.data.normal_(0, 0.3)
    fast_x, fast_p = model.sample_x(z, torch.Generator().manual_seed(1))
    slow_x, slow_p = VAE.sample_x(model, z, torch.Generator().manual_seed(1))
    assert torch.equal(fast_x, slow_x)
    torch.testing.assert_close(fast_p, slow_p, rtol=0, atol=1e-5)
    assert 0.05 < fast_x.mean() < 0.95  # both values drawn: a path, not a constant image


@pytest.mark.parametrize("context", [28, 784])
def test_the_incremental_sampler_draws_what_a_whole_decoder_pass_per_pixel_draws(context):
    torch.manual_seed(0)
    model = AutoregressiveMLPVAE(AutoregressiveConfig(input_dim=D, hidden_widths=(64,), latent_dim=3, context=context))
    _draws_as_the_whole_pass_does(model, torch.randn(5, 3))


def test_the_pixelcnn_sampler_on_the_window_a_pixel_sees_draws_what_the_whole_image_draws():
    torch.manual_seed(0)
    model = PixelCNNVAE(PixelCNNConfig(input_dim=D, hidden_widths=(16,), latent_dim=3, layers=2, channels=8)).eval()
    _draws_as_the_whole_pass_does(model, torch.randn(3, 3))


def test_context_zero_is_the_factorised_decoder_exactly():
    torch.manual_seed(0)
    plain = MLPVAE(MLPConfig(input_dim=D, hidden_widths=(32,), latent_dim=4))
    torch.manual_seed(0)
    zero = AutoregressiveMLPVAE(AutoregressiveConfig(input_dim=D, hidden_widths=(32,), latent_dim=4, context=0))
    x, eps = torch.rand(6, D).round(), torch.randn(2, 6, 4)
    assert [n for n, _ in zero.named_parameters()] == [n for n, _ in plain.named_parameters()]
    for a, b in zip(zero(x, eps), plain(x, eps)):
        assert torch.equal(a, b)


def test_the_pixelcnn_decoder_sees_only_the_pixels_above_and_to_the_left():
    torch.manual_seed(0)
    model = PixelCNNVAE(PixelCNNConfig(input_dim=D, hidden_widths=(16,), latent_dim=3, layers=2, channels=8))
    dep = _dependence(model, 3)
    i, j = torch.meshgrid(torch.arange(D), torch.arange(D), indexing="ij")
    assert not dep[j >= i].any()  # raster order: nothing at or after the pixel itself
    assert dep.sum() > 0
    x, probs = model.sample_x(torch.randn(2, 3), torch.Generator().manual_seed(0))  # sampled pixel by pixel
    assert set(x.unique().tolist()) <= {0.0, 1.0} and probs.shape == (2, D)


def test_cyclical_annealing_rises_over_half_of_each_of_four_cycles():
    w = [losses.cyclical_kl_weight(2.0, e, 40) for e in (0, 2.5, 5, 7.5, 9.99, 10, 10.5, 15, 20, 40)]
    assert w[0] == 0 and w[1] == pytest.approx(1.0) and w[2] == pytest.approx(2.0) and w[3] == 2.0
    assert w[4] == 2.0 and w[5] == 2.0  # the end of the first cycle is at beta
    assert w[6] == pytest.approx(0.2) and w[7] == pytest.approx(2.0) and w[8] == 2.0 and w[9] == 2.0


def test_the_aggressive_phase_ends_when_mutual_information_stops_rising_and_is_shown_in_training(tmp_path, data_dir):
    from vae.training.pack import Member

    m = Member(0, None, aggressive=True)
    for mi in (1.0, 2.0, 2.5):
        aggressive.end_of_epoch(m, mi)
        assert m.aggressive
    aggressive.end_of_epoch(m, 2.4)
    assert not m.aggressive and m.best_mi == 2.5
    # a real run: inner encoder steps happen only in the phase, and the phase ends by itself within the budget
    seen = []
    real = aggressive.encoder_steps

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    # beta 100 pushes q(z|x) onto the prior, so I(x; z) falls after the first epoch and the phase must end
    aggressive.encoder_steps, cfg = spy, TrainConfig(
        dataset="binarized-mnist", subset=400, epochs=8, latent_dim=4, hidden_dim=32, batch_size=100, beta=100.0,
        mitigation="aggressive", iw_samples=0, storage=str(tmp_path), name="a", data_dir=data_dir)
    try:
        out = train_loop(cfg, LocalSession())
    finally:
        aggressive.encoder_steps = real
    epochs = _rows(str(tmp_path / "a"), "epochs")
    assert seen and all(2 * aggressive.WINDOW <= s <= aggressive.MAX_INNER for s in seen)
    assert len(seen) <= 2 * 4  # 4 steps an epoch: the phase ended within two epochs, not with the budget
    assert out["status"] == "finished" and list(epochs.mitigation.unique()) == ["aggressive"]


def test_mutual_information_is_measured_every_epoch_of_an_aggressive_phase(tmp_path, data_dir, monkeypatch):
    """The phase ends on I(x; z), so it is measured in each of its epochs, not only at the snapshot epochs (0, 1,
    2, 4 and the last of a 5-epoch budget); at beta 0.1 the phase lasts the whole budget."""
    phase = set()
    real = aggressive.encoder_steps

    def spy(run, *args, **kwargs):
        phase.update(m.epoch for m in run.members)
        return real(run, *args, **kwargs)

    monkeypatch.setattr(aggressive, "encoder_steps", spy)
    train_loop(TrainConfig(dataset="binarized-mnist", subset=400, epochs=5, latent_dim=4, hidden_dim=32,
                           batch_size=100, beta=0.1, mitigation="aggressive", iw_samples=0, storage=str(tmp_path),
                           name="mi", data_dir=data_dir), LocalSession())
    epochs = _rows(str(tmp_path / "mi"), "epochs").set_index("epoch")
    assert 3 in phase  # an epoch of the phase that is no snapshot epoch
    assert epochs.mutual_info[sorted(phase)].notna().all()


def test_a_packed_sweep_over_decoder_contexts_equals_its_members_trained_alone(tmp_path, data_dir):
    kw = dict(dataset="binarized-mnist", decoder="autoregressive", hidden_dim=32, latent_dim=4, epochs=2,
              iw_samples=10, iw_subset=40, subset=300, storage=str(tmp_path), data_dir=data_dir)
    points = [dict(decoder_context=28, beta=1.0, seed=0), dict(decoder_context=784, beta=1.0, seed=0),
              dict(decoder_context=112, beta=2.0, seed=1, mitigation="cyclical")]
    packed_equals_alone(tmp_path, kw, points, ["test_kl", "units_in_use", "kl_weight", "decoder_context"])


def test_a_pack_refuses_members_with_and_without_a_context():
    from vae.training.pack import Members

    base = dict(dataset="binarized-mnist", decoder="autoregressive", name="p")
    with pytest.raises(ValueError, match="decoder context"):
        Members([resolve(TrainConfig(**base, decoder_context=0, trial_id="a")),
                 resolve(TrainConfig(**base, decoder_context=28, trial_id="b"))])
    assert math.isfinite(resolve(TrainConfig(**base, mitigation="warmup", epochs=30)).kl_warmup_epochs)
    assert resolve(TrainConfig(**base, mitigation="warmup", epochs=30)).kl_warmup_epochs == 3.0
    assert resolve(TrainConfig(**base, mitigation="free-bits")).free_bits == 0.5
    assert resolve(TrainConfig(dataset="binarized-mnist", name="f")).decoder_context == 0  # factorised: none


def test_the_method_table_sets_each_mitigation_beside_the_plain_vae_of_its_decoder():
    import pandas as pd

    from vae.tables.collapse import method_table

    rows = []
    for mitigation, wall, kl in (("none", 10.0, 1.0), ("aggressive", 25.0, 4.0), ("cyclical", 11.0, 3.0)):
        for seed in (0, 1):
            rows.append(dict(trial_id=f"{mitigation}{seed}", status="finished", decoder="autoregressive",
                             decoder_context=784, beta=1.0, mitigation=mitigation, iw_nll=90.0 + seed,
                             test_kl=kl, mutual_info=kl / 2, units_in_use=2, latent_dim=32, wall_seconds=wall))
    rows.append(dict(rows[0], trial_id="bad", status="diverged", wall_seconds=1.0))
    table = method_table(pd.DataFrame(rows))
    assert list(table.mitigation) == ["none", "cyclical", "aggressive"] and (table.n_trials == 2).all()
    assert list(table.relative_cost) == [1.0, 1.1, 2.5] and list(table.kl) == [1.0, 3.0, 4.0]
    assert list(table.iw_nll) == [90.5] * 3
