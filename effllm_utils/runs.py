"""Run records: one JSON file per (study, technique, scale, params), written atomically.

    rec = runs.execute(study="hardware", technique="matmul_fp32", profile="tiny", params=P, fn=measure)
    df = runs.load_runs("tiny", study="hardware")     # one row per record, metrics as columns

`fn()` returns a dict with any of `metrics` (keys from effllm_utils.metrics.METRICS, units in the key), `quality`
and `artifacts` (curves, per-sample lists). A record that exists with status "ok" is skipped (returned as loaded)
unless `force`; a failed record is retried. Before `fn` runs, the previous run's memory is released
(`telemetry.release_memory`: garbage, torch's CUDA cache, the C heap). An exception in `fn` writes a record with
status "failed" and the error (so a batch goes on); KeyboardInterrupt/SystemExit write nothing, and since every write
is a temp file + rename, an interrupted run never leaves a half-written record: the next run resumes with what is
missing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from . import check_profile, check_study, outputs_dir, repo_root, telemetry

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed")
_PACKAGES = ("torch", "transformers", "peft", "accelerate", "numpy", "papermill", "nvidia-ml-py", "gptqmodel",
             "torchao", "datasets", "tokenizers")


@dataclasses.dataclass
class RunRecord:
    run_id: str
    study: str
    technique: str
    profile: str
    scale: str = ""
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    quality: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    started_at: str = ""
    duration_s: float | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True, default=_jsonable, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "RunRecord":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not a valid run record (JSON error: {e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source}: not a valid run record (top level is {type(data).__name__}, not an object)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{source}: run record schema version {version!r}, this effllm reads "
                             f"{SCHEMA_VERSION}; re-run the study with --force to rewrite it")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown run record field(s) {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                         and f.name not in data)
        if missing:
            raise ValueError(f"{source}: run record lacks field(s) {missing}")
        return cls(**data)

    def flat(self) -> dict[str, Any]:
        """One DataFrame row: identity columns, then metrics and quality by key, params as `param.<k>`,
        environment as `env.<k>` (artifacts stay in the record: they are lists, not cells)."""
        row = {k: getattr(self, k) for k in ("run_id", "study", "technique", "scale", "profile", "status", "error",
                                             "started_at", "duration_s")}
        row.update(self.metrics)
        row.update(self.quality)
        row.update({f"param.{k}": _cell(v) for k, v in self.params.items()})
        row.update({f"env.{k}": _cell(v) for k, v in self.environment.items()})
        return row


def _cell(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def _jsonable(o: Any) -> Any:
    """JSON fallback for numpy scalars/arrays, paths and tensors found in metrics."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in a run record")


