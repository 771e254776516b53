"""Each technique at its own best learning rate: a small log-spaced sweep per (scale, technique), its runs recorded,
and the technique's record made at the best point.

One learning rate for every technique confounds the technique with its step size (RSLoRA's scaling, alpha/sqrt(r),
is 2.83x LoRA's at rank 8 under the same `lr_adapter`; an architecture may simply prefer another LR). With
`lr_sweep_points: 3` (and `lr_sweep_factor: 3`), every (scale, technique) trains at lr/3, lr and 3 lr first, at the
sweep's seed (`lr_sweep_seed`, shared by every seed of a `--seeds` batch, so the sweep runs once), each a record of
its own under the scale "<scale> lr=<value>" marked `artifacts.lr_sweep_point` (tables show them; the claims check
and the figures leave them out). The technique's own record then runs at the sweep's best learning rate by the
validation metric (the sweep run itself, copied, where the seeds agree; trained anew at other seeds) and carries the
sweep (`artifacts.lr_sweep`: {lr: metric}). Resumable like any run: finished sweep points are skipped.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from effllm_utils.core import runs


def lr_grid(lr: float, points: int, factor: float) -> list[float]:
    """`points` learning rates spaced by `factor` on the log scale, centred on `lr` (3 points, factor 3: lr/3, lr,
    3 lr; an even count straddles it)."""
    if points < 1 or factor <= 1:
        raise ValueError(f"an LR sweep needs points >= 1 and factor > 1, got {points} and {factor}")
    return [lr * factor ** (i - (points - 1) / 2) for i in range(points)]


def sweep_settings(P: dict[str, Any]) -> tuple[int, float, int]:
    """(points, factor, seed) of a study's LR sweep params (none: no sweep)."""
    return P.get("lr_sweep_points", 0), P.get("lr_sweep_factor", 3.0), P.get("lr_sweep_seed", 0)


def sweep_scale(scale: str, lr: float) -> str:
    return f"{scale} lr={lr:.3g}"


def is_sweep_point(rec: runs.RunRecord) -> bool:
    return bool(rec.artifacts.get("lr_sweep_point"))


def at_best_lr(study: str, technique: str, profile: str, params: dict[str, Any], lr_key: str,
               train_at: Callable[[float], Callable[[], dict]], scale: str, metric: str, force: bool = False,
               points: int = 0, factor: float = 3.0, sweep_seed: int = 0) -> runs.RunRecord:
    """The technique's record at its best learning rate over a sweep of `points` around params[lr_key] (0 or 1: no
    sweep, one run at params[lr_key]). `train_at(lr)` gives the run function for that learning rate; `metric` is the
    quality key the sweep minimises (validation perplexity or loss)."""
    if points <= 1:
        return runs.execute(study, technique, profile, params, train_at(params[lr_key]), scale=scale, force=force)
    swept = []
    for lr in lr_grid(params[lr_key], points, factor):
        def fn(lr=lr):
            out = train_at(lr)()
            out.setdefault("artifacts", {})["lr_sweep_point"] = True
            return out
        swept.append(runs.execute(study, technique, profile, params | {lr_key: lr, "seed": sweep_seed}, fn,
                                  scale=sweep_scale(scale, lr), force=force))
    ok = [r for r in swept if r.status == "ok" and _finite(r.quality.get(metric))]
    if not ok:
        errors = "; ".join(f"lr={r.params[lr_key]:.3g}: {r.error or metric + ' not finite'}" for r in swept)
        raise RuntimeError(f"{technique}: no point of the LR sweep finished ({errors})")
    best = min(ok, key=lambda r: r.quality[metric])
    table = {f"{r.params[lr_key]:.6g}": r.quality.get(metric) for r in swept}
    chosen = best.params[lr_key]

    def fn():
        if params.get("seed", sweep_seed) == sweep_seed:  # the sweep already ran it: its measurement, copied
            out = {"metrics": dict(best.metrics), "quality": dict(best.quality), "artifacts": dict(best.artifacts)}
            out["artifacts"].pop("lr_sweep_point", None)
            out["artifacts"]["copied_from"] = best.run_id
        else:
            out = train_at(chosen)()
            out.setdefault("artifacts", {})
        out["artifacts"]["lr_sweep"] = {"metric": metric, "values": table, "best": chosen}
        return out

    return runs.execute(study, technique, profile, params | {lr_key: chosen, "lr_sweep": [points, factor]}, fn,
                        scale=scale, force=force)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
