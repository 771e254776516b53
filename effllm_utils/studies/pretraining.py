"""Architecture pretraining studies (attention, positional_encoding, moe, attention_free, depth_width): for every
scale and technique, build a model (models.techniques), pretrain it under telemetry (engine.train), store a record.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from effllm_utils import data, outputs_dir
from effllm_utils.core import progress, runs
from effllm_utils.core.runtime import resolve_device, seed_everything
from effllm_utils.engine import tracking
from effllm_utils.engine.sweep import at_best_lr, sweep_settings
from effllm_utils.measure.hardware import device_peak
from effllm_utils.models import techniques
from effllm_utils.models.techniques import build_model, check_specs

# -- data --------------------------------------------------------------------------------------------------------

def tokenizer_for(P: dict[str, Any]):
    """The embedded-corpus BPE (`tokenizer: embedded`) or a Hub tokenizer by name."""
    if P["tokenizer"] == "embedded":
        return data.tokenizer(P["vocab_size"])
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(P["tokenizer"])
    except OSError as e:
        raise data.DatasetUnavailable(f"tokenizer {P['tokenizer']!r} could not be loaded ({str(e).splitlines()[0]}); "
                                      f"it needs the Hugging Face Hub or a local copy in $HF_HOME") from None


def token_data(P: dict[str, Any], tok):
    """(train_ids, val_ids): the embedded corpus, or `train_tokens` of a Hub dataset (validation: the next 5%),
    memory-mapped from the token cache (`data_files`: a local copy of the dataset instead of the Hub)."""
    if P["dataset"] == "embedded":
        return data.token_ids("train", tok), data.token_ids("validation", tok)
    # tokenized once into a memory-mapped int32 file (data.hub_token_ids); the splits are views of it
    ids = data.hub_token_ids(P["dataset"], tok, int(P["train_tokens"] * 1.05), data_files=P.get("data_files") or None)
    cut = int(len(ids) / 1.05)
    return ids[:cut], ids[cut:]


# -- runs two studies share ----------------------------------------------------------------------------------------

def _computation(identity: dict[str, Any]) -> str:
    """A hash of everything a pretraining run's outcome depends on besides the code: the model as built, the
    training and data params, the learning rate and the seed."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _runs_of_other_studies(profile: str, study: str, force: bool) -> dict[str, runs.RunRecord]:
    """{computation: record} of the other pretraining studies' runs this one may record instead of training
    (`runs.shared_runs`): the baseline every study compares against (the default backbone: attention's gqa,
    positional_encoding's rope, moe's dense, depth_width's L4) is one run, trained once."""
    from effllm_utils.core import provenance
    from effllm_utils.studies import registry

    family = [s for s in registry.names() if s != study and registry.get(s).run == registry.get(study).run]
    return runs.shared_runs(profile, family, provenance.code_version(study), force)


# -- one study ---------------------------------------------------------------------------------------------------

def run_study(study: str, profile: str, P: dict[str, Any], force: bool = False) -> list[runs.RunRecord]:
    """Pretrain every (scale, technique) of a study and store one record each (existing ones are skipped)."""
    from effllm_utils.engine.train import TrainConfig, train

    check_specs(P)
    device = resolve_device(profile, P["device"])
    done_elsewhere = _runs_of_other_studies(profile, study, force)
    records = []
    todo = [(scale, dims, technique, spec) for scale, dims in techniques.scales(P).items()
            for technique, spec in P["techniques"].items()]
    for i, (scale, dims, technique, spec) in enumerate(todo, 1):
        progress.stage(f"{technique} at {scale}, seed {P['seed']}", i, len(todo))
        data_keys = ("vocab_size", "dataset", "tokenizer", "train_tokens")
        run_params = TrainConfig.params_of(P) | {k: P[k] for k in data_keys if k in P} | {
            "dims": dims, "spec": spec, "device": device} | (
            {"data_files": P["data_files"]} if P.get("data_files") else {})  # a local copy is other data

        identity = {"model": techniques.model_identity(dims, P["vocab_size"], spec)} | {
            k: v for k, v in run_params.items() if k != "spec"}

        def fn(lr, seed, dims=dims, spec=spec, technique=technique, scale=scale, run_params=run_params,
               identity=identity):
            computation = _computation(identity | {"lr": lr, "seed": seed})
            same = done_elsewhere.get(computation) if not P["save_checkpoints"] else None
            if same is not None:  # this very run (model, data, budget, LR, seed, code) is another study's record
                return runs.result_of(same)
            seed_everything(seed)
            tok = tokenizer_for(P)
            train_ids, val_ids = token_data(P, tok)
            model, fpt, kv = build_model(dims, len(tok), spec, P["seq_len"])
            peak, peak_source = device_peak(profile, device, P["precision"])
            ckpt = outputs_dir(profile) / "checkpoints" / study / (  # one per run: no seed or LR overwrites another
                f"{scale}-{technique}" + ("" if lr == P["lr"] else f"-lr{lr:.3g}")
                + ("" if seed == 0 else f"-seed{seed}"))
            cfg = TrainConfig.from_params(P, lr=lr, seed=seed,
                                          progress_desc=f"{study} {scale} {technique} lr={lr:.3g} seed {seed}")
            track = tracking.for_run(profile, study, f"{scale}-{technique}-seed{seed}-lr{lr:.3g}", P,
                                     run_params | {"lr": lr, "seed": seed, "technique": technique, "scale": scale})
            result = train(model.to(device), train_ids, val_ids, cfg, flops_per_token=fpt, peak_flops=peak,
                           checkpoint_dir=ckpt if P["save_checkpoints"] else None, tracking=track)
            result["metrics"]["kv_bytes_per_token"] = kv
            result["artifacts"]["peak_flops_source"] = peak_source
            result["artifacts"]["flops_per_token_source"] = (
                "analytic, baseline convention (effllm_utils.models.baselines.forward_flops_per_token)"
                if spec.get("baseline") else "analytic (effllm_utils.measure.metrics.forward_flops_per_token)")
            result["artifacts"]["model_config"] = model.config.to_dict()
            result["artifacts"]["computation"] = computation
            if spec.get("baseline") == "mamba":  # which selective scan the measured speed is of
                from effllm_utils.models.mamba_scan import scan_in_use

                result["artifacts"]["selective_scan"] = scan_in_use(device)
            return result

        records.append(at_best_lr(study, technique, profile, run_params, "lr",
                                  lambda lr, seed, fn=fn: partial(fn, lr, seed), scale, "ppl", force,
                                  *sweep_settings(P)))
    return records
