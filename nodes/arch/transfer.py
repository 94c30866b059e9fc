"""Copies from host memory to an accelerator that do not make the host wait."""

from __future__ import annotations

import torch


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``. A copy from pageable host memory to a CUDA device waits until the stream has run
    every kernel queued before it (the host stops queueing work); from pinned memory with ``non_blocking`` the copy is
    queued like a kernel, and torch keeps the pinned block until it has run."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
