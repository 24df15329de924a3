"""Checkpoints of a training pack: where it picks up (the checkpoint vae/training/resume.py's rules choose, loaded on
every rank), and the state saved with each epoch's report (rank 0).

A checkpoint holds the pack's model and optimiser, every member's schedule, status, settle epoch and last
metrics, which configuration each slot holds and which have departed, and the wall time so far (vae/training/checkpoint.py writes and checks the file).
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any, Callable

import pyarrow.dataset as ds
import torch

from vae.training import checkpoint, resume
from vae.training.pack import LIVE, Members, freeze
from vae.tables.results import Results
from vae.training.session import from_rank0


def choose(session, members: Members, results: Results | None, note: Callable[..., None]) -> dict[str, Any] | None:
    """The checkpoint vae/training/resume.py chooses, loaded (None: start afresh). `note(**fields)` records how
    it resumed in run.json. Its `extra["members"]` are the slots it had: fewer than the pack's when it had
    given up ended slots (pack.shrink); the loop shrinks to them before `load`."""
    def say(text: str, key: str) -> None:  # every rank makes the same choice: rank 0 says it
        if session.rank == 0:
            print(text, file=sys.stderr, flush=True)
            note(**{key: text})

    with session.latest_checkpoint() as folder:
        if folder is None:
            ids = [m.trial_id for m in members]
            if results is not None and len(results.read("epochs", ds.field("trial_id").isin(ids))):
                say("no checkpoint of the epochs already in the tables (its worker died before Ray registered "
                    "the last one it reported, or none was kept): training again from the start (seeded: the same "
                    "rows come out)", "redone")
            return None
        state = resume.latest_readable(folder, members.pack_id, say)
        gap, lacking = _first_gap(session, members, results, int(state["epoch"]), resume.saved_members(state["extra"]))
        if gap >= 0:
            state = resume.before(folder, members.pack_id, gap, lacking, say)
    return state


def load(state: dict[str, Any], members: Members, model: torch.nn.Module, opt, schedules) -> tuple[int, float]:
    """The chosen checkpoint into the pack (as many slots as it saved); returns (the last finished step, the
    wall seconds spent before it)."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    extra = state["extra"]
    schedules.load_state_dict(extra["schedules"])
    done = int(state["epoch"])
    for m, s in zip(members, members.restore(extra)):
        m.load(s)
        # diverged stays so; finished is judged again (a rerun may raise the budget); interrupted goes on
        m.status = "diverged" if s.get("status") == "diverged" else m.ended_by(m.epoch)
        freeze(opt, m.k, m.status != LIVE)
    return done, float(extra.get("wall_seconds", 0.0))


def _first_gap(session, members: Members, results: Results | None, done: int,
               saved: list[dict[str, Any]]) -> tuple[int, str]:
    """`resume.first_gap` of this pack's rows: rank 0 reads the tables, every rank hears the epoch."""
    gap, lacking = -1, ""
    if session.rank == 0:
        ids = [s["trial_id"] for s in saved]
        have = {t: set(zip(rows.trial_id, rows.epoch.astype(int))) for t in resume.EPOCH_TABLES
                for rows in [results.read(t, ds.field("trial_id").isin(ids))]}
        gap, lacking = resume.first_gap(have, ids, saved, done)
    (gap,) = from_rank0([gap], session.world_size, torch.device(session.device))
    return int(gap), lacking


def report(session, epoch: int, metrics: dict[str, Any], members: Members, model: torch.nn.Module, opt,
           schedules, wall_seconds: float) -> None:
    """The epoch's report; rank 0 saves the checkpoint with it (the others report without one)."""
    if session.rank != 0:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as folder:
        checkpoint.save(folder, model_state=model.state_dict(), optimizer_state=opt.state_dict(), epoch=epoch,
                        trial_id=members.pack_id,
                        extra={"wall_seconds": wall_seconds, "schedules": schedules.state_dict(), **members.saved()})
        session.report(metrics, folder)
