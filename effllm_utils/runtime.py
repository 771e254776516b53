"""Where a study runs: device resolution with one clear error when a profile's hardware is missing, and seeding."""
from __future__ import annotations

import random

PROFILE_DEVICE = {"tiny": "cpu", "gpu": "cuda", "paper": "cuda"}


def resolve_device(profile: str, device: str = "auto") -> str:
    """'auto' -> the profile's device. A CUDA device requested where none exists is a ValueError saying what to do;
    the tiny profile may run on a GPU when asked (device='cuda')."""
    import torch

    if profile not in PROFILE_DEVICE:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILE_DEVICE)}")
    dev = PROFILE_DEVICE[profile] if device == "auto" else device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"profile {profile!r} needs a CUDA GPU (device={dev!r}) but torch sees none "
                         f"(torch {torch.__version__}, cuda {torch.version.cuda}); run PROFILE=tiny on this machine "
                         f"or install a CUDA build of torch on a GPU host")
    if not (dev == "cpu" or dev.startswith("cuda")):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    return dev


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
