"""What makes the numbers comparable with published tables: binarized MNIST, the IWAE objective, the IW NLL
bound computed in chunks, Burda et al.'s model as a preset (issue: numbers beside published tables)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from vae.config import PRESETS, TrainConfig, resolve
from vae.model import data, diagnostics, losses, streams
from vae.model.models import MLPConfig, MLPVAE, model_for
from vae.training.batches import epoch_source as _epoch_source
from vae.training.loop import _set_up
from vae.training.session import LocalSession


def _grey(n: int = 64) -> torch.Tensor:
    return torch.rand(n, 784, generator=torch.Generator().manual_seed(3))


def test_binarization_is_binary_seeded_by_seed_and_epoch_and_follows_the_intensity():
    x = _grey()
    a = data.binarize(x, streams.binarization(0, 1))
    assert a.dtype == torch.uint8 and set(a.unique().tolist()) <= {0, 1}
    assert torch.equal(a, data.binarize(x, streams.binarization(0, 1)))  # the same (seed, epoch): the same images
    assert not torch.equal(a, data.binarize(x, streams.binarization(0, 2)))  # afresh every epoch
    assert not torch.equal(a, data.binarize(x, streams.binarization(1, 1)))  # and every seed
    many = torch.stack([data.binarize(x, streams.binarization(0, e)).float() for e in range(400)]).mean(0)
    assert (many - x).abs().mean() < 0.03 and (many - x).abs().max() < 0.15  # 1 with probability its intensity


def test_binarized_mnist_has_a_fixed_binary_test_set_and_grey_training_probabilities(data_dir):
    one = data.load("binarized-mnist", data_dir, 0, 500)
    other = data.load("binarized-mnist", data_dir, 5, 500)
    assert one.dynamic and set(one.test.x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(one.test.x, other.test.x)  # binarized once, the same for every run and seed
    assert torch.equal(one.train.x, data.load("mnist", data_dir, 0, 500).train.x)  # the grey intensities


class _Rank:
    def __init__(self, rank: int, world: int):
        self.rank, self.world_size, self.device = rank, world, torch.device("cpu")


def test_two_ranks_train_on_the_same_binarization_of_their_shards(data_dir, tmp_path):
    cfg = resolve(TrainConfig(dataset="binarized-mnist", subset=300, epochs=1, storage=str(tmp_path), name="b",
                              data_dir=data_dir, num_workers=2, latent_dim=4, hidden_dim=16))
    ranks = [_set_up([cfg], _Rank(r, 2)) for r in (0, 1)]
    def source(run, epoch: int) -> torch.Tensor:
        run.members[0].epoch = epoch  # the epoch its member trains
        return _epoch_source(run, run.members)[0]

    for epoch in (1, 2):
        sources = [source(run, epoch) for run in ranks]
        assert torch.equal(sources[0], sources[1])  # one binarization of the whole split: each rank's shard of it
    assert not torch.equal(source(ranks[0], 1), source(ranks[0], 2))


def _model_and_batch(n: int = 256):
    torch.manual_seed(0)
    model = MLPVAE(MLPConfig(input_dim=784, hidden_widths=(64, 32), latent_dim=5, activation="tanh"))
    x = data.binarize(_grey(n), streams.test_binarization(0)).float()
    return model, x


def test_the_iwae_bound_at_one_sample_is_the_elbo_in_value_and_gradient():
    model, x = _model_and_batch(32)
    eps = torch.randn(1, 32, 5, generator=torch.Generator().manual_seed(1))
    log_w, _ = model(x, eps, 1.0)
    iwae = losses.negative_iwae(log_w).mean()
    # the ELBO with the same z, every density from torch.distributions
    mu, logvar = model.encode(x)
    z = mu + (0.5 * logvar).exp() * eps[0]
    logits = model.decode(z)
    log_px = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    elbo = -(log_px + log_pz - log_qz).mean()
    torch.testing.assert_close(iwae, elbo)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(iwae, params), torch.autograd.grad(elbo, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_iwae_bound_rises_with_the_number_of_samples_on_a_fixed_model():
    model, x = _model_and_batch()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        bounds = [-losses.negative_iwae(model(x, torch.randn(k, len(x), 5, generator=gen), 1.0)[0]).mean().item()
                  for k in (1, 5, 50)]
    assert bounds[0] < bounds[1] < bounds[2], bounds


def test_the_chunked_iw_nll_equals_the_unchunked_and_is_below_the_negative_elbo():
    model, x = _model_and_batch(128)
    eps = torch.randn(60, 128, 5, generator=torch.Generator().manual_seed(4))
    whole = diagnostics.iw_nll(model, x, 60, chunk=60, eps=eps)
    assert diagnostics.iw_nll(model, x, 60, chunk=7, eps=eps) == pytest.approx(whole, abs=1e-4)
    one = diagnostics.iw_nll(model, x, 1, eps=eps[:1])
    with torch.no_grad():  # k = 1: the negative ELBO with that one sample
        assert one == pytest.approx(losses.negative_iwae(model(x, eps[:1], 1.0)[0]).mean().item(), abs=1e-4)
        elbo = diagnostics.evaluate(model, x, eps[:20]).loss  # analytic KL, 20 samples for the reconstruction
    assert whole < elbo and whole < one


def test_the_burda_preset_is_a_named_set_of_flags_that_given_flags_override(capsys):
    from vae.config import parse_train_args

    with pytest.raises(SystemExit) as done:
        parse_train_args(["--preset", "burda2015", "--dataset", "binarized-mnist", "--epochs", "40", "--print-config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for key, value in PRESETS["burda2015"].items():
        expected = 40 if key == "epochs" else value
        assert f"{key}: {expected}" in printed or f"{key}: '{expected}'" in printed, key
    cfg, _ = parse_train_args(["--preset", "burda2015", "--dataset", "binarized-mnist"])
    assert cfg.widths == (200, 200) and cfg.activation == "tanh" and cfg.latent_dim == 50
    model = model_for(cfg, 784)
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")]
    assert shapes == [(200, 784), (200, 200), (50, 200), (50, 200), (200, 50), (200, 200), (784, 200)]


def test_the_burda_schedule_spends_three_to_the_i_passes_at_each_rate():
    from vae.training.pack import burda_factor

    factors = [burda_factor(e, 3280) for e in range(3280)]
    for i in range(8):
        assert sum(1 for f in factors if f == pytest.approx(10 ** (-i / 7))) == 3 ** i
    short = [burda_factor(e, 328) for e in range(328)]
    assert short == sorted(short, reverse=True) and short[-1] == pytest.approx(0.1)


def test_iw_subset_zero_takes_the_whole_test_set_and_the_trial_row_says_how_long(tmp_path):
    from vae.tables.results import Results
    from vae.training.loop import train_loop

    cfg = TrainConfig(dataset="gaussian2d", model="gaussian-mlp", epochs=1, iw_samples=30, iw_subset=0,
                      storage=str(tmp_path), name="w")
    train_loop(cfg, LocalSession())
    row = Results(str(tmp_path / "w")).read("trials").iloc[0]
    assert math.isfinite(row.iw_nll) and row.iw_seconds > 0
