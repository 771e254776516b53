"""What produced a record: git sha and dirty flag, package versions, device, driver, CPU; and the drift of package
versions across records.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from effllm_utils import repo_root

if TYPE_CHECKING:
    from effllm_utils.core.runs import RunRecord


_PACKAGES = ("torch", "transformers", "peft", "accelerate", "numpy", "papermill", "nvidia-ml-py", "gptqmodel",
             "torchao", "datasets", "tokenizers")


# -- environment ------------------------------------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _static_environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "hostname": platform.node(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count()}
    for pkg in _PACKAGES:
        try:
            env[f"{pkg}_version"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[f"{pkg}_version"] = None
    env.update(device_info())
    return env


# The code whose change changes what a study measures: every module of these layers, plus the study's own module.
_MEASURING_LAYERS = ("data", "measure", "models", "engine")


@functools.lru_cache(maxsize=None)
def _source_digest(path: str) -> str:
    """A hash of a module's syntax tree without docstrings and comments: editing prose is not a new definition."""
    tree = ast.parse(Path(path).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def code_version(study: str) -> str:
    """The version of the code that measures `study`: 8 hex digits of a hash over the data, measure, models and
    engine layers and the study's own module (effllm_utils.studies.<family>). Part of every run id, so records of
    other code are stale: never averaged with fresh ones, listed by the report, re-measured by `make reproduce`."""
    from effllm_utils.studies import registry

    root = Path(__file__).resolve().parents[1]
    files = sorted(p for layer in _MEASURING_LAYERS for p in (root / layer).rglob("*.py"))
    entry = registry.get(study)
    if entry.run is not None:
        files.append(root / "studies" / f"{entry.run.split(':')[0]}.py")
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(_source_digest(str(p)).encode())
    return h.hexdigest()[:8]


def stale(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """{study: its records made by other code than this checkout's} (a version-1 record has no code version)."""
    out: dict[str, list] = {}
    for r in records:
        if r.code_version != code_version(r.study):
            out.setdefault(r.study, []).append(r)
    return out


def device_info() -> dict[str, Any]:
    """device ('cuda:0 NVIDIA H100 80GB HBM3' or the CPU model), device_name, driver and CUDA versions."""
    info: dict[str, Any] = {"device_type": "cpu", "device_name": _cpu_model(), "driver_version": None,
                            "cuda_version": None, "gpu_count": 0}
    try:
        import torch

        if torch.cuda.is_available():
            info.update(device_type="cuda", device_name=torch.cuda.get_device_name(0),
                        cuda_version=torch.version.cuda, gpu_count=torch.cuda.device_count())
            import pynvml

            pynvml.nvmlInit()
            drv = pynvml.nvmlSystemGetDriverVersion()
            info["driver_version"] = drv.decode() if isinstance(drv, bytes) else drv
    except Exception as e:  # noqa: BLE001 - environment capture must never fail a run
        info["device_probe_error"] = f"{type(e).__name__}: {e}"
    return info


def device_name() -> str:
    """The name of the device runs are recorded on (the CUDA device, else the CPU model), cached per process."""
    return _static_environment()["device_name"]


def environment() -> dict[str, Any]:
    """What produced a record: git sha + dirty flag, versions, device, driver, CPU model."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": (bool(status) if status is not None else None), **_static_environment()}


def package_drift(records: list[RunRecord]) -> list[str]:
    """One line per package whose version differs between the records, or between them and this install (the locked
    versions, requirements.lock): numbers made with other software are not comparable without saying so."""
    installed = _static_environment()
    lines = []
    for pkg in _PACKAGES:
        key = f"{pkg}_version"
        seen: dict[str, int] = {}
        for r in records:
            if key in r.environment:
                v = str(r.environment[key])
                seen[v] = seen.get(v, 0) + 1
        now = str(installed.get(key))
        if seen and (len(seen) > 1 or now not in seen):
            made = ", ".join(f"{v} ({n} record{'s' * (n > 1)})" for v, n in sorted(seen.items()))
            lines.append(f"{pkg}: records made with {made}; this install has {now}")
    return lines
