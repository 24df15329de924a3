"""Checkpoints hold tensors and plain data only, and are loaded without pickle code.

One file, `state.pt`, per checkpoint folder: the model and optimizer state
dicts, the last finished epoch, and the trial it belongs to. Loading uses
`torch.load(..., weights_only=True)`, so a crafted file cannot run code; a
file that is not ours (or is truncated) is refused with the reason.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import torch

FORMAT = "vae-collapse-checkpoint/1"
FILENAME = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why."""


def save(folder: str, *, model_state: dict, optimizer_state: dict, epoch: int, trial_id: str,
         extra: dict[str, Any] | None = None) -> str:
    """Write `folder/state.pt` atomically (temp file + rename)."""
    os.makedirs(folder, exist_ok=True)
    payload = {"format": FORMAT, "epoch": int(epoch), "trial_id": trial_id,
               "model": model_state, "optimizer": optimizer_state, "extra": extra or {}}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, os.path.join(folder, FILENAME))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return os.path.join(folder, FILENAME)


def load(folder: str, trial_id: str | None = None) -> dict[str, Any]:
    """Read and check `folder/state.pt`; tensors are mapped to the CPU."""
    path = os.path.join(folder, FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {folder} has no {FILENAME}")
    with open(path, "rb") as fh:
        return from_bytes(fh.read(), path, trial_id)


def from_bytes(data: bytes, path: str, trial_id: str | None = None) -> dict[str, Any]:
    """A checkpoint file's bytes, loaded as tensors and plain data only (nothing in it runs) and checked."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError/EOFError for truncation
        raise CheckpointError(f"checkpoint {path} refused: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
    return check_payload(payload, path, trial_id)


def check_payload(payload: Any, path: str, trial_id: str | None = None) -> dict[str, Any]:
    """A loaded checkpoint that is ours (and `trial_id`'s, when given), or CheckpointError."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} refused: not a {FORMAT} file")
    if trial_id is not None and payload.get("trial_id") != trial_id:
        raise CheckpointError(f"checkpoint {path} belongs to trial {payload.get('trial_id')!r}, not {trial_id!r}")
    return payload
