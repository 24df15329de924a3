"""python -m bench.decoders: the training step's cost of the stronger decoders against the factorised one.

One training step (forward, backward, Adam) of the pytorch/examples MLP VAE on binarized MNIST at batch 128,
with each decoder: factorised, autoregressive at W = 28, 112 and 784, and the small gated PixelCNN. The
decoders are timed in interleaved rounds in this one process (this shared machine drifts), each round's ratio
taken against the factorised step of the same round; the median and spread over rounds are printed and written
as Markdown to docs/decoders.md (bench/pages.py) (goal of the issue: at most 2x at W = 784).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from bench import pages
from vae.config import TrainConfig, resolve
from vae.model import fast
from vae.model.models import model_for
from vae.training.step import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 128
CONTENDERS = [("factorised", {}), ("autoregressive W=28", {"decoder": "autoregressive", "decoder_context": 28}),
              ("autoregressive W=112", {"decoder": "autoregressive", "decoder_context": 112}),
              ("autoregressive W=784", {"decoder": "autoregressive", "decoder_context": 784}),
              ("pixelcnn L=4", {"decoder": "pixelcnn", "decoder_layers": 4})]


def step_seconds(settings: dict, steps: int) -> float:
    """Seconds per training step of the MLP VAE with `settings`' decoder (after a warm-up)."""
    cfg = resolve(TrainConfig(dataset="binarized-mnist", name="bench", **settings))
    torch.manual_seed(0)
    model = fast.accelerate(model_for(cfg, 784))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(BATCH, 784, generator=gen) < 0.3).float()
    eps = torch.randn(1, BATCH, cfg.latent_dim, generator=gen)
    for _ in range(3):
        train_step(model, opt, x, eps, 1.0, 0.0)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, x, eps, 1.0, 0.0)
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.decoders", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "decoders.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ratios: dict[str, list[float]] = {name: [] for name, _ in CONTENDERS}
    millis: dict[str, list[float]] = {name: [] for name, _ in CONTENDERS}
    for r in range(args.rounds):
        base = None
        for name, settings in CONTENDERS:
            s = step_seconds(settings, args.steps if "pixelcnn" not in name else max(3, args.steps // 10))
            base = s if base is None else base
            ratios[name].append(s / base)
            millis[name].append(1000 * s)
        print(f"bench.decoders: round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {millis[n][-1]:.2f} ms" for n, _ in CONTENDERS), flush=True)
    body = [f"{torch.get_num_threads()} torch threads. One training step (forward, backward, Adam) of the "
            f"pytorch/examples MLP VAE (784-400-20) on binarized MNIST at batch {BATCH}, each decoder timed in "
            "interleaved rounds; ratios against the factorised step of the same round (median, and the spread over "
            "rounds). The issue's goal: at most 2x at W = 784.", ""]
    body += pages.table(["decoder", "ms a step (median)", "x the factorised step", "spread of the ratio"],
                        [(name, f"{statistics.median(millis[name]):.2f}", f"{statistics.median(ratios[name]):.2f}",
                          f"{min(ratios[name]):.2f} to {max(ratios[name]):.2f}") for name, _ in CONTENDERS])
    print(pages.write(args.out, "The stronger decoders' training step", "bench.decoders", argv, body), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
