"""Where a trial resumes from: its latest checkpoint, unless that cannot be read or the tables lack rows.

- The latest checkpoint cannot be read: the latest readable one kept beside it (Ray keeps two) instead.
- The tables lack a finished epoch's rows (a file that could not be read was set aside as
  `<file>.damaged`): the latest kept checkpoint before that epoch, or else the start. Training is seeded,
  so the redone epochs write the same rows.

Each choice other than the latest is said (`say(note, key)`: the loop prints it and notes it in run.json
under `restored_from` or `redone`). The rules are pure functions of checkpoint folders and of the
(trial, epoch) pairs the tables hold; the loop reads the tables and loads the state.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from vae.training import checkpoint

Say = Callable[[str, str], None]
# The per-epoch tables a finished epoch must have rows in (images/ only at snapshot epochs: not checked).
EPOCH_TABLES = ("epochs", "kl_per_dim")


def saved_members(extra: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each member's status, settle epoch, epochs, offset and last metrics as a checkpoint holds them: the
    slots' members and those that had departed their slots."""
    return list(extra["members"]) + list(extra.get("departed", ()))


def kept_beside(folder: str) -> list[str]:
    """The checkpoint folders kept beside `folder` (Ray keeps the latest two), newest first."""
    here = os.path.abspath(folder)
    paths = glob.glob(os.path.join(os.path.dirname(here), "checkpoint_*", checkpoint.FILENAME))
    return [os.path.dirname(p) for p in sorted(paths, key=os.path.getmtime, reverse=True)
            if os.path.dirname(p) != here]


def latest_readable(folder: str, pack_id: str, say: Say) -> dict[str, Any]:
    """The checkpoint in `folder`, or the latest readable one kept beside it; CheckpointError if none."""
    try:
        return checkpoint.load(folder, pack_id)
    except checkpoint.CheckpointError as damaged:
        for path in kept_beside(folder):
            try:
                state = checkpoint.load(path, pack_id)
            except checkpoint.CheckpointError:
                continue
            say(f"checkpoint {folder} could not be read ({damaged}); resumed from {path} "
                f"(epoch {state['epoch']}) instead", "restored_from")
            return state
        raise


def first_gap(have: Mapping[str, set[tuple[str, int]]], ids: Sequence[str], saved: Iterable[Mapping[str, Any]],
              done: int) -> tuple[int, str]:
    """The first step of the pack up to `done` whose rows some member lacks in one of `EPOCH_TABLES`
    (`have[table]`: the (trial_id, epoch) pairs it holds), and which; (-1, "") when none.

    A member's epoch e is the pack's step `offset + e` (its saved `offset`: 0 unless it took a refilled slot);
    a refilled member's epoch-0 rows are written with its first step's, `offset + 1`."""
    gap, lacking = -1, ""
    for tid, s in zip(ids, saved):
        offset = int(s.get("offset", 0))
        end = min(done - offset, int(s.get("epoch", s.get("metrics", {}).get("epoch", done))))
        for e in range(end + 1):
            # a member that diverged wrote its last epoch's row to epochs/ only
            need = ("epochs",) if s.get("status") == "diverged" and e == end else EPOCH_TABLES
            missing = [t for t in need if (tid, e) not in have[t]]
            if missing:
                step = offset + max(e, 1) if offset else e
                if gap < 0 or step < gap:
                    gap, lacking = step, f"epoch {e} of {tid} is missing from {'/ and '.join(missing)}/"
                break
    return gap, lacking


def before(folder: str, pack_id: str, gap: int, lacking: str, say: Say) -> dict[str, Any] | None:
    """The latest readable kept checkpoint before epoch `gap`, or None: train again from the start."""
    for path in [folder, *kept_beside(folder)]:
        try:
            state = checkpoint.load(path, pack_id)
        except checkpoint.CheckpointError:
            continue
        if int(state["epoch"]) < gap:
            say(f"{lacking} (a damaged file set aside): redoing epochs {int(state['epoch']) + 1} on, "
                f"from checkpoint {path} (epoch {state['epoch']})", "redone")
            return state
    say(f"{lacking} (a damaged file set aside) and no kept checkpoint precedes it: training again from the "
        "start (seeded: the same rows come out)", "redone")
    return None
