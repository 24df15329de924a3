"""Packed trials (vae/training/pack.py): the stacked optimiser against torch's, a pack's rows against its members run
alone, and a diverging member's isolation."""

from __future__ import annotations

import io
import numpy as np
import pandas as pd
import pytest
import torch

from tune import packing
from vae.model import kernels
from vae.training import pack
from vae.training import pack_adam
from vae.training.pack_adam import PackAdam
from vae.config import TrainConfig
from vae.training.loop import train_loop, train_pack
from vae.model.models import build_model
from vae.tables.results import Results
from vae.training.session import LocalSession


def test_one_adam_is_torchs_fused_adam_bit_for_bit_and_their_checkpoints_load_into_each_other():
    """A pack of one's optimiser (`OneAdam`) against `torch.optim.Adam(fused=True)`: the same weights bit for bit
    over steps where one parameter has no gradient at first and the learning rate changes; each one's
    `state_dict` continues in the other (checkpoints written before OneAdam resume under it)."""
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    torch_adam, one = torch.optim.Adam(ref, lr=1e-2, fused=True), pack_adam.OneAdam(ours, 1e-2)

    def step(k: int, a: list, b: list, opt_a, opt_b) -> None:
        for i, (p, q) in enumerate(zip(a, b)):
            g = None if (k < 2 and i == 1) else torch.randn_like(p)  # the bias has no gradient in steps 0, 1
            p.grad, q.grad = g, None if g is None else g.clone()
        opt_a.step()
        opt_b.step()

    for k in range(6):
        if k == 4:
            torch_adam.param_groups[0]["lr"] = 3e-3
            one.set_lrs([3e-3])
        step(k, ref, ours, torch_adam, one)
    assert all(torch.equal(p, q) for p, q in zip(ref, ours))
    assert {i: s["step"].item() for i, s in one.state.items()} == {0: 6.0, 1: 4.0}
    for src, dst_cls in ((torch_adam, lambda ps: pack_adam.OneAdam(ps, 1.0)),  # lr from the state
                         (one, lambda ps: torch.optim.Adam(ps, lr=1.0, fused=True))):
        a = [torch.nn.Parameter(p.detach().clone()) for p in ref]
        b = [torch.nn.Parameter(p.detach().clone()) for p in ref]
        fresh, again = dst_cls(b), type(src)(a, lr=1.0) if src is torch_adam else pack_adam.OneAdam(a, 1.0)
        for opt in (fresh, again):  # through a file, as a checkpoint
            buffer = io.BytesIO()
            torch.save(src.state_dict(), buffer)
            opt.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        for k in range(6, 9):
            step(k, a, b, again, fresh)
        assert all(torch.equal(p, q) for p, q in zip(a, b)), type(src).__name__


def test_a_pack_of_ones_training_never_imports_torch_dynamo():
    """Why `OneAdam`: torch.optim's first step imports torch._dynamo, 1.7 CPU-s in every trial and worker
    process (on 2 Xeon cores). A fresh process training the plain model a few epochs, under a constant rate and
    under a schedule (pack.RateHolder), must not load it."""
    import subprocess
    import sys

    code = ("import sys, tempfile\n"
            "from vae.config import TrainConfig\n"
            "from vae.training.loop import train_loop\n"
            "from vae.training.session import LocalSession\n"
            "d = tempfile.mkdtemp()\n"
            "for schedule in ('constant', 'cosine'):\n"
            "    train_loop(TrainConfig(dataset='gaussian2d', model='gaussian-mlp', iw_samples=0, subset=1000,"
            " epochs=2, lr_schedule=schedule, storage=d, name=schedule), LocalSession(d + '/ck-' + schedule))\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("schedule", ["constant", "cosine", "burda", "plateau"])
def test_member_schedules_give_the_rates_torchs_schedulers_give_a_real_optimiser(schedule):
    """`pack.RateHolder` (no `Optimizer.__init__`) under each schedule against the same scheduler driving an SGD
    over a parameter, epoch by epoch, also after a state_dict round trip half-way."""
    sched = torch.optim.lr_scheduler
    lrs, budget = [1e-2, 3e-3], 12
    ours = pack.MemberSchedules(lrs, schedule, budget)
    sgd = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr) for lr in lrs]
    make = {"constant": None, "cosine": lambda o: sched.CosineAnnealingLR(o, T_max=budget),
            "burda": lambda o: sched.LambdaLR(o, lambda e: pack.burda_factor(e, budget)),
            "plateau": lambda o: sched.ReduceLROnPlateau(o, factor=0.5, patience=3, threshold=1e-3)}[schedule]
    theirs = [make(o) for o in sgd] if make else []
    losses = [5.0, 4.0, 3.9, 3.9, 3.9, 3.9, 3.9, 3.9, 3.9, 3.9, 3.9, 3.9]
    for epoch, loss in enumerate(losses):
        if epoch == 6:
            again = pack.MemberSchedules(lrs, schedule, budget)
            again.load_state_dict(ours.state_dict())
            ours = again
        ours.step([loss, loss], [True, True])
        for o, s in zip(sgd, theirs):
            o.step()
            s.step(loss) if schedule == "plateau" else s.step()
        assert ours.lrs() == [o.param_groups[0]["lr"] for o in sgd], (schedule, epoch)
    assert schedule == "constant" or ours.lrs() != lrs  # the schedule moved the rates


