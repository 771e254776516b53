"""Where a study runs: device resolution with one clear error when a profile's hardware is missing, and seeding."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import random
import sys

PROFILE_DEVICE = {"tiny": "cpu", "small": "cpu", "gpu": "cuda", "paper": "cuda"}


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


def _libc_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim with
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def trim_heap() -> bool:
    """Give glibc's free heap pages back to the OS (`malloc_trim(0)`), so RSS is live memory; False where the C
    library has no malloc_trim."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def release_memory() -> None:
    """Hand freed memory back before a measurement: collect Python's garbage, empty torch's CUDA cache (if CUDA is
    initialised in this process) and trim the C heap."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    trim_heap()
