"""A trained VAE back from its checkpoint: `load_model(run, trial_id=None, epoch=None)` -> `TrainedVAE`.

    import vae
    model = vae.load_model("results/toy")   # the latest checkpoint of the run's (or a sweep trial's) model
    mu, logvar = model.encode(x); x_hat = model.decode(mu); draws = model.sample(16, seed=0)

Checkpoints hold weights only and are loaded with `torch.load(weights_only=True)`; a packed trial's
checkpoint holds its whole pack, and the member asked for is sliced out of it (`vae.training.pack.member_slice`).
"""

from __future__ import annotations

from typing import Any, Mapping

import pyarrow.fs as pafs
import torch

from vae.config import TrainConfig
from vae.model.sources import INPUT_DIM
from vae.model.models import model_for
from vae.tables.results import CONFIG_COLUMNS, Results
from vae.training.checkpoint import CheckpointError, from_bytes
from vae.training.pack import member_slice


class TrainedVAE:
    """A trained VAE back from its checkpoint, for what a user does with one.

    encode(x) -> (mu, logvar) of q(z|x); decode(z) -> Bernoulli means (pixel intensities) for the MLP, the
    Gaussian's (mean, variance) for the others; sample(n) -> decoded draws of z ~ N(0, I) (means);
    reconstruct(x) -> decode(E[z|x]). Inputs are moved to the model's device; no gradients are kept.
    """

    def __init__(self, model, config: Mapping[str, Any], trial_id: str, epoch: int):
        self.model, self.config, self.trial_id, self.epoch = model.eval(), dict(config), trial_id, epoch
        self.device = next(model.parameters()).device

    def __repr__(self) -> str:
        return (f"TrainedVAE({self.config.get('model')}, latent {self.model.latent_dim}, trial {self.trial_id!r}, "
                f"epoch {self.epoch}, {self.device})")

    def _in(self, x):
        return torch.as_tensor(x, dtype=torch.float32).to(self.device)

    def encode(self, x):
        with torch.no_grad():
            return self.model.encode(self._in(x))

    def decode(self, z):
        with torch.no_grad():
            out = self.model.decode(self._in(z))
            if self.model.likelihood == "bernoulli":
                return torch.sigmoid(out)
            mean, logvar = out
            return mean, logvar.exp()

    def sample(self, n: int, seed: int | None = None):
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(n, self.model.latent_dim, generator=gen)
        decoded = self.decode(z)
        return decoded if self.model.likelihood == "bernoulli" else decoded[0]

    def reconstruct(self, x):
        mu, _ = self.encode(x)
        decoded = self.decode(mu)
        return decoded if self.model.likelihood == "bernoulli" else decoded[0]


def _checkpoints(res: Results) -> list[str]:
    """Every checkpoint file (`state.pt`) under a run's folder, at any depth."""
    infos = res.fs.get_file_info(pafs.FileSelector(res.path, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File and i.base_name == "state.pt"]


def load_model(path_or_uri: str, trial_id: str | None = None, epoch: int | None = None,
               device: str = "cpu") -> TrainedVAE:
    """The trained VAE of a run (or of one trial of a sweep) from its checkpoint: the latest, or `epoch`.

    Checkpoints hold weights only and are loaded with `torch.load(weights_only=True)`."""
    res = Results(path_or_uri)
    trials = res.read("trials")
    if trials.empty:
        raise FileNotFoundError(f"no trials at {path_or_uri}")
    if trial_id is None:
        if len(trials) > 1:
            raise ValueError(f"{path_or_uri} holds {len(trials)} trials: pass trial_id= "
                             f"(e.g. {trials.trial_id.iloc[0]!r})")
        trial_id = str(trials.trial_id.iloc[0])
    match = trials[trials.trial_id == trial_id]
    if match.empty:
        raise KeyError(f"no trial {trial_id!r} in {path_or_uri}")
    row = match.iloc[0]
    found, refused = [], []
    pack_id = str(row.pack_id) if isinstance(row.get("pack_id"), str) and row.pack_id else trial_id
    for path in _checkpoints(res):
        with res.fs.open_input_file(path) as src:
            try:
                payload = from_bytes(src.read(), path, pack_id)
            except CheckpointError as e:
                if "belongs to trial" not in str(e):  # not another trial's (or pack's): not ours at all
                    refused.append(path)
                continue
        found.append(payload)
    if epoch is not None:
        found = [p for p in found if int(p["epoch"]) == epoch]
    if not found and refused:
        raise CheckpointError(f"{refused[0]} is not a checkpoint this project wrote (it does not hold tensors and "
                              "plain data only, or is cut short) and was not loaded")
    if not found:
        raise FileNotFoundError(f"no checkpoint of trial {trial_id!r}" + (f" at epoch {epoch}" if epoch is not None else "")
                                + f" under {path_or_uri} (Ray keeps the latest two)")
    payload = max(found, key=lambda p: int(p["epoch"]))
    saved = {k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in CONFIG_COLUMNS}  # numpy -> Python
    model = model_for(TrainConfig(**saved), INPUT_DIM[row.dataset])
    members = [m.get("trial_id") for m in payload["extra"].get("members", [])]
    if len(members) > 1:  # a packed trial's checkpoint holds its whole pack: this member's slice
        model.load_state_dict(member_slice(payload["model"], members.index(trial_id), model.state_dict()))
    else:
        model.load_state_dict(payload["model"])
    return TrainedVAE(model.to(device), row.to_dict(), trial_id, int(payload["epoch"]))


__all__ = ["TrainedVAE", "load_model"]
