"""The one aggregation path: records -> the rows tables, plots and claims show. `current` keeps each experiment's
newest settings; `mean_repeats` turns repeats (other seeds) into one display record with its mean, standard error,
n and seeds. Every function that groups records takes the study's `group_by` (the record params that make separate
experiments beside technique and scale, declared in the study registry: peft's `dataset`); callers above this layer
pass `registry.get(study).group_by`, or use `registry.summary` / `registry.current`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from effllm_utils.core.runs import RunRecord, load_records, params_hash, read_record, runs_dir

GroupBy = tuple  # record params that split an experiment, e.g. ("dataset",)


def _newest(records: list[RunRecord], group_by: GroupBy) -> dict[tuple, RunRecord]:
    """{experiment: its newest record} (started_at to the microsecond: a re-run in the same second is newer)."""
    newest: dict[tuple, RunRecord] = {}
    for r in records:
        k = experiment(r, group_by)
        if k not in newest or (r.started_at or "") > (newest[k].started_at or ""):
            newest[k] = r
    return newest


def settings(r: RunRecord) -> str:
    """A hash of a record's params with the seed left out, and of its code version: records with equal settings are
    repeats of one experiment; records of other code never are (stale ones are superseded, not averaged)."""
    return params_hash({"params": {k: v for k, v in r.params.items() if k != "seed"}, "code": r.code_version})


def group(r: RunRecord, group_by: GroupBy) -> tuple:
    """The records compared together (one table panel, one claims row): (scale, the study's `group_by` values)."""
    return (r.scale,) + tuple(r.params.get(k) for k in group_by)


def experiment(r: RunRecord, group_by: GroupBy) -> tuple:
    """What a table row stands for: the technique within its `group`."""
    return (r.technique,) + group(r, group_by)


def current(records: list[RunRecord], group_by: GroupBy) -> list[RunRecord]:
    """The records tables and figures show, in the order given: for each `experiment`, those with the settings of its
    newest record — that record and its repeats (other seeds). Records of a re-run with other params supersede the
    older ones, which stay on disk but would otherwise appear as duplicate rows."""
    keep = {k: settings(r) for k, r in _newest(records, group_by).items()}
    return [r for r in records if settings(r) == keep[experiment(r, group_by)]]


def load_current(profile: str, study: str, group_by: GroupBy) -> list[RunRecord]:
    """The ok records of a study that `current` keeps."""
    return current([r for r in load_records(profile, study) if r.status == "ok"], group_by)


def repeats(records: list[RunRecord], group_by: GroupBy) -> dict[tuple, list[RunRecord]]:
    """{experiment: its runs} over `current(records)`, in the order first seen: the raw repeats (one per seed) that
    means, standard errors and statistical tests are computed from."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in current(records, group_by):
        groups.setdefault(experiment(r, group_by), []).append(r)
    return groups


def mean_repeats(records: list[RunRecord], group_by: GroupBy) -> list[RunRecord]:
    """One record per `experiment` of `current(records)`, in the order first seen: a single run as it is; repeats
    (the same settings, other seeds) as a copy of the newest whose numeric metrics and quality are the means over
    the runs that measured them, whose loss curve is the mean of equal-length curves, and whose
    `artifacts["repeats"]` holds {n, seeds, run_ids, se: {key: standard error of the mean}}. Tables and figures
    draw from these, so a repeated experiment is one row (and one radar trace), not one per seed. The copies are
    for display: they are never written."""
    return [rs[0] if len(rs) == 1 else _mean_record(rs) for rs in repeats(records, group_by).values()]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_se(values: list[float]) -> tuple[float, float | None, int]:
    """(mean, standard error of the mean or None for one value, n): how repeats are summarised everywhere (tables,
    plots' error bars and the claims check's displayed values)."""
    import statistics

    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(n) if n > 1 else None), n


def _mean_record(rs: list[RunRecord]) -> RunRecord:
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
            mean, err, _ = mean_se(given)
            if len(set(given)) > 1:  # the same in every run (a size, a deterministic PPL) stays as it is
                merged[k] = mean
            if err is not None:
                se[k] = err
    curves = [r.artifacts.get("loss_curve") for r in rs]
    if all(isinstance(c, list) and c and len(c) == len(curves[0]) for c in curves):
        out.artifacts["loss_curve"] = [mean_se(list(step))[0] for step in zip(*curves)]
    out.artifacts["repeats"] = {"n": len(rs), "seeds": [r.params.get("seed") for r in rs],
                                "run_ids": [r.run_id for r in rs], "se": se}
    return out


def load_summary(profile: str, study: str, group_by: GroupBy) -> list[RunRecord]:
    """What a study's tables and figures show: its current ok records with repeats averaged (`mean_repeats`)."""
    return mean_repeats(load_current(profile, study, group_by), group_by)


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


def load_runs(profile: str, study: str | None = None, status: str | None = None):
    """All records of a profile (optionally one study / one status) as a pandas DataFrame, one row each.

    Leftover temp files of interrupted writes are ignored; a record that does not parse is an error naming it."""
    import pandas as pd

    base = runs_dir(profile, study)
    paths = sorted(base.glob("*.json") if study else base.glob("*/*.json")) if base.is_dir() else []
    recs = [read_record(p) for p in paths]
    rows = [r.flat() for r in recs]
    cols = ["run_id", "study", "technique", "scale", "profile", "status", "error", "started_at", "duration_s"]
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=cols)
    if status is not None:
        df = df[df["status"] == status].reset_index(drop=True)
    return df
