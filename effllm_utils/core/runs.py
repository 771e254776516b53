"""A run and its record: run ids, atomic writes, reading and loading records, and `execute` (one run -> one
record, skipped when an ok record of the same inputs exists, `failed` with the error otherwise).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from effllm_utils import check_profile, check_study, outputs_dir
from effllm_utils.core.provenance import HostLoad, code_version, environment
from effllm_utils.core.runtime import release_memory

SCHEMA_VERSION = 2  # 2: records carry the version of the code that measured them (code_version)
READABLE_SCHEMAS = (1, 2)  # a version-1 record has no code version: it reads as stale
STATUSES = ("ok", "failed")


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
    code_version: str = ""  # provenance.code_version(study) when it ran; part of its run id

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
        if version not in READABLE_SCHEMAS:
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
    """Deterministic id: study, technique, scale and a hash of the params and of the code that measures them
    (`provenance.code_version`): the same inputs measured by the same code -> the same id; changed measurement or
    model code -> a new id, so the run is measured again and the old record becomes stale."""
    digest = params_hash({"params": params, "code": code_version(study)})
    parts = [study, technique] + ([scale] if scale else []) + [digest]
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


def ok_record(profile: str, study: str, technique: str, params: dict[str, Any], scale: str = "") -> RunRecord | None:
    """The stored record of these inputs if it exists with status ok (what `execute` skips), else None."""
    path = record_path(profile, study, make_run_id(study, technique, params, scale))
    if not path.exists():
        return None
    rec = read_record(path)
    return rec if rec.status == "ok" else None


BATCH_STARTED_ENV = "EFFLLM_BATCH_STARTED"  # set by `reproduce` (UTC, ISO 8601) for the notebooks and jobs it runs


def made_this_batch(rec: RunRecord | None) -> bool:
    """Whether `rec` was started by the batch `reproduce` is running now (so `--force` need not redo it: a record
    that every seed of the batch shares, such as an LR sweep's point); False outside a batch."""
    since = os.environ.get(BATCH_STARTED_ENV)
    if rec is None or not since or not rec.started_at:
        return False
    try:
        return dt.datetime.fromisoformat(rec.started_at) >= dt.datetime.fromisoformat(since)
    except (ValueError, TypeError):  # a hand-set mark that does not parse or has no time zone: not this batch
        return False


def load_records(profile: str, study: str) -> list[RunRecord]:
    """The records themselves (with artifacts such as curves), sorted by run_id."""
    base = runs_dir(profile, study)
    return [read_record(p) for p in sorted(base.glob("*.json"))] if base.is_dir() else []


# -- runs shared between studies ---------------------------------------------------------------------------------

# what a study's own run adds and a record taken from another study must not carry over
_NOT_SHARED = ("lr_sweep", "lr_sweep_point", "traceback")


def shared_runs(profile: str, studies: list[str], code_version: str, force: bool = False) -> dict[str, RunRecord]:
    """{computation: record}: the ok records of `studies` made by `code_version` that trained their run themselves
    and say what they computed (`artifacts.computation`: a hash of everything the outcome depends on besides the
    code), the newest per computation; with `force`, only those made this batch. Empty under a multi-process launch
    (every rank would have to take the same decision)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return {}
    out: dict[str, RunRecord] = {}
    for study in studies:
        for r in load_records(profile, study):
            key = r.artifacts.get("computation")
            if key and r.status == "ok" and r.code_version == code_version and "same_run_as" not in r.artifacts \
                    and (not force or made_this_batch(r)) and (key not in out or r.started_at > out[key].started_at):
                out[key] = r
    return out


def result_of(donor: RunRecord) -> dict[str, Any]:
    """A run function's result that records `donor`'s run for another study: its measurements, its artifacts but
    the study's own markers, its environment (where and with what the numbers were measured, and how much other work
    shared the CPUs), and `same_run_as` / `same_run_started` naming it (`shared_copies_changed` checks them)."""
    artifacts = {k: v for k, v in donor.artifacts.items() if k not in _NOT_SHARED}
    return {"metrics": dict(donor.metrics), "quality": dict(donor.quality), "environment": dict(donor.environment),
            "artifacts": artifacts | {"same_run_as": donor.run_id, "same_run_started": donor.started_at}}


def shared_copies_changed(records: list[RunRecord]) -> list[tuple[RunRecord, str]]:
    """(record, why) for each record taken from another study's run whose run is gone, failed or was measured again
    since: its numbers no longer match the run it names."""
    out = []
    for r in records:
        donor_id = r.artifacts.get("same_run_as")
        if not donor_id:
            continue
        path = runs_dir(r.profile, donor_id.split("--")[0]) / f"{donor_id}.json"
        donor = read_record(path) if path.is_file() else None
        why = ("its run's record is gone" if donor is None else "its run failed since" if donor.status != "ok" else
               "its run was measured again" if donor.started_at != r.artifacts.get("same_run_started") else None)
        if why:
            out.append((r, why))
    return out


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
                    params=params, environment=environment(), code_version=code_version(study),
                    started_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"))
    t0, took = time.perf_counter(), None
    with HostLoad() as load:  # other work on the host during the run: its times are suspect above a share
        try:
            release_memory()  # what the previous run left is not this run's memory
            result = fn() or {}
            unknown = set(result) - {"metrics", "quality", "artifacts", "environment", "duration_s"}
            if unknown:
                raise ValueError(f"{technique}: fn returned unknown section(s) {sorted(unknown)}; "
                                 f"use 'metrics', 'quality', 'artifacts' (and 'environment', 'duration_s' for "
                                 f"measurements made before fn, runs.result_of)")
            # measurements made before fn (another run's, result_of; several records measured side by side): the
            # environment they were made in, the other work beside them, and their seconds
            if "environment" in result:
                rec.environment = dict(result["environment"])
            took = result.get("duration_s")
            rec.metrics = dict(result.get("metrics", {}))
            rec.quality = dict(result.get("quality", {}))
            rec.artifacts = dict(result.get("artifacts", {}))
        except Exception as e:  # noqa: BLE001 - a failed run is recorded and the batch goes on
            rec.status = "failed"
            rec.error = out_of_memory_message(e, study, profile) or f"{type(e).__name__}: {e}"
            rec.artifacts = {"traceback": traceback.format_exc(limit=20)}
            if verbose:
                print(f"[failed] {run_id}: {rec.error}")
    rec.duration_s = took if took is not None else time.perf_counter() - t0
    rec.environment.setdefault("host_other_cpu_frac", load.other_cpu_frac)  # a shared run keeps its own
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun / accelerate launch: the main process records
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