@pytest.mark.parametrize("fused", [False, True])
def test_pack_adam_equals_torch_adam_member_by_member_and_leaves_a_frozen_member_alone(fused):
    torch.manual_seed(0)
    lrs = [1e-3, 1e-3, 3e-2, 3e-2, 3e-2, 0.5]  # the fused way: one kernel call per run of one lr and step count
    alone = [[torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)] for _ in lrs]
    opts = [torch.optim.Adam(ps, lr=lr) for ps, lr in zip(alone, lrs)]
    stacked = [torch.nn.Parameter(torch.stack([ps[i].detach().clone() for ps in alone])) for i in range(2)]
    packed = PackAdam(stacked, lrs, fused=fused)
    frozen_at, thawed_at = 3, 6  # member 3 frozen for steps 3 to 5, then trained on: a step count behind its run's
    for step in range(9):
        grads = [[torch.randn_like(p) for p in ps] for ps in alone]
        if step == frozen_at:
            assert packed.runs() == [(0, 2), (2, 5), (5, 6)]
            packed.freeze(3)  # splits its run
            assert packed.runs() == [(0, 2), (2, 3), (4, 5), (5, 6)]
            before = [p[3].detach().clone() for p in stacked]
        if step == thawed_at:
            assert all(torch.equal(p[3].detach(), b) for p, b in zip(stacked, before))
            state = packed.state_dict()
            again = PackAdam(stacked, lrs)
            again.load_state_dict(state)
            assert again.frozen.tolist() == [k == 3 for k in range(len(lrs))] and torch.equal(again.steps, packed.steps)
            packed.freeze(3, False)
            assert packed.runs() == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]  # 3 is 3 steps behind 2 and 4
        frozen = frozen_at <= step < thawed_at
        for k, (ps, opt) in enumerate(zip(alone, opts)):
            if frozen and k == 3:
                continue
            for p, g in zip(ps, grads[k]):
                p.grad = g.clone()
            opt.step()
        for i, p in enumerate(stacked):
            g = torch.stack([grads[k][i] for k in range(len(lrs))])
            if frozen:
                g[3] = float("nan")  # a frozen member's gradient is ignored, even NaN
            p.grad = g
        packed.step()
    for k in range(len(lrs)):
        for i, p in enumerate(stacked):
            torch.testing.assert_close(p[k].detach(), alone[k][i].detach(), rtol=1e-5, atol=1e-6)


def test_pack_adam_takes_one_fused_call_a_run_and_the_stacked_passes_for_many_small_runs(monkeypatch):
    calls = []  # the members each fused call updates
    real = pack_adam.FUSED_ADAM
    monkeypatch.setattr(pack_adam, "FUSED_ADAM", lambda params, *a, **kw: (calls.append(params[0].shape[0]),
                                                                            real(params, *a, **kw)))

    def one_step(members: int, lrs: list[float]) -> list[int]:
        stacked = [torch.nn.Parameter(torch.randn(len(lrs), members, 4))]
        stacked[0].grad = torch.randn_like(stacked[0])
        calls.clear()
        PackAdam(stacked, lrs).step()
        return list(calls)

    assert one_step(3, [1e-3] * 3 + [1e-2] * 3) == [3, 3]  # two runs: two calls
    assert one_step(3, [1e-3 * (i + 1) for i in range(8)]) == []  # 8 runs of small members: the stacked passes
    big = 1 + PackAdam.PER_MEMBER_BYTES // (16 * 4)  # a member's Adam state above PER_MEMBER_BYTES
    assert one_step(big, [1e-3 * (i + 1) for i in range(8)]) == [1] * 8  # on CPU: fused, one call a member


