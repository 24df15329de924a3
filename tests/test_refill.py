"""Continuous packing: a pack's slot takes the next queued configuration when its member ends
(vae/training/pack.py `Members.refill`, vae/training/slots.py `refill`), and that configuration trains as if
alone; once nothing waits, the pack gives up its ended slots (`shrink`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

from tests.test_pack import _rows, _same
from tune import packing
from vae.config import TrainConfig
from vae.tables.results import Results, pack_utilisation
from vae.training.loop import train_loop, train_pack
from vae.training.session import LocalSession

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a's budget ends at step 3; b diverges in its first epoch (Adam at lr 30); c and d take the freed slots,
# d with a KL warm-up (its own epoch count drives it) and every member under a cosine schedule (reset per slot)
KW = dict(dataset="gaussian2d", model="gaussian-mlp", epochs=3, iw_samples=20, iw_subset=50, subset=1000,
          lr_schedule="cosine")
POINTS = [dict(trial_id="a", lr=1e-3, beta=0.5), dict(trial_id="b", lr=30.0, seed=2),
          dict(trial_id="c", lr=3e-3, beta=2.0, seed=1), dict(trial_id="d", lr=1e-3, beta=1.0, seed=3,
                                                               kl_warmup_epochs=2)]


def test_a_refilled_slots_rows_equal_its_configuration_trained_alone(tmp_path):
    for p in POINTS:
        train_loop(TrainConfig(**KW, **p, storage=str(tmp_path), name="alone"), LocalSession())
    session = LocalSession()
    train_pack([TrainConfig(**KW, **p, storage=str(tmp_path), name="packed") for p in POINTS], session, slots=2)
    alone, packed = str(tmp_path / "alone"), str(tmp_path / "packed")
    trials = _rows(packed, "trials").set_index("trial_id")
    assert trials.status.to_dict() == {"a": "finished", "b": "diverged", "c": "finished", "d": "finished"}
    # c took b's slot after b diverged at step 1; d took a's after a's budget ended at step 3
    assert trials.pack_offset.to_dict() == {"a": 0, "b": 0, "c": 1, "d": 3} and set(trials.pack_slots) == {2}
    assert [r["epoch"] for r in session.reports] == [1, 2, 3, 4, 5, 6]
    _same(_rows(alone, "epochs"), _rows(packed, "epochs"),
          ["epoch", "train_loss", "train_kl", "test_loss", "mutual_info", "units_in_use", "lr_now", "kl_weight"])
    _same(_rows(alone, "kl_per_dim"), _rows(packed, "kl_per_dim"), ["epoch", "dim", "kl", "activity"])
    _same(_rows(alone, "trials"), _rows(packed, "trials"), ["status", "epochs_done", "test_loss", "iw_nll"])
    a, b = _rows(alone, "latents"), _rows(packed, "latents")
    _same(a, b, ["epoch", "index"])
    np.testing.assert_allclose(np.stack(b.mu), np.stack(a.mu), rtol=1e-4, atol=1e-5)
    assert len(_rows(packed, "images")) == len(_rows(alone, "images"))
    # utilisation: member-epochs a 3, b 1, c 3, d 3 = 10 over 2 slots x 6 steps
    (u,) = pack_utilisation(Results(packed).read("trials")).itertuples()
    assert (u.slots, u.steps, u.member_epochs, u.slot_steps) == (2, 6, 10, 12) and abs(u.utilisation - 10 / 12) < 1e-9


SCRIPT = """
import json, sys
from vae.config import TrainConfig
from vae.training.loop import train_pack
from vae.training.session import LocalSession
storage, name, slots, kw, points = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
session = LocalSession(storage + "/" + name + "/ck")
train_pack([TrainConfig(**kw, **p, storage=storage, name=name) for p in points], session, slots=slots)
print(json.dumps([r["epoch"] for r in session.reports]))
"""
# six linear VAEs on the toy until settled (3 to 6 epochs each)
QUEUE_KW = dict(dataset="gaussian2d", model="linear", decoder_var="1", iw_samples=0, subset=1000, epochs=3,
                until_settled=True, max_epochs=6, lr=1e-2)
QUEUE = [dict(trial_id=f"t{i}", beta=b, seed=i) for i, b in enumerate([0.3, 1, 3, 0.5, 2, 6])]


def _run(storage: str, name: str, slots: int, kw: dict = QUEUE_KW, points: list = QUEUE,
         **env: str) -> subprocess.CompletedProcess:
    """`points` (with `kw`) as one pack of `slots` slots in a process of its own, its checkpoint kept in
    <storage>/<name>/ck: stdout's last line lists the pack's steps it reported."""
    return subprocess.run([sys.executable, "-c", SCRIPT, storage, name, str(slots), json.dumps(kw), json.dumps(points)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def test_a_queue_longer_than_its_slots_finishes_every_configuration_once_also_after_a_sigkill(tmp_path):
    storage = str(tmp_path)
    clean = _run(storage, "clean", 2)
    assert clean.returncode == 0, clean.stderr
    marker = str(tmp_path / "killed")
    killed = _run(storage, "r", 2, VAE_FAULT_KILL_EPOCH="5", VAE_FAULT_MARKER=marker)
    assert killed.returncode == -9 and os.path.exists(marker)  # SIGKILLed half-way through the pack's step 5
    resumed = _run(storage, "r", 2, VAE_FAULT_KILL_EPOCH="5", VAE_FAULT_MARKER=marker)
    assert resumed.returncode == 0, resumed.stderr
    steps = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert steps[0] == 5 and steps == list(range(5, 5 + len(steps)))  # only what the kill lost was trained again
    trials = Results(str(tmp_path / "r")).read("trials").set_index("trial_id").sort_index()
    assert len(trials) == 6 and set(trials.status) == {"finished"}
    assert (trials.pack_offset > 0).sum() >= 4  # four configurations waited for a slot
    epochs = Results(str(tmp_path / "r")).read("epochs")
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for tid, part in epochs.groupby("trial_id"):
        assert sorted(part.epoch) == list(range(int(trials.loc[tid, "epochs_done"]) + 1)), tid
    ref = Results(str(tmp_path / "clean")).read("epochs").sort_values(["trial_id", "epoch"]).reset_index(drop=True)
    got = epochs.sort_values(["trial_id", "epoch"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[["trial_id", "epoch"]], ref[["trial_id", "epoch"]])
    np.testing.assert_allclose(got.test_loss.to_numpy(), ref.test_loss.to_numpy(), rtol=1e-5)


# b diverges in its first epoch and d takes its slot; a and c end at step 3, and e takes a's slot with the queue
# then empty: from step 4 the pack trains on two slots, e's and d's (two still once d ends: a pack of one is the plain model)
SHRINK = [dict(trial_id="a", lr=1e-3, beta=0.5), dict(trial_id="b", lr=30.0, seed=2),
          dict(trial_id="c", lr=3e-3, beta=2.0, seed=1), dict(trial_id="d", lr=1e-3, beta=1.0, seed=3),
          dict(trial_id="e", lr=3e-3, seed=4, beta=2.0)]


def test_a_pack_gives_up_its_ended_slots_once_its_queue_is_empty_also_across_a_sigkill(tmp_path):
    for p in SHRINK:
        train_loop(TrainConfig(**KW, **p, storage=str(tmp_path), name="alone"), LocalSession())
    marker = str(tmp_path / "killed")
    runs = [_run(str(tmp_path), "packed", 3, KW, SHRINK, VAE_FAULT_KILL_EPOCH="5", VAE_FAULT_MARKER=marker)
            for _ in range(2)]
    assert runs[0].returncode == -9 and os.path.exists(marker)  # killed in step 5, after the pack shrank
    assert runs[1].returncode == 0, runs[1].stderr
    assert json.loads(runs[1].stdout.strip().splitlines()[-1]) == [5, 6]  # from the shrunk pack's checkpoint
    alone, packed = str(tmp_path / "alone"), str(tmp_path / "packed")
    trials = _rows(packed, "trials").set_index("trial_id")
    assert trials.status.to_dict() == {"a": "finished", "b": "diverged", "c": "finished", "d": "finished",
                                       "e": "finished"}
    assert trials.pack_offset.to_dict() == {"a": 0, "b": 0, "c": 0, "d": 1, "e": 3}
    assert trials.pack_slots.to_dict() == {"a": 3, "b": 3, "c": 3, "d": 2, "e": 2}  # slots when each row was written
    _same(_rows(alone, "epochs"), _rows(packed, "epochs"),
          ["epoch", "train_loss", "train_kl", "test_loss", "mutual_info", "units_in_use", "lr_now", "kl_weight"])
    _same(_rows(alone, "kl_per_dim"), _rows(packed, "kl_per_dim"), ["epoch", "dim", "kl", "activity"])
    _same(_rows(alone, "trials"), _rows(packed, "trials"), ["status", "epochs_done", "test_loss", "iw_nll"])
    # member-epochs a 3, b 1, c 3, d 3, e 3 = 13 in 3 x 3 + 3 x 2 slot-steps (18 had it kept its three slots)
    (u,) = pack_utilisation(Results(packed).read("trials")).itertuples()
    assert (u.slots, u.steps, u.member_epochs, u.slot_steps) == (3, 6, 13, 15)


def test_queues_spread_each_shape_over_slots_and_start_the_costliest_first():
    points = [dict(latent_dim=z, lr=lr, beta=b) for z in (2, 50) for lr in (1e-3, 1e-2) for b in range(12)]
    slots = packing.slots_for(points, concurrent=2)
    assert slots == 6  # 48 configurations over 2 trials at once, about DEPTH = 4 through each slot
    qs = packing.queues(points, slots, concurrent=2, cost=lambda p: p["latent_dim"])
    # each shape dealt to the 2 trials at once, the costliest shape first: both trials start it and end it together
    assert [(len(q), q[0]["latent_dim"]) for q in qs] == [(12, 50), (12, 50), (12, 2), (12, 2)]
    assert all(len({p["latent_dim"] for p in q}) == 1 for q in qs)
    assert sorted(map(str, sum(qs, []))) == sorted(map(str, points))
    # dealt in turn: each queue holds both learning rates and every other beta, in the shape's order
    assert [(p["lr"], p["beta"]) for p in qs[1]] == [(lr, b) for lr in (1e-3, 1e-2) for b in range(1, 12, 2)]
    # one shape and more trials at once: a queue for each
    one = [p for p in points if p["latent_dim"] == 2]
    assert [len(q) for q in packing.queues(one, 12, concurrent=4)] == [6, 6, 6, 6]
    # a deep shape: more queues, still a multiple of the trials at once (96 by 3 slots, about 4 deep: 8 of 12)
    many = [dict(latent_dim=2, lr=1e-3, beta=b) for b in range(96)]
    assert [len(q) for q in packing.queues(many, 3, concurrent=2)] == [12] * 8
    assert packing.queues(one, 1, concurrent=2) == [[p] for p in packing.by_shape(one)[0]]  # one slot: alone


def test_utilisation_reads_the_slot_steps_a_pack_recorded_and_a_stopped_members_row_keeps_them(tmp_path):
    """A pack's slot-steps are its members' latest `pack_slot_steps` (fewer than slots x steps once it shrank);
    tables written before that column say slots x steps. A member that `settle_trials` marks afterwards (a signal
    ended the sweep) keeps the pack columns the loop wrote for it."""
    from tune.points import trial_key
    from tune.space import SweepConfig
    from tune.sweep import settle_trials
    from vae.tables.results import epoch_row, file_key, slot_utilisation, trial_row

    sweep = SweepConfig(dataset="gaussian2d", model="linear", decoder_var="1", latent_dims="2", lrs="1e-2",
                        betas="1,2", storage=str(tmp_path), name="s")
    res = Results(f"{tmp_path}/s")
    where = [dict(latent_dim=2, lr=1e-2, beta=b, seed=0) for b in (1.0, 2.0)]
    for p, (status, done, offset) in zip(where, [("finished", 4, 0), ("running", 3, 2)]):
        tid = trial_key(p)
        res.write("trials", [trial_row(sweep.trial_config(trial_id=tid, **p), tid, status, "", done, {}, 1.0,
                                       pack_id="pk", pack_slots=3, pack_offset=offset, pack_slot_steps=10)],
                  file_key(tid))
    tid = trial_key(where[1])  # the member still training when the signal came: epochs 0 to 3 written
    row = epoch_row(sweep.trial_config(**where[1]), tid, 0, 1.0, None, None, 0, 0)
    res.write("epochs", [{**row, "epoch": e} for e in range(4)], file_key(tid))

    class Result:  # what Tune's ResultGrid hands settle_trials for the pack's trial
        config, error = {"members": where}, None

    settle_trials(sweep, [Result()], interrupted="SIGTERM")
    trials = res.read("trials").set_index("trial_id")
    assert trials.loc[tid, "status"] == "interrupted"
    assert trials.loc[tid, ["pack_slots", "pack_offset", "pack_slot_steps"]].tolist() == [3, 2, 10]
    (u,) = pack_utilisation(res.read("trials")).itertuples()
    assert (u.slots, u.steps, u.member_epochs, u.slot_steps) == (3, 5, 7, 10) and u.utilisation == 0.7
    old = res.read("trials").assign(pack_slot_steps=None)  # a table from before the column
    assert slot_utilisation(pack_utilisation(old)) == 7 / 15

