"""Aggressive inference-network training (He et al. 2019, "Lagging inference networks and posterior collapse").

While a member is in its aggressive phase, each training step is preceded by encoder-only steps on fresh random
batches, each batch's loss measured before the encoder steps on it (held out from that step), until that loss
stops falling: the summed loss of the last `WINDOW` inner steps is no lower than that of the `WINDOW` before, or
`MAX_INNER` steps. The step itself then updates the decoder alone. The phase ends, member by member, after the
first epoch whose I(x; z) on the test subset (vae/training/evaluation.py) does not exceed the phase's best; from
then on the member trains as a plain VAE. The optimiser is split in two (pack_adam.EncoderDecoderAdam).
"""

from __future__ import annotations

from vae.model import streams
from vae.training.batches import Batches
from vae.training.pack import LIVE, Member
from vae.training.step import train_step

MAX_INNER = 100  # He et al.'s cap on the inner loop
WINDOW = 10  # inner steps whose summed loss is compared with the window before


def in_phase(members) -> list[int]:
    """The live members still in their aggressive phase."""
    return [m.k for m in members if m.status == LIVE and m.aggressive]


def encoder_steps(run, batches: Batches, step: int, weight, free_bits, iwae: bool, members: list[int]) -> int:
    """Encoder-only steps for `members` (their aggressive phase) until their loss stops falling; returns the
    number taken. Other members' encoders and every decoder stay as they are."""
    gens = [streams.aggressive_batches(m.cfg.seed, m.epoch, step, run.session.rank, run.device)
            for m in batches.drawing]
    losses_seen: list[float] = []
    for inner in range(MAX_INNER):
        xb, eps = batches.random(gens)
        recon, kl_dims = train_step(run.model, run.opt, xb, eps, weight, free_bits, iwae,
                                    encoder_for=members, decoder=False)
        per_member = (recon.detach().mean(-1) + kl_dims.detach().sum(-1).mean(-1)).reshape(-1)
        losses_seen.append(float(per_member[members].sum()))
        if (inner + 1) % WINDOW == 0 and len(losses_seen) >= 2 * WINDOW:
            if sum(losses_seen[-WINDOW:]) >= sum(losses_seen[-2 * WINDOW:-WINDOW]):
                return inner + 1
    return MAX_INNER


def end_of_epoch(m: Member, mutual_info: float) -> None:
    """The phase ends after the first epoch whose I(x; z) does not exceed the phase's best (rank 0 decides;
    the loop tells every rank)."""
    if not m.aggressive:
        return
    if mutual_info > m.best_mi:
        m.best_mi = mutual_info
    else:
        m.aggressive = False

