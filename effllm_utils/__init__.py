"""effllm_utils: the package behind the effllm notebooks.

Layers, each importing only the ones above it in this list (a study never imports another study; the report reads
records, the registry and `measure`, never study code):
  core/      records, run ids, atomic IO, provenance, execute, aggregate (values with their spread), params, runtime
  data/      the embedded corpus and tokenizer, Hub text datasets, image sets and the vlm's digit task
  measure/   metrics table, FLOP counts, device peaks, telemetry, hardware calibration, FID
  models/    the backbone, baselines, technique specs -> models, DiT, the LLaVA-style VLM, conversions, Hub loaders
  engine/    training, fine-tuning methods, the suite's pretrained bases, inference, quantization, decode kernels
  studies/   one module per study family, and the registry (the only list of studies)
  report/    tables, plots, each study's views, the paper's values, the claims check, the HTML report
  cli/       reproduce, bench, report (`python -m effllm_utils.cli.<name>`)
This file holds what every layer needs: profiles, paths and the checks of names.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

__version__ = "0.1.0"

PROFILES = ("tiny", "small", "gpu", "paper")
# Seeds a profile runs by default (`make reproduce PROFILE=small` = `--seeds 0,1,2`); the others run once (seed 0).
PROFILE_SEEDS = {"small": (0, 1, 2)}


class _CudaKernelsOnCpuHost(logging.Filter):
    """torchao's wheel carries CUDA-only kernels (_C_mxfp8, _C_cutlass_90a); on a host without CUDA each import logs
    "Failed to load ...so". effllm's CPU paths (int8 weight-only) do not use them, so on such a host the lines are
    dropped; on a CUDA host they are kept (there they mean something)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to load"):
            return True
        import torch

        return torch.cuda.is_available()


logging.getLogger("torchao").addFilter(_CudaKernelsOnCpuHost())


def repo_root() -> Path:
    """The effllm checkout (holds notebooks/ and params/); override with $EFFLLM_ROOT."""
    if "EFFLLM_ROOT" in os.environ:
        return Path(os.environ["EFFLLM_ROOT"]).resolve()
    return Path(__file__).resolve().parents[1]


def outputs_dir(profile: str) -> Path:
    """outputs/<profile>/ (records, executed notebooks, figures, tables); override the root with $EFFLLM_OUTPUTS."""
    check_profile(profile)
    root = Path(os.environ["EFFLLM_OUTPUTS"]) if "EFFLLM_OUTPUTS" in os.environ else repo_root() / "outputs"
    return root / profile


def cache_dir() -> Path:
    """Where derived artefacts that are expensive to rebuild live (tokenizers); override with $EFFLLM_CACHE."""
    path = Path(os.environ.get("EFFLLM_CACHE", Path.home() / ".cache" / "effllm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return profile


def check_choices(values, allowed, what: str) -> list:
    """Every value must be one of `allowed`; otherwise one ValueError naming the bad ones and the choices."""
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return list(values)


def config_args(cls, exclude=()) -> list[str]:
    """The named arguments of a config class's constructor (`**kwargs` and `exclude` left out): what a params dict
    may set on it."""
    import inspect

    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind is not p.VAR_KEYWORD and n not in exclude]


def check_keys(keys, valid, where: str, what: str = "key") -> None:
    """Every key must be in `valid`; otherwise one ValueError naming the unknown ones, each with its closest valid
    name. For dicts that configs would take silently (a misspelt key trains the default under the wrong name)."""
    import difflib

    valid = list(valid)
    unknown = [k for k in keys if k not in valid]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else "")
                 for k in unknown]
        listed = f"; valid: {', '.join(valid)}" if len(valid) <= 50 else ""
        raise ValueError(f"{where}: unknown {what}{'s' * (len(unknown) > 1)} {', '.join(hints)}{listed}")


def check_study(study: str) -> str:
    """A study id of the registry (effllm_utils.studies.registry: a dependency-free list), else one ValueError."""
    from .studies import registry

    registry.get(study)
    return study
