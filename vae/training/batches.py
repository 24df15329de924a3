"""What a pack's training steps read in one epoch: each member's shuffled shard of its training split (the
same order on every rank, each rank its own slice), gathered a batch at a time, and each member's noise.

binarized-mnist's images are binarized afresh each epoch, one binarization per seed that draws (seeded by seed
and epoch: every rank and a resumed run see the same images). Members with one seed at one epoch share one
shuffle, one noise stream and one gathered batch a step (their layers then take it as one wide product).
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from vae.model import streams
from vae.model.data import binarize, shard_indices
from vae.training import pack


def shard_digest(idx: torch.Tensor) -> str:
    """A short fingerprint of the indices a rank trained on in one epoch."""
    return hashlib.sha1(idx.cpu().numpy().tobytes()).hexdigest()[:16]


def epoch_source(run, drawing) -> tuple[torch.Tensor, torch.Tensor]:
    """The training examples this step's batches are gathered from, and each slot's offset into them: the
    splits as loaded, or (binarized-mnist) one binarization of them per (seed, epoch) the `drawing` members
    train this step."""
    if not run.datas[0].dynamic:
        return run.train_x, run.offsets
    draws = list(dict.fromkeys((m.cfg.seed, m.epoch) for m in drawing))
    bits = torch.cat([binarize(run.train_x, streams.binarization(s, e, run.device)) for s, e in draws])
    return bits, torch.tensor([draws.index((m.cfg.seed, m.epoch)) * run.n_train for m in drawing])[:, None]


class Batches:
    """One step's batches of every slot's member, in order (`for xb, eps in Batches(run)`): each member's
    shuffle, noise and (binarized-mnist) binarization of its current epoch `m.epoch`."""

    def __init__(self, run):
        cfg, rank, world = run.cfg, run.session.rank, run.session.world_size
        self.run, self.k = run, len(run.members)
        self.drawing = run.members[:1] if run.shared() else list(run.members)  # one seed and epoch: one draw
        self.source, offsets = epoch_source(run, self.drawing)
        self.idx = torch.stack([shard_indices(run.n_train, rank, world, m.epoch, m.cfg.seed)
                                for m in self.drawing])  # [K, n] or [1, n]
        self.flat = (self.idx + offsets[:len(self.drawing)]).to(run.device)
        self.offsets = offsets
        self.batch = cfg.batch_size // world
        self.steps = -(-self.idx.shape[1] // self.batch)
        # per epoch: a resumed run replays exactly
        self.gens = [streams.train_noise(m.cfg.seed, m.epoch, rank, run.device) for m in self.drawing]
        self.samples = cfg.train_samples

    def digests(self) -> list[str]:
        return [shard_digest(i) for i in self.idx]  # one per order drawn

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self.steps):
            yield self.gather(self.flat[:, step * self.batch:(step + 1) * self.batch], self.gens)

    def gather(self, rows: torch.Tensor, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at `rows` ([K or 1, B] indices into the source) and its noise [S, K, B, L] from `gens`."""
        run, k, size = self.run, self.k, rows.shape[1]
        latent = run.cfg.latent_dim
        xb = torch.index_select(self.source, 0, rows.reshape(-1)).to(run.train_x.dtype)  # 3x x[idx]
        if len(gens) == 1:  # every member's own stream, which is the same stream
            eps = pack.shared_by_members(torch.randn(self.samples, size, latent, generator=gens[0],
                                                     device=run.device), k, 1)
            return xb, eps
        eps = torch.stack([torch.randn(self.samples, size, latent, generator=g, device=run.device) for g in gens], 1)
        return xb.view(k, size, -1), eps

    def random(self, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of random training examples of each drawing member (aggressive training's inner steps), drawn
        with `gens` (one per drawing member; the same generators give the same batches)."""
        picks = torch.stack([torch.randint(self.run.n_train, (self.batch,), generator=g, device=g.device) for g in gens])
        return self.gather((picks + self.offsets[:len(gens)]).to(self.run.device), gens)