def _finite(o: Any) -> Any:
    """NaN/inf are not JSON: store them as None (a missing measurement), never as a fake number."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if hasattr(o, "item") and getattr(o, "ndim", None) == 0:  # numpy / torch scalar
        return _finite(o.item())
    return o


# -- identity and paths ------------------------------------------------------------------------------------------

def params_hash(params: dict[str, Any]) -> str:
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def make_run_id(study: str, technique: str, params: dict[str, Any], scale: str = "") -> str:
    """Deterministic id: study, technique, scale and a hash of the params (same inputs -> same id)."""
    parts = [study, technique] + ([scale] if scale else []) + [params_hash(params)]
    return "--".join(_slug(p) for p in parts)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(s))


def runs_dir(profile: str, study: str | None = None) -> Path:
    base = outputs_dir(profile) / "runs"
    return base / check_study(study) if study else base


def record_path(profile: str, study: str, run_id: str) -> Path:
    return runs_dir(profile, study) / f"{run_id}.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder, fsync, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path, replace: bool = False):
    """Build a folder (a checkpoint) under a temporary name and rename it into place only when complete:
    `with atomic_dir(ckpt) as tmp: model.save_pretrained(tmp)`. A crash leaves no half-written `path`. The
    temporary name is unique (mkdtemp), so jobs on several hosts sharing the outputs folder (reproduce --submit)
    cannot write into each other's; the first to finish is kept. `replace=True` (a report, rebuilt each time): the
    new folder replaces an existing one (moved aside, then deleted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield tmp
        if path.exists() and not replace:  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        elif path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            path.replace(old / path.name)
            tmp.replace(path)
            shutil.rmtree(old)
        else:
            tmp.replace(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_record(rec: RunRecord) -> Path:
    if rec.status not in STATUSES:
        raise ValueError(f"record status must be one of {STATUSES}, not {rec.status!r}")
    path = record_path(rec.profile, rec.study, rec.run_id)
    rec.metrics, rec.quality, rec.artifacts = _finite(rec.metrics), _finite(rec.quality), _finite(rec.artifacts)
    atomic_write_text(path, rec.to_json() + "\n")
    return path


def read_record(path: Path) -> RunRecord:
    return RunRecord.from_json(Path(path).read_text(), source=str(path))


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


# -- running ----------------------------------------------------------------------------------------------------

def execute(study: str, technique: str, profile: str, params: dict[str, Any], fn: Callable[[], dict[str, Any]],
            scale: str = "", force: bool = False, verbose: bool = True) -> RunRecord:
    """Run `fn` once for (study, technique, scale, params) and store its record; skip if an ok record exists."""
    check_study(study)
    check_profile(profile)
    run_id = make_run_id(study, technique, params, scale)
    if not force and (rec := ok_record(profile, study, technique, params, scale)) is not None:
        if verbose:
            print(f"[skip] {run_id}: record exists (force=True to re-run)")
        return rec
    rec = RunRecord(run_id=run_id, study=study, technique=technique, profile=profile, scale=scale,
                    params=params, environment=environment(),
                    started_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    t0 = time.perf_counter()
    try:
        telemetry.release_memory()  # what the previous run left is not this run's memory
        result = fn() or {}
        unknown = set(result) - {"metrics", "quality", "artifacts"}
        if unknown:
            raise ValueError(f"{technique}: fn returned unknown section(s) {sorted(unknown)}; "
                             f"use 'metrics', 'quality' and 'artifacts'")
        rec.metrics = dict(result.get("metrics", {}))
        rec.quality = dict(result.get("quality", {}))
        rec.artifacts = dict(result.get("artifacts", {}))
    except Exception as e:  # noqa: BLE001 - a failed run is recorded and the batch goes on
        rec.status = "failed"
        rec.error = out_of_memory_message(e, study, profile) or f"{type(e).__name__}: {e}"
        rec.artifacts = {"traceback": traceback.format_exc(limit=20)}
        if verbose:
            print(f"[failed] {run_id}: {rec.error}")
    rec.duration_s = time.perf_counter() - t0
    write_record(rec)
    if verbose and rec.status == "ok":
        print(f"[ok] {run_id} ({rec.duration_s:.1f} s)")
    return rec


_CPU_ALLOC = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes")


def out_of_memory_message(exc: BaseException, study: str, profile: str) -> str | None:
    """One line for a run that ran out of memory (torch's CUDA OutOfMemoryError, its CPU allocator's failure, or
    MemoryError): where, how much it asked for, and what to change; None for any other error."""
    import torch

    text = str(exc)
    m = _CPU_ALLOC.search(text) if isinstance(exc, RuntimeError) else None
    if isinstance(exc, torch.OutOfMemoryError):
        where = "the GPU"
        detail = ". ".join(text.split(". ")[:3]).split("\n")[0].rstrip(".")  # "CUDA out of memory. Tried to ..."
    elif isinstance(exc, MemoryError) or m:
        where = "the CPU"
        detail = f"tried to allocate {int(m.group(1)) / 2**30:,.2f} GiB" if m else (text or "MemoryError")
    else:
        return None
    return (f"out of memory on {where} ({detail}): lower batch_size or seq_len in params/{profile}/{study}.yaml "
            f"(or --set; grad_accum keeps the global batch), choose a smaller scale or model, or run on a device "
            f"with more memory")


def ok_record(profile: str, study: str, technique: str, params: dict[str, Any], scale: str = "") -> RunRecord | None:
    """The stored record of these inputs if it exists with status ok (what `execute` skips), else None."""
    path = record_path(profile, study, make_run_id(study, technique, params, scale))
    if not path.exists():
        return None
    rec = read_record(path)
    return rec if rec.status == "ok" else None


def load_runs(profile: str, study: str | None = None, status: str | None = None, current_only: bool = False):
    """All records of a profile (optionally one study / one status) as a pandas DataFrame, one row each;
    `current_only`: the ok records `current` keeps (what a table shows).

    Leftover temp files of interrupted writes are ignored; a record that does not parse is an error naming it."""
    import pandas as pd

    base = runs_dir(profile, study)
    paths = sorted(base.glob("*.json") if study else base.glob("*/*.json")) if base.is_dir() else []
    recs = [read_record(p) for p in paths]
    if current_only:
        recs = current([r for r in recs if r.status == "ok"])
    rows = [r.flat() for r in recs]
    cols = ["run_id", "study", "technique", "scale", "profile", "status", "error", "started_at", "duration_s"]
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=cols)
    if status is not None:
        df = df[df["status"] == status].reset_index(drop=True)
    return df


def _newest(records: list[RunRecord]) -> dict[tuple, RunRecord]:
    """{experiment: its newest record}."""
    newest: dict[tuple, RunRecord] = {}
    for r in records:
        k = experiment(r)
        if k not in newest or (r.started_at or "") > (newest[k].started_at or ""):
            newest[k] = r
    return newest


def settings(r: RunRecord) -> str:
    """A hash of a record's params with the seed left out: records with equal settings are repeats of one experiment."""
    return params_hash({k: v for k, v in r.params.items() if k != "seed"})


def experiment(r: RunRecord) -> tuple:
    """What a table row stands for: (technique, scale), and the dataset where a study varies it per run (peft)."""
    return (r.technique, r.scale) + ((r.params.get("dataset"),) if r.study == "peft" else ())


def current(records: list[RunRecord]) -> list[RunRecord]:
    """The records tables and figures show, in the order given: for each `experiment`, those with the settings of its
    newest record — that record and its repeats (other seeds). Records of a re-run with other params supersede the
    older ones, which stay on disk but would otherwise appear as duplicate rows."""
    keep = {k: settings(r) for k, r in _newest(records).items()}
    return [r for r in records if settings(r) == keep[experiment(r)]]


def load_current(profile: str, study: str) -> list[RunRecord]:
    """The ok records of a study that `current` keeps."""
    return current([r for r in load_records(profile, study) if r.status == "ok"])


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


def mean_repeats(records: list[RunRecord]) -> list[RunRecord]:
    """One record per `experiment` of `current(records)`, in the order first seen: a single run as it is; repeats
    (the same settings, other seeds) as a copy of the newest whose numeric metrics and quality are the means over
    the runs that measured them, whose loss curve is the mean of equal-length curves, and whose
    `artifacts["repeats"]` holds {n, seeds, run_ids, se: {key: standard error of the mean}}. Tables and figures
    draw from these, so a repeated experiment is one row (and one radar trace), not one per seed. The copies are
    for display: they are never written."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in current(records):
        groups.setdefault(experiment(r), []).append(r)
    return [rs[0] if len(rs) == 1 else _mean_record(rs) for rs in groups.values()]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mean_record(rs: list[RunRecord]) -> RunRecord:
    import statistics

    newest = max(rs, key=lambda r: r.started_at or "")
    out = dataclasses.replace(newest, metrics=dict(newest.metrics), quality=dict(newest.quality),
                              artifacts=dict(newest.artifacts))
    se: dict[str, float] = {}
    for section in ("metrics", "quality"):
        merged = getattr(out, section)
        for k in dict.fromkeys(k for r in rs for k in getattr(r, section)):
            given = [getattr(r, section)[k] for r in rs if getattr(r, section).get(k) is not None]
            if not given or not all(_number(v) for v in given):
                continue  # text, lists or not measured: the newest run's value
            if len(set(given)) > 1:  # the same in every run (a size, a deterministic PPL) stays as it is
                merged[k] = statistics.fmean(given)
            if len(given) > 1:
                se[k] = statistics.stdev(given) / math.sqrt(len(given))
    curves = [r.artifacts.get("loss_curve") for r in rs]
    if all(isinstance(c, list) and c and len(c) == len(curves[0]) for c in curves):
        out.artifacts["loss_curve"] = [statistics.fmean(step) for step in zip(*curves)]
    out.artifacts["repeats"] = {"n": len(rs), "seeds": [r.params.get("seed") for r in rs],
                                "run_ids": [r.run_id for r in rs], "se": se}
    return out


def load_summary(profile: str, study: str) -> list[RunRecord]:
    """What a study's tables and figures show: its current ok records with repeats averaged (`mean_repeats`)."""
    return mean_repeats(load_current(profile, study))


def n_runs(r: RunRecord) -> int:
    """How many runs a (`mean_repeats`) record stands for: 1 for a single run."""
    return r.artifacts.get("repeats", {}).get("n", 1)


def standard_error(r: RunRecord, key: str) -> float | None:
    """The standard error over the repeats of a (`mean_repeats`) record's metric or quality `key`; None for one run
    or a key not measured."""
    return r.artifacts.get("repeats", {}).get("se", {}).get(key)


def table_rows(records: list[RunRecord], se_keys: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """`flat()` rows of (`mean_repeats`) records; where any row is a mean over repeats, every row also gets `runs`
    (1 for a single run) and `<key>_se` for each of `se_keys` (the standard error over the repeats; None for one
    run). Without repeats the rows are plain `flat()` rows, so a table gains these columns only when it has them."""
    repeated = any(n_runs(r) > 1 for r in records)
    rows = []
    for r in records:
        row = r.flat()
        if repeated:
            row["runs"] = n_runs(r)
            row.update({f"{k}_se": standard_error(r, k) for k in se_keys})
        rows.append(row)
    return rows


def select_columns(df, columns: dict[str, str]):
    """`df`'s columns in the order of `columns` ({row key: table header}), renamed: one that no record holds stays,
    empty (a metric not measured here), except `runs` and `*_se`, which a table without repeats leaves out."""
    keep = [c for c in columns if c in df or not (c == "runs" or c.endswith("_se"))]
    return df.reindex(columns=keep).rename(columns=columns).reset_index(drop=True)


def load_records(profile: str, study: str) -> list[RunRecord]:
    """The records themselves (with artifacts such as curves), sorted by run_id."""
    base = runs_dir(profile, study)
    return [read_record(p) for p in sorted(base.glob("*.json"))] if base.is_dir() else []
