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


# The code whose change changes what a study measures: the modules of these layers that the study's run function
# imports, directly or through others (its own module included), the runtime helpers that seed runs, synchronize
# timers and release memory, and the data files beside a hashed module (the shipped corpus); a study without a run
# function: all of them and its notebook's code cells.
_MEASURING_LAYERS = ("data", "measure", "models", "engine")
_MEASURING_CORE = ("core/runtime.py",)
_DATA_SUFFIXES = (".xz", ".gz", ".json", ".jsonl", ".txt", ".csv", ".npz", ".pt")  # shipped data, not editor files


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=None)
def _source_digest(path: str) -> str:
    """A hash of a module's syntax tree without docstrings and comments (editing prose is not a new definition); of a
    notebook's code cells alike (IPython magics left out); of any other file's bytes."""
    f = Path(path)
    if not f.is_file():  # a notebook an installed package runs without (no checkout): that, not a crash
        return "missing"
    if f.suffix == ".py":
        return hashlib.sha256(ast.dump(_strip_docstrings(ast.parse(f.read_text()))).encode()).hexdigest()
    if f.suffix == ".ipynb":
        import json

        def cell(source: str) -> str:  # its syntax tree; a cell Python cannot parse (%%bash, x = !ls): its text
            code = "\n".join(line for line in source.splitlines() if not line.startswith(("%", "!")))
            try:
                return ast.dump(_strip_docstrings(ast.parse(code)))
            except SyntaxError:
                return source

        cells = [cell("".join(c["source"])) for c in json.loads(f.read_text())["cells"] if c["cell_type"] == "code"]
        return hashlib.sha256("\n".join(cells).encode()).hexdigest()
    return hashlib.sha256(f.read_bytes()).hexdigest()


def _module_files(dotted: str, root: Path) -> list[Path]:
    """The files that importing `dotted` (an effllm_utils module, or a name imported from one) executes: each
    package's __init__ on the way and the module itself; names that are not modules give none."""
    parts, files = dotted.split("."), []
    for i in range(2, len(parts) + 1):
        base = root.joinpath(*parts[1:i])
        for f in (base / "__init__.py", base.with_suffix(".py")):
            if f.is_file():
                files.append(f)
                break
    return files


def _imports(path: Path, root: Path) -> set[Path]:
    """The effllm_utils files one module imports anywhere in its body (lazy imports inside functions included, and
    `importlib.import_module` of a literal name)."""
    names = set()
    package = ["effllm_utils", *path.relative_to(root).parent.parts]  # where a relative import starts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return {f for n in names if n.split(".")[0] == "effllm_utils" for f in _module_files(n, root)}


@functools.lru_cache(maxsize=None)
def code_files(study: str) -> tuple[Path, ...]:
    """The files `code_version(study)` hashes: the study's module and every module of the data, measure, models and
    engine layers it imports, transitively (a study module it imports too), the runtime helpers (`core/runtime.py`)
    and the data files beside a hashed module; for a study without a run function (hardware: its notebook calls the
    layers), all of those layers and its notebook."""
    from effllm_utils.studies import registry

    root = Path(__file__).resolve().parents[1]
    entry = registry.get(study)
    if entry.run is None:
        from effllm_utils.core.params import notebook_path

        files = {p for layer in _MEASURING_LAYERS for p in (root / layer).rglob("*.py")} | \
            {root / c for c in _MEASURING_CORE} | {notebook_path(study)}  # hashed as "missing" if it is
    else:
        module = entry.run.split(":")[0]
        files = _closure(module if module.startswith("effllm_utils.") else f"effllm_utils.studies.{module}")
    return _with_data(files)


def _closure(*modules: str) -> set[Path]:
    """The hashed files (measuring layers, runtime helpers, study modules) that importing `modules` (dotted names)
    executes, transitively, the modules themselves included."""
    root = Path(__file__).resolve().parents[1]
    hashed = {p for layer in _MEASURING_LAYERS for p in (root / layer).rglob("*.py")} | \
        {root / c for c in _MEASURING_CORE} | \
        {f for f in (root / "studies").glob("*.py") if f.name not in ("__init__.py", "registry.py")}
    starts = [_module_files(m, root)[-1] for m in modules]
    seen, todo = set(), list(starts)
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(_imports(f, root) - seen)
    return {f for f in seen if f in hashed or f in starts}


def _with_data(files: set[Path]) -> tuple[Path, ...]:
    """`files` and the shipped data files beside each of its modules, sorted."""
    data = {d for f in files if f.suffix == ".py" for d in f.parent.iterdir()
            if d.is_file() and not d.name.startswith(".") and d.suffix in _DATA_SUFFIXES}
    return tuple(sorted(files | data))


