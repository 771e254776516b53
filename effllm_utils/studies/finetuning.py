"""The peft study: every model x dataset x method fine-tuned under telemetry, one record each.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch

from effllm_utils import check_choices, data
from effllm_utils.core import progress, runs
from effllm_utils.core.runtime import resolve_device, seed_everything
from effllm_utils.engine import tracking
from effllm_utils.engine.adapters import METHODS, apply_method, method_lr, train_method
from effllm_utils.engine.suite import check_model_specs, load_base
from effllm_utils.engine.sweep import at_best_lr, sweep_settings

_DATASETS: dict[tuple, Any] = {}


def load_dataset(name: str, tok, P: dict[str, Any]):
    """(train, validation) in the forms train.train takes; kept in memory for the other methods of the study."""
    key = (name, tok.name_or_path, len(tok), P["seq_len"], P["hub_examples"])
    if key not in _DATASETS:
        _DATASETS.clear()  # one dataset at a time: the study loops methods inside datasets
        _DATASETS[key] = _load_dataset(name, tok, P)
    return _DATASETS[key]


def _load_dataset(name: str, tok, P: dict[str, Any]):
    if name == "milton":
        return data.token_ids("train", tok, "milton"), data.token_ids("validation", tok, "milton")
    if name == "dialogue":
        return (data.sft_examples(data.dialogue_pairs("train"), tok, P["seq_len"]),
                data.sft_examples(data.dialogue_pairs("validation"), tok, P["seq_len"]))
    ds = data.load_hub_dataset(name, limit=P["hub_examples"])
    spec = data.HUB_DATASETS[name]
    pairs = [(row[spec.prompt], "\n\n".join(str(row[k]) for k in spec.responses if row.get(k))) for row in ds]
    cut = max(1, int(len(pairs) * 0.95))
    return data.sft_examples(pairs[:cut], tok, P["seq_len"]), data.sft_examples(pairs[cut:], tok, P["seq_len"])


# -- the study ---------------------------------------------------------------------------------------------------

def weights_dtype(method: str, device: str, precision: str) -> torch.dtype:
    """The dtype the base model's weights are loaded in: bf16 on GPU for the adapter methods (their frozen base as
    the paper holds it, so AMU compares; the adapters stay fp32, peft's default), fp32 on CPU and for the methods
    that train base weights (full, freeze: fp32 master weights under bf16 autocast)."""
    bf16 = device.startswith("cuda") and precision in ("auto", "bf16")
    return torch.bfloat16 if bf16 and method not in ("full", "freeze") else torch.float32


def run_study(study: str, profile: str, P: dict[str, Any], force: bool = False) -> list[runs.RunRecord]:
    from effllm_utils.engine.train import TrainConfig

    check_choices(P["methods"], METHODS, "fine-tuning method(s)")
    check_model_specs(P["models"])
    device = resolve_device(profile, P["device"])
    records = []
    tick = progress.Stages(len(P["models"]) * len(P["datasets"]) * len(P["methods"]))
    for model_name, spec in P["models"].items():
        for dataset in P["datasets"]:
            for method in P["methods"]:
                tick(f"{method} on {model_name}, {dataset}, seed {P['seed']}")
                # the weights' dtype is part of the run's identity: an fp32 record is not one in bf16
                dtype = weights_dtype(method, device, P["precision"])
                run_params = {k: P[k] for k in P if k not in ("methods", "models", "datasets", "trackers")} | {
                    "model": spec, "dataset": dataset, "device": device,
                    "weights_dtype": str(dtype).removeprefix("torch.")}

                lr_key = "lr_adapter" if method_lr(method, "lr_full", "lr_adapter") == "lr_adapter" else "lr_full"

                def fn(lr, seed, model_name=model_name, spec=spec, dataset=dataset, method=method, lr_key=lr_key,
                       run_params=run_params, dtype=dtype):
                    Pm = P | {lr_key: lr, "seed": seed}  # this run's LR and seed (a sweep point's or the method's)
                    base, tok, base_info = load_base(profile, model_name, spec, P, device, dtype)
                    train_data, val_data = load_dataset(dataset, tok, P)
                    n_params = sum(p.numel() for p in base.parameters())
                    seed_everything(seed)  # here: load_base may have pretrained (at its own seed) just now
                    model, optimizer, info = apply_method(base, method, Pm)
                    lr_m = method_lr(method, Pm["lr_full"], Pm["lr_adapter"])
                    cfg = TrainConfig.from_params(Pm, lr=lr_m, weight_decay=0.0,
                                                  progress_desc=f"peft {model_name} {dataset} {method} lr={lr_m:.3g}")
                    track = tracking.for_run(profile, "peft", f"{model_name}-{dataset}-{method}-seed{seed}-"
                                             f"lr{lr_m:.3g}", P, run_params | {lr_key: lr_m, "seed": seed,
                                                                                "method": method})
                    result = train_method(model, method, n_params, optimizer, train_data, val_data, cfg, profile,
                                          device, P["precision"], tracking=track)
                    result["artifacts"].update(method_info=info, base=base_info, dataset=dataset, model=model_name,
                                               weights_dtype=run_params["weights_dtype"])
                    return result

                records.append(at_best_lr("peft", method, profile, run_params, lr_key,
                                          lambda lr, seed, fn=fn: partial(fn, lr, seed), model_name, "loss", force,
                                          *sweep_settings(P)))
    return records