@pytest.mark.parametrize("model", ["mlp", "gaussian-mlp", "linear"])
def test_a_stacked_model_computes_each_members_terms(model):
    dim = 784 if model == "mlp" else 2
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model(model, dim, 3, 16, None if model != "linear" else 1.0 + seed))
    packed = pack.stack_models(models)
    x = torch.rand(3, 5, dim)
    eps = torch.randn(2, 3, 5, 3)
    recon, kl = packed(x, eps)
    shared_recon, shared_kl = packed(x[0], eps)  # x [B, D] that every member shares: the wide-product path
    for k, m in enumerate(models):
        r, q = m(x[k], eps[:, k])
        torch.testing.assert_close(recon[k], r)
        torch.testing.assert_close(kl[k], q)
        r, q = m(x[0], eps[:, k])
        torch.testing.assert_close(shared_recon[k], r)
        torch.testing.assert_close(shared_kl[k], q)
        plain = pack.member_model(packed, build_model(model, dim, 3, 16, None if model != "linear" else 1.0 + k), k)
        for (name, a), b in zip(plain.state_dict().items(), m.state_dict().values()):
            assert torch.equal(a, b), name


def _rows(root: str, table: str) -> pd.DataFrame:
    frame = Results(root).read(table)
    keys = [c for c in ("trial_id", "epoch", "dim", "index") if c in frame]
    return frame.sort_values(keys).reset_index(drop=True)


def _same(a: pd.DataFrame, b: pd.DataFrame, columns: list[str]) -> None:
    assert len(a) == len(b) and list(a.trial_id) == list(b.trial_id)
    for c in columns:
        if a[c].dtype.kind == "f":
            np.testing.assert_allclose(b[c].to_numpy(), a[c].to_numpy(), rtol=1e-4, atol=1e-6, err_msg=c)
        else:
            assert list(a[c]) == list(b[c]), c


POINTS = [dict(beta=0.5, lr=1e-3, seed=0), dict(beta=2.0, lr=3e-3, seed=1),
          dict(beta=1.0, lr=1e-3, seed=2, free_bits=0.1, kl_warmup_epochs=2)]


@pytest.mark.parametrize("model, one_seed", [("mlp", False), ("gaussian-mlp", False), ("linear", False),
                                             ("mlp", True), ("gaussian-mlp", True), ("linear", True)])