def _digest(files) -> str:
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in files:  # named from the package (a notebook: notebooks/<name>), wherever the checkout is
        name = p.relative_to(package.parent).as_posix() if p.is_relative_to(package) else f"notebooks/{p.name}"
        h.update(name.encode())
        h.update(_source_digest(str(p)).encode())
    return h.hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def builder_version(*modules: str) -> str:
    """8 hex digits over the code that importing `modules` runs (as `code_version`): part of the key of a cached
    artifact built by that code (the pretrained base, the converted SmolLM2, the vision encoder), so a change to the
    code builds it again instead of reusing what the old code built."""
    return _digest(_with_data(_closure(*modules)))


@functools.lru_cache(maxsize=None)
def code_version(study: str) -> str:
    """The version of the code that measures `study`: 8 hex digits of a hash over `code_files(study)` (the study's
    module, the data, measure, models and engine modules it imports, the runtime helpers, the shipped data files).
    Part of every run id, so records of other code are stale: never averaged with fresh ones, listed by the report,
    re-measured by `make reproduce`. A change to code a study does not import (the decoder, for a pretraining
    study) leaves its records current."""
    return _digest(code_files(study))


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


# -- other work on the host while a run ran ----------------------------------------------------------------------

SHARED_CPU_WARN = 0.15  # other processes' share of the run's CPUs above which its times are suspect
_MIN_WINDOW_S = 1.0  # shorter blocks: /proc/stat's 10 ms ticks cannot tell


def _proc_cpu_s(stat: str) -> tuple[int, float]:
    """(parent pid, CPU seconds used: user + system) from one /proc/<pid>/stat line."""
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and parentheses
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_group() -> dict[int, float]:
    """{pid: CPU seconds} of this process, its live descendants (compile workers, data loaders) and, under a
    multi-process launch (LOCAL_WORLD_SIZE > 1: torchrun, accelerate), the sibling ranks and theirs: the job's own
    work, not other work."""
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                procs[int(d.name)] = _proc_cpu_s((d / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile
    roots = {os.getpid()}
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        roots |= {pid for pid, (ppid, _) in procs.items() if ppid == os.getppid()}
    group, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in group:
            group.add(pid)
            todo.extend(c for c, (ppid, _) in procs.items() if ppid == pid)
    return {pid: procs[pid][1] for pid in group if pid in procs}


def _cpu_snapshot() -> tuple[float, float, dict[int, float], float] | None:
    """(busy CPU seconds of this process's CPUs: user, nice, system, irq, softirq and steal; their total CPU seconds,
    idle included; {pid: CPU seconds} of the job's own processes; CPU seconds of this process's reaped children),
    from Linux's /proc; None without it."""
    try:
        import resource

        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}  # a Slurm or container cpuset: its CPUs only
        busy = total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name in cpus:
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
                busy += user + nice + system + irq + softirq + steal  # steal: the hypervisor gave the CPU away
                total += user + nice + system + idle + iowait + irq + softirq + steal
        if not total:
            return None
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        tick = os.sysconf("SC_CLK_TCK")
        return busy / tick, total / tick, _own_group(), reaped.ru_utime + reaped.ru_stime
    except (OSError, ValueError, ImportError, AttributeError):
        return None


def other_cpu_share(start, end) -> float | None:
    """The share of the CPUs' time between two `_cpu_snapshot`s that processes outside the job used, in [0, 1]; None
    if either is missing or the window is under _MIN_WINDOW_S of CPU time per CPU."""
    if start is None or end is None:
        return None
    busy, total = end[0] - start[0], end[1] - start[1]
    n_cpus = max(1, len(os.sched_getaffinity(0)))
    if total < _MIN_WINDOW_S * n_cpus:
        return None
    own = sum(cpu - start[2].get(pid, 0.0) for pid, cpu in end[2].items()) + (end[3] - start[3])
    return min(1.0, max(0.0, busy - own) / total)


class HostLoad:
    """The share of this process's CPUs that other work used while a block ran (`other_cpu_frac`: 0 alone, 0.5 when
    other processes kept half of them busy, the hypervisor's steal included; None off Linux or under a second of
    CPU time). The job's own processes do not count: this one, its live descendants, and under torchrun or
    accelerate the sibling ranks. A run that shared its CPUs has distorted step times, throughput and latency (its
    quality is unaffected): `runs.execute` stores the share in every record and the report lists runs above
    SHARED_CPU_WARN. A process of the job that ended inside the window (other than a reaped child) counts as other
    work for its last part."""

    other_cpu_frac: float | None = None

    def __enter__(self) -> HostLoad:
        self._start = _cpu_snapshot()
        return self

    def __exit__(self, *exc) -> bool:
        self.other_cpu_frac = other_cpu_share(self._start, _cpu_snapshot())
        return False


def shared_cpu(records: list[RunRecord], threshold: float = SHARED_CPU_WARN) -> list[RunRecord]:
    """The records whose run shared the host's CPUs with other work (`host_other_cpu_frac` above `threshold`)."""
    return [r for r in records if (r.environment.get("host_other_cpu_frac") or 0.0) > threshold]


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
