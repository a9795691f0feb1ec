"""What a torch device can compute: some features need a float32 path where the device has no float64."""

from __future__ import annotations

import torch

# Apple's MPS backend has neither float64 tensors nor linalg SVD and eigh kernels (nor, in many torch releases, QR).
_NO_FLOAT64 = frozenset({"mps"})


def has_float64(device: torch.device | str) -> bool:
    """Whether tensors of this device can be float64."""
    return torch.device(device).type not in _NO_FLOAT64


def has_svd(device: torch.device | str) -> bool:
    """Whether torch.linalg's SVD runs on this device (it does not on MPS)."""
    return torch.device(device).type not in _NO_FLOAT64


def dense_linalg_device(device: torch.device | str) -> torch.device:
    """Where torch.linalg's dense factorisations (QR, eigh, SVD) of small matrices from `device` run: the device
    itself, or the CPU for MPS (no kernels there in many torch releases, and a tall QR far slower than the CPU's
    in the others)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type in _NO_FLOAT64 else device


def exact_dtype(device: torch.device | str, float64: bool | None = None) -> torch.dtype:
    """The dtype for a numerically careful step: float64 unless the caller or the device rules it out."""
    if float64 is None:
        float64 = has_float64(device)
    return torch.float64 if float64 else torch.float32


def singular_values(x: torch.Tensor, on_device: bool | None = None) -> torch.Tensor:
    """torch.linalg.svdvals of x [..., T, C] in float32, on the CPU where the device has no SVD (None: detect)."""
    if on_device is None:
        on_device = has_svd(x.device)
    work = x.float() if on_device else x.detach().float().cpu()
    return torch.linalg.svdvals(work).to(x.device)
