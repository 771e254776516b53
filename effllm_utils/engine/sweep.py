"""Each technique at its own best learning rate: a small log-spaced sweep per (scale, technique), its runs recorded,
and the technique's records made at the best point.

One learning rate for every technique confounds the technique with its step size (RSLoRA's scaling, alpha/sqrt(r),
is 2.83x LoRA's at rank 8 under the same `lr_adapter`; an architecture may simply prefer another LR). With
`lr_sweep_points: 3` (and `lr_sweep_factor: 3`), every (scale, technique) first trains at lr/3, lr and 3 lr at the
sweep's own seed (`lr_sweep_seed`, default SWEEP_SEED = 1000: outside the reported seeds, and shared by every seed of
a `--seeds` batch, so the sweep runs once: `reproduce --submit` starts a sweeping study's other seeds after its first,
and `--force` retrains a sweep point only if this batch has not already), each a record of its own under the scale
"<scale> lr=<value>" marked `artifacts.lr_sweep_point` (tables show them; the claims check and the figures leave them
out). A point whose loss diverged is a measurement of that LR (an ok record without the metric,
`artifacts.diverged` saying why), not a failure to retry. The technique's record at each reported seed is then
trained anew at the sweep's best learning rate by the validation metric and carries the sweep (`artifacts.lr_sweep`:
{lr: metric}).

Why the sweep has a seed of its own: the best sweep point is the minimum over the grid, an optimistic draw. Reported as
one of the repeats, it would pull the seed mean down and shrink its interval; selected at one seed and measured at
others, the LR choice and the measurement have independent training noise (they share the validation split, which
the methodology states). A technique whose every sweep point fails gets a failed record (the study goes on).
Resumable like any run: finished sweep points are skipped.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from effllm_utils.core import runs

SWEEP_SEED = 1000  # the sweep's seed by default: none of a profile's reported seeds (0, 1, 2)


def lr_grid(lr: float, points: int, factor: float) -> list[float]:
    """`points` learning rates spaced by `factor` on the log scale, centred on `lr` (3 points, factor 3: lr/3, lr,
    3 lr; an even count straddles it)."""
    if points < 1 or factor <= 1:
        raise ValueError(f"an LR sweep needs points >= 1 and factor > 1, got {points} and {factor}")
    return [lr * factor ** (i - (points - 1) / 2) for i in range(points)]


def sweep_settings(P: dict[str, Any]) -> tuple[int, float, int]:
    """(points, factor, seed) of a study's LR sweep params (none: no sweep)."""
    return P.get("lr_sweep_points", 0), P.get("lr_sweep_factor", 3.0), P.get("lr_sweep_seed", SWEEP_SEED)


def check_sweep_seed(P: dict[str, Any], where: str = "params") -> None:
    """A sweeping study's seed must not be its sweep's: the sweep's best point would be reported as a repeat."""
    points, _, sweep_seed = sweep_settings(P)
    if points > 1 and P.get("seed") == sweep_seed:
        raise ValueError(f"{where}: lr_sweep_seed {sweep_seed} is also a reported seed: the sweep's best point would "
                         f"be reported as a repeat (an optimistic pick); set lr_sweep_seed to a seed outside --seeds")


def sweep_scale(scale: str, lr: float) -> str:
    return f"{scale} lr={lr:.3g}"


def is_sweep_point(rec: runs.RunRecord) -> bool:
    return bool(rec.artifacts.get("lr_sweep_point"))


def at_best_lr(study: str, technique: str, profile: str, params: dict[str, Any], lr_key: str,
               train_at: Callable[[float, int], Callable[[], dict]], scale: str, metric: str, force: bool = False,
               points: int = 0, factor: float = 3.0, sweep_seed: int = SWEEP_SEED) -> runs.RunRecord:
    """The technique's record at params["seed"] and its best learning rate over a sweep of `points` around
    params[lr_key] at `sweep_seed` (0 or 1 points: no sweep, one run at params[lr_key]). `train_at(lr, seed)` gives
    the run function for that learning rate and seed; `metric` is the quality key the sweep minimises (validation
    perplexity or loss)."""
    seed = params["seed"]
    if points <= 1:
        return runs.execute(study, technique, profile, params, train_at(params[lr_key], seed), scale=scale,
                            force=force)
    check_sweep_seed({"seed": seed, "lr_sweep_points": points, "lr_sweep_seed": sweep_seed}, study)
    from effllm_utils.engine.train import TrainingDiverged

    swept = []
    for lr in lr_grid(params[lr_key], points, factor):
        def fn(lr=lr):
            try:
                out = train_at(lr, sweep_seed)()
            except TrainingDiverged as e:  # a measurement of this LR (too large), not a failure to retry
                out = {"artifacts": {"diverged": str(e)}}  # no metric: never the best
            out.setdefault("artifacts", {})["lr_sweep_point"] = True
            return out
        point = params | {lr_key: lr, "seed": sweep_seed}
        redo = force and not runs.made_this_batch(runs.ok_record(profile, study, technique, point,
                                                                 sweep_scale(scale, lr)))
        swept.append(runs.execute(study, technique, profile, point, fn, scale=sweep_scale(scale, lr), force=redo))
    table = {f"{r.params[lr_key]:.6g}": r.quality.get(metric) for r in swept}
    ok = [r for r in swept if r.status == "ok" and _finite(r.quality.get(metric))]
    if not ok:  # the technique's record says so (the study goes on with the others)
        errors = "; ".join(f"lr={r.params[lr_key]:.3g}: {r.error or metric + ' not finite'}" for r in swept)

        def failed():
            raise RuntimeError(f"{technique}: no point of the LR sweep finished ({errors})")
        return runs.execute(study, technique, profile, params | {"lr_sweep": [points, factor, sweep_seed]}, failed,
                            scale=scale, force=force)
    chosen = min(ok, key=lambda r: r.quality[metric]).params[lr_key]

    def fn():
        out = train_at(chosen, seed)()
        out.setdefault("artifacts", {})["lr_sweep"] = {"metric": metric, "values": table, "best": chosen,
                                                       "seed": sweep_seed}
        return out

    return runs.execute(study, technique, profile, params | {lr_key: chosen, "lr_sweep": [points, factor, sweep_seed]},
                        fn, scale=scale, force=force)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