def test_a_packed_members_rows_equal_its_trial_run_alone(model, one_seed, tmp_path, monkeypatch, request):
    """Members with their own seeds (own data order and noise), or one seed (a batch gathered once and the
    first products shared: vae.model.kernels.packed_linear's wide path)."""
    kw = dict(dataset="mnist" if model == "mlp" else "gaussian2d", model=model, epochs=3, iw_samples=20,
              iw_subset=50, subset=600 if model == "mlp" else 1000, storage=str(tmp_path))
    if model == "mlp":  # MNIST where the suite finds it (never downloaded by a test)
        kw["data_dir"] = request.getfixturevalue("data_dir")
    if model == "linear":
        kw["decoder_var"] = "1"
    points = POINTS + ([dict(beta=1.0, lr=1e-3, seed=3, decoder_var="0.5")] if model == "linear" else [])
    if one_seed:
        points = [{**p, "seed": 7} for p in points]
    for i, p in enumerate(points):
        train_loop(TrainConfig(**{**kw, **p}, name="alone", trial_id=f"t{i}"), LocalSession())
    dims = []  # the batch's rank as the packed layers get it while training: [B, D] only when it is shared
    real = kernels.packed_linear

    def spy(x, weight, bias=None):
        if torch.is_grad_enabled():
            dims.append(x.dim())
        return real(x, weight, bias)

    monkeypatch.setattr(kernels, "packed_linear", spy)
    session = LocalSession()
    train_pack([TrainConfig(**{**kw, **p}, name="packed", trial_id=f"t{i}") for i, p in enumerate(points)], session)
    assert (2 in dims) == one_seed
    alone, packed = str(tmp_path / "alone"), str(tmp_path / "packed")
    _same(_rows(alone, "epochs"), _rows(packed, "epochs"),
          ["epoch", "train_loss", "train_kl", "test_loss", "test_kl", "mutual_info", "active_units", "units_in_use",
           "lr_now", "kl_weight", "beta", "seed"])
    _same(_rows(alone, "kl_per_dim"), _rows(packed, "kl_per_dim"), ["kl", "activity"])
    _same(_rows(alone, "trials"), _rows(packed, "trials"), ["status", "test_loss", "iw_nll", "units_in_use"])
    _same(_rows(alone, "latents"), _rows(packed, "latents"), ["epoch", "index", "label"])
    np.testing.assert_allclose(np.stack(_rows(packed, "latents").mu), np.stack(_rows(alone, "latents").mu),
                               rtol=1e-4, atol=1e-5)  # the encoder means themselves
    assert len(_rows(packed, "images")) == len(_rows(alone, "images"))
    trials = _rows(packed, "trials")
    assert trials.pack_id.nunique() == 1 and trials.pack_id.iloc[0].startswith(f"pack{len(points)}-")
    assert (_rows(alone, "trials").pack_id == _rows(alone, "trials").trial_id).all()  # alone: a pack of one
    assert set(session.reports[-1]["members"]) == {f"t{i}" for i in range(len(points))}


def test_a_diverging_member_is_recorded_and_frozen_and_the_others_do_not_notice(tmp_path):
    kw = dict(dataset="gaussian2d", model="gaussian-mlp", epochs=3, iw_samples=0, subset=1000, storage=str(tmp_path))
    good = [TrainConfig(**kw, name="two", trial_id="a", lr=1e-3, beta=0.5),
            TrainConfig(**kw, name="two", trial_id="c", lr=3e-3, beta=2.0, seed=1)]
    bad = TrainConfig(**kw, name="three", trial_id="b", lr=30.0, seed=2)  # Adam at lr 30: NaN in epoch 1
    train_pack(good, LocalSession())
    train_pack([good[0].replace(name="three"), bad, good[1].replace(name="three")], LocalSession())
    two, three = str(tmp_path / "two"), str(tmp_path / "three")
    trials = _rows(three, "trials").set_index("trial_id")
    assert trials.status.to_dict() == {"a": "finished", "b": "diverged", "c": "finished"}
    assert trials.loc["b", "epochs_done"] == 1 and "diverged in epoch 1" in trials.loc["b", "end_reason"]
    epochs = _rows(three, "epochs")
    assert epochs[epochs.trial_id == "b"].epoch.tolist() == [0, 1]  # no rows after it diverged
    _same(_rows(two, "epochs"), epochs[epochs.trial_id != "b"].reset_index(drop=True),
          ["train_loss", "test_loss", "units_in_use"])


