"""Tracked training runs through accelerate's tracker interface: each run's params, loss curve, validation loss and
final metrics in TensorBoard by default (a local folder, `outputs/<profile>/tensorboard/<study>/<run>`; `make
tensorboard` opens it), and in W&B, MLflow or trackio when a study's `trackers` param names them (none is needed to
run: `trackers: none` turns tracking off). Logging happens between steps, outside every step's timed interval.

    train(model, ..., tracking=Tracking(log_dir, "tiny-gqa-seed0", ("tensorboard",), config=run_params))
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}  # -> module


@dataclass
class Tracking:
    log_dir: Path
    run_name: str
    trackers: tuple[str, ...] = ("tensorboard",)
    config: dict[str, Any] = field(default_factory=dict)


def parse(text: str) -> tuple[str, ...]:
    """A `trackers` param ("tensorboard", "tensorboard,wandb", "none") as tracker names, each checked: known and
    installed (else one line saying which and how to get it)."""
    names = tuple(t.strip() for t in str(text).split(",") if t.strip() and t.strip() != "none")
    for t in names:
        if t not in TRACKERS:
            raise ValueError(f"unknown tracker {t!r} in trackers; choose from {', '.join(TRACKERS)} or none")
        if importlib.util.find_spec(TRACKERS[t]) is None:
            raise ValueError(f"tracker {t!r} is not installed (pip install {t}); or set trackers: tensorboard")
    return names


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """A run's params as the trackers' hyperparameters: nested mappings flattened with '/', lists and other values
    as text (TensorBoard's hparams take scalars and strings only)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flat(v, key + "/")
        elif isinstance(v, bool) or isinstance(v, (int, str)) or (isinstance(v, float) and math.isfinite(v)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def for_run(profile: str, study: str, run_name: str, P: dict[str, Any], config: dict[str, Any]) -> Tracking:
    """A study's training run, tracked under outputs/<profile>/tensorboard/<study>/<run_name> by the trackers its
    `trackers` param names (TensorBoard where the study has none)."""
    from effllm_utils import outputs_dir

    return Tracking(outputs_dir(profile) / "tensorboard" / study, run_name, parse(P.get("trackers", "tensorboard")),
                    config=config)


def start(acc, tracking: Tracking | None) -> None:
    if tracking is not None and tracking.trackers:
        acc.init_trackers(tracking.run_name, config=flat(tracking.config))


def accelerator_kwargs(tracking: Tracking | None) -> dict[str, Any]:
    """accelerate.Accelerator's arguments for these trackers (none: no tracking)."""
    if tracking is None or not tracking.trackers:
        return {}
    Path(tracking.log_dir).mkdir(parents=True, exist_ok=True)
    return {"log_with": list(tracking.trackers), "project_dir": str(tracking.log_dir)}


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The run's numeric metrics under metrics/ (None and non-numbers left out)."""
    return {f"metrics/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
