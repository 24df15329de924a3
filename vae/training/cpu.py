"""CPU tuning for the training loop, in one place: glibc's allocator, and denormal floats.

Nothing here changes what is computed, only how fast a CPU computes it; on a GPU every call is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Iterable, Iterator

import torch

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32: below it, the CPU's slow path


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of handing it back to the kernel after every step.

    A training step frees and re-allocates the same few MB of activations and gradients; with glibc's
    defaults, blocks above the mmap threshold and the trimmed top of the heap are returned to the kernel and
    page-faulted back in on the next step (measured on the AMD EPYC: 2.9 -> 2.5 ms a step; on the Intel
    Xeon, whole training runs with and without it are within noise, 0.99 to 1.02x, in an interleaved A/B).
    It is not part of the start-up probe: once set, glibc's dynamic mmap threshold (its real default)
    cannot be restored to compare against. The heap may keep up to 256 MiB that is free; blocks of 32 MiB
    and more (the dataset) are still mapped separately.
    Returns whether glibc took the settings (False elsewhere, e.g. musl or macOS).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return all(libc.mallopt(k, v) == 1 for k, v in ((m_mmap_threshold, 32 << 20),
                                                          (m_trim_threshold, 256 << 20), (m_top_pad, 64 << 20)))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def flushing_denormals(device: torch.device) -> Iterator[None]:
    """While the loop runs on a CPU, this thread flushes denormal floats (below 1.2e-38) to zero, as GPUs do:
    they take the slow path, up to 100x an operation, and build up in long runs (the decoder weights and
    Adam moments of MNIST's always-black pixels decay towards zero; a linear VAE pack's epoch went from 2 s
    to 14 s). The caller's floating-point mode is restored on the way out."""
    flushing = device.type == "cpu" and (torch.tensor([1e-39]) * 1.0).item() != 0.0
    if flushing:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)


@torch.no_grad()
def clear_denormals(tensors: Iterable[torch.Tensor]) -> None:
    """Denormal values set to zero in place (after every epoch, for weights and optimiser moments: that covers
    torch's other threads, which the flush mode of this one does not reach). CPU only."""
    for t in tensors:
        if t.device.type == "cpu":
            t.masked_fill_(t.abs() < TINY, 0.0)