def test_a_resumed_pack_continues_every_member(tmp_path):
    kw = dict(dataset="gaussian2d", model="linear", decoder_var="1", iw_samples=0, subset=1000, storage=str(tmp_path))
    members = [dict(trial_id="a", beta=0.5), dict(trial_id="b", beta=3.0, lr=3e-3, seed=1)]
    ck = str(tmp_path / "r" / "checkpoint_0")  # where load_model looks: under the run
    train_pack([TrainConfig(**kw, name="r", epochs=2, **m) for m in members], LocalSession(ck))
    second = LocalSession(ck)
    train_pack([TrainConfig(**kw, name="r", epochs=4, **m) for m in members], second)
    assert [r["epoch"] for r in second.reports] == [3, 4]
    train_pack([TrainConfig(**kw, name="once", epochs=4, **m) for m in members], LocalSession())
    _same(_rows(str(tmp_path / "once"), "epochs"), _rows(str(tmp_path / "r"), "epochs"), ["epoch", "train_loss"])

    from vae.trained import load_model  # a member loaded back from its pack's checkpoint: its own weights

    trained = load_model(str(tmp_path / "r"), trial_id="b")
    assert trained.epoch == 4
    alone = str(tmp_path / "alone")
    train_loop(TrainConfig(**kw, name="alone", epochs=4, **members[1]), LocalSession(str(tmp_path / "alone" / "ck")))
    for (name, a), b in zip(trained.model.state_dict().items(), load_model(alone).model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_groups_cut_points_by_shape_as_evenly_as_possible():
    points = [dict(latent_dim=2, lr=lr, beta=b) for lr in (1e-3, 1e-2) for b in (0.5, 1, 2, 4, 8)] + \
             [dict(latent_dim=5, lr=1e-3, beta=1)]
    packs = packing.groups(points, 4)
    assert sorted(len(p) for p in packs) == [1, 3, 3, 4]
    assert all(len({p["latent_dim"] for p in members}) == 1 for members in packs)
    assert sorted(map(str, sum(packs, []))) == sorted(map(str, points))
    assert pack.pack_id(["x"]) == "x"
    # --repeats: seeds are cut apart where the size allows (one batch a pack), one lr's members side by side
    repeated = [dict(p, seed=s) for p in points[:10] for s in (0, 1)]
    packs = packing.groups(repeated, 7)
    assert [sorted({p["seed"] for p in members}) for members in packs] == [[0], [0, 1], [1]]
    assert [p["lr"] for p in packs[0]] == [1e-3] * 5 + [1e-2] * 2


def test_pack_auto_spreads_configurations_over_the_slots_within_memory():
    from tune.space import SweepConfig

    sweep = SweepConfig(dataset="gaussian2d", latent_dims="2", lrs="1e-3,1e-2", betas="0.5,1,2,4,8", pack="auto")
    # a fixed budget: every member ends at once, a slot for each configuration, spread over the trials at once
    assert sweep.pack_size(slots=2) == 5 and sweep.pack_size(slots=1) == 10
    # until settled: about packing.DEPTH configurations through each slot, 2 slots for each of 2 trials, 3 for one
    settled = SweepConfig(**{**sweep.to_dict(), "until_settled": True})
    assert settled.pack_size(slots=2) == 2 and settled.pack_size(slots=1) == 3
    big = SweepConfig(dataset="mnist", latent_dims="50", betas=",".join(str(b) for b in range(1, 400)), pack="auto")
    assert big.pack_size(slots=1) == packing.MAX_AUTO
    one = packing.member_bytes(big.trial_config(latent_dim=50))
    assert big.pack_size(slots=1, trial_memory=2 * 10 * one) == 10  # half the memory, by the estimate
    assert SweepConfig(dataset="gaussian2d", pack="7").pack_size(slots=64) == 7


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_a_packed_member_on_binarized_mnist_equals_its_run_alone_under_either_objective(objective, tmp_path, data_dir):
    """Each member binarizes the training images with its own seed every epoch, and an IWAE member's bound is
    its own: the pack's rows are the rows of the runs alone."""
    kw = dict(dataset="binarized-mnist", model="mlp", hidden_widths="32,16", activation="tanh", latent_dim=4,
              epochs=2, iw_samples=10, iw_subset=50, subset=300, storage=str(tmp_path), objective=objective,
              objective_k=3 if objective == "iwae" else 1, data_dir=data_dir)
    points = [dict(beta=1.0, lr=1e-3, seed=0), dict(beta=0.5, lr=3e-3, seed=1), dict(beta=2.0, lr=1e-3, seed=1)]
    packed_equals_alone(tmp_path, kw, points, ["train_kl", "test_kl", "units_in_use", "objective"])


def packed_equals_alone(tmp_path, kw: dict, points: list[dict], columns: list[str]) -> None:
    """Train each point alone and all as one pack; their epochs/ and trials/ rows must agree (`columns` besides
    the losses every such test compares)."""
    for i, p in enumerate(points):
        train_loop(TrainConfig(**{**kw, **p}, name="alone", trial_id=f"t{i}"), LocalSession())
    train_pack([TrainConfig(**{**kw, **p}, name="packed", trial_id=f"t{i}") for i, p in enumerate(points)],
               LocalSession())
    alone, packed = str(tmp_path / "alone"), str(tmp_path / "packed")
    _same(_rows(alone, "epochs"), _rows(packed, "epochs"), ["epoch", "train_loss", "test_loss", "mutual_info", *columns])
    _same(_rows(alone, "trials"), _rows(packed, "trials"), ["status", "test_loss", "iw_nll"])
