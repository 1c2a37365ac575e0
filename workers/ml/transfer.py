"""Copies of host tensors (a training batch, a serving step's inputs) to a device that leave the host free to go on."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``. A CPU tensor bound for a GPU goes through pinned memory: a copy from pageable memory
    may wait for everything already queued on the device before it starts, and a step's first copy would then hold
    the host until the previous step is done, leaving the device idle while the host queues the next one. From pinned
    memory the copy is queued like a kernel and the host goes on."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=True)
