"""The lvm study: DiT pretraining with the attention variants and MoE (digits-FID), PEFT methods on a pretrained DiT
for a new image domain, and (gpu/paper) Stable Diffusion 3.5 fine-tuning.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

from effllm_utils import check_choices, outputs_dir
from effllm_utils.core import progress, runs
from effllm_utils.core.runtime import resolve_device, seed_everything
from effllm_utils.data.imagesets import ImageSet, study_images
from effllm_utils.engine import tracking
from effllm_utils.engine.adapters import METHODS, apply_method, method_lr, train_method
from effllm_utils.engine.train import TrainConfig, train
from effllm_utils.measure import fid, metrics
from effllm_utils.measure.fid import FeatureNetUnavailable, digits_classifier
from effllm_utils.measure.hardware import device_peak
from effllm_utils.models import techniques
from effllm_utils.models.config import EffLLMConfig
from effllm_utils.models.diffusion import CLASS_NAMES, FlowMatchingModel, latents, load, prompt_embeddings
from effllm_utils.models.dit import DiT

# -- the lvm study ------------------------------------------------------------------------------------------------

# fine-tuning tasks: a new image domain for a DiT pretrained on the digits (same ten classes)
FINETUNE_TASKS = {"mirror": lambda x: x.flip(-1),  # left-right mirrored digits
                  "negative": lambda x: -x}  # white on black instead of black on white


def _pretrain(P: dict, dims: dict, spec: dict, device: str, profile: str, scale: str, technique: str):
    """(trained DiT, train.train's result) for one (scale, technique) on the study's images."""
    import dataclasses


    seed_everything(P["seed"])
    imgs = study_images(P)
    model = _dit(P, dims, spec, imgs).to(device)
    xt, yt, xv, yv = imgs.x_train, imgs.y_train, imgs.x_val, imgs.y_val
    T = (imgs.size // P["patch"]) ** 2
    fpt = metrics.training_flops_per_token(dataclasses.replace(model.cfg.shape(), lm_head=False), T)
    peak, source = device_peak(profile, device, P["precision"])
    cfg = TrainConfig.from_params(P, seq_len=T, progress_desc=f"lvm DiT {scale} {technique}")
    track = tracking.for_run(profile, "lvm", f"{scale}-{technique}-seed{P['seed']}", P,
                             _pretrain_params(P, dims, spec, device) | {"technique": technique, "scale": scale})
    result = train(model, {"input_ids": xt, "labels": yt}, {"input_ids": xv, "labels": yv}, cfg,
                   flops_per_token=fpt, peak_flops=peak, tracking=track)
    result["artifacts"]["peak_flops_source"] = source
    return model, result


def scaled_overrides(dims: dict, spec: dict) -> dict:
    """A technique's overrides with the sizes that must follow the model's width derived from the scale where the
    spec leaves them out (values it gives stay): MLA's head dims (nope = v = the head dim, rope = half of it) and
    latent rank (2 x the head dim; 32 at tiny's width 64, 144 at DiT-XL's 1,152), and a MoE's expert width (the
    dense FFN width / experts per token, in steps of 8: the active FFN is the dense one's width)."""
    c = EffLLMConfig(**(dims | spec))
    hd = c.hidden_size // c.num_attention_heads
    out = dict(spec)
    if c.attention == "mla":
        out = {"qk_nope_head_dim": hd, "qk_rope_head_dim": hd // 2, "v_head_dim": hd, "kv_lora_rank": 2 * hd} | out
    if c.ffn == "moe":
        out = {"moe_intermediate_size": max(8, round(c.intermediate_size / c.num_experts_per_tok / 8) * 8)} | out
    return out


def _dit(P: dict, dims: dict, spec: dict, imgs: ImageSet) -> DiT:
    if imgs.size % P["patch"]:
        raise ValueError(f"patch {P['patch']} does not divide the {imgs.size}x{imgs.size} images of {imgs.name}")
    cfg = EffLLMConfig(**({"vocab_size": 1, "position": "none"} | dims | scaled_overrides(dims, spec)))
    return DiT(cfg, image_size=imgs.size, patch=P["patch"], channels=imgs.channels, n_classes=imgs.classes)


def _checkpoint(profile: str, scale: str, technique: str, run_params: dict):

    return outputs_dir(profile) / "checkpoints" / "dit" / f"{scale}-{technique}-{runs.params_hash(run_params)}"


def _save(model, path) -> None:
    from safetensors.torch import save_file


    with runs.atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))


def _score(model, P: dict, reference: torch.Tensor, device: str) -> dict:
    """FID (digits-FID on the digits, Inception FID otherwise) of `fid_samples` class-balanced samples against
    `reference`, with the real-vs-real scale; FID None with the reason where its feature network is missing."""
    imgs = study_images(P)
    model.eval()
    y = torch.arange(P["fid_samples"], device=device) % imgs.classes
    g = torch.Generator().manual_seed(P["seed"])
    bar = progress.bar(total=len(y), desc=f"FID: sampling {len(y)} images", unit="image", mininterval=1.0)
    gen = []
    for chunk in y.split(500):
        gen.append(model.sample(chunk, P["sample_steps"], P["guidance"], g))
        bar.update(len(chunk))
    bar.close()
    gen = torch.cat(gen)
    half = len(reference) // 2
    out = {"samples": gen[:20].float().cpu().tolist(), "fid_unavailable": None}
    try:
        out["fid"] = fid.image_fid(imgs, gen, reference, P["seed"], device)
        out["fid_real_vs_real"] = fid.image_fid(imgs, reference[:half], reference[half:], P["seed"], device)
    except FeatureNetUnavailable as e:
        out.update(fid=None, fid_real_vs_real=None, fid_unavailable=str(e))
    if imgs.name == "digits":
        out["classifier_acc"] = digits_classifier(P["seed"])[1]
    return out


def _pretrain_params(P: dict, dims: dict, spec: dict, device: str) -> dict:
    skip = ("techniques", "scales", "trackers") + tuple(k for k in P if k.startswith(("finetune_", "diffusers_"))
                                            or k in FINETUNE_KEYS)
    return {k: P[k] for k in P if k not in skip} | {"dims": dims, "spec": spec, "device": device}


def run_lvm(profile: str, P: dict, force: bool = False) -> list:
    """Pretrain a DiT per (scale, technique) on the study's images, sample, and record FID (digits-FID on the
    digits) with the efficiency metrics (the trained DiTs are kept under checkpoints/dit/ for the fine-tuning part)."""

    techniques.check_specs(P)  # a typo in a technique stops here, not after the first DiTs trained
    device = resolve_device(profile, P["device"])
    imgs = study_images(P)  # the dataset loads (or stops with one line) before anything trains
    records = []
    tick = progress.Stages(len(techniques.scales(P)) * len(P["techniques"]))
    for scale, dims in techniques.scales(P).items():
        for technique, spec in P["techniques"].items():
            tick(f"DiT {technique} at {scale}, seed {P['seed']}")
            run_params = _pretrain_params(P, dims, spec, device)

            def fn(dims=dims, spec=spec, technique=technique, run_params=run_params, scale=scale):
                model, result = _pretrain(P, dims, spec, device, profile, scale, technique)
                _save(model, _checkpoint(profile, scale, technique, run_params))
                q = _score(model, P, imgs.x_val, device)
                result["quality"] = {"loss": result["quality"]["loss"]} | {
                    k: q[k] for k in q if k not in ("samples", "fid_unavailable")}
                result["artifacts"].update(fid_features=imgs.fid_features, samples=q["samples"],
                                           fid_unavailable=q["fid_unavailable"], dataset=imgs.name)
                return result

            records.append(runs.execute("lvm", technique, profile, run_params, fn, scale=scale, force=force))
    return records


# -- PEFT on the DiT ----------------------------------------------------------------------------------------------

_BEFORE: dict[tuple, float] = {}  # digits-FID of a base DiT on a new domain, per process
FINETUNE_KEYS = ("rank", "alpha", "target_modules", "freeze_fraction", "loraplus_lr_ratio", "pissa_init")


def dit_base(profile: str, P: dict, scale: str, device: str) -> DiT:
    """The pretrained DiT of technique P['finetune_base'] at `scale`: the lvm pretraining run's checkpoint, trained
    (without a record) and stored when it is missing."""
    from safetensors.torch import load_file

    technique = P["finetune_base"]
    if technique not in P["techniques"]:
        raise ValueError(f"finetune_base {technique!r} is not one of the lvm techniques {list(P['techniques'])}")
    dims, spec = techniques.scales(P)[scale], P["techniques"][technique]
    path = _checkpoint(profile, scale, technique, _pretrain_params(P, dims, spec, device))
    if not (path / "model.safetensors").is_file():
        model, _ = _pretrain(P, dims, spec, device, profile, scale, technique)
        _save(model, path)
    model = _dit(P, dims, spec, study_images(P))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device)


def finetune_config(P: dict, method: str, tokens_per_image: int):
    """TrainConfig of a fine-tuning run of the lvm study (DiT or SD3): its finetune_* steps and learning rates."""

    return TrainConfig.from_params(
        P, steps=P["finetune_steps"], lr=method_lr(method, P["finetune_lr_full"], P["finetune_lr_adapter"]),
        weight_decay=0.0, seq_len=tokens_per_image, warmup_steps=min(P["warmup_steps"], P["finetune_steps"] // 5))


def run_lvm_finetune(profile: str, P: dict, force: bool = False) -> list:
    """Fine-tune the pretrained DiT on a new image domain (P['finetune_task']) with each PEFT method of the
    fine-tuning study (finetune.apply_method); record the flow loss, digits-FID against the new domain and the
    efficiency metrics. Records: study lvm, technique = the method, scale '<scale>-ft'."""

    device = resolve_device(profile, P["device"])
    imgs = study_images(P)
    check_choices(P["finetune_methods"], METHODS, "fine-tuning method(s)")
    if P["finetune_task"] not in FINETUNE_TASKS:
        raise ValueError(f"unknown finetune_task {P['finetune_task']!r}; choose one of {', '.join(FINETUNE_TASKS)}")
    shift = FINETUNE_TASKS[P["finetune_task"]]
    xt, yt, xv, yv = shift(imgs.x_train), imgs.y_train, shift(imgs.x_val), imgs.y_val
    records = []
    tick = progress.Stages(len(techniques.scales(P)) * len(P["finetune_methods"]))
    for scale, dims in techniques.scales(P).items():
        for method in P["finetune_methods"]:
            tick(f"fine-tuning {scale} DiT by {method}, seed {P['seed']}")
            run_params = _pretrain_params(P, dims, P["techniques"][P["finetune_base"]], device) | {
                k: P[k] for k in P if k.startswith("finetune_") or k in FINETUNE_KEYS}

            def fn(scale=scale, method=method, run_params=run_params):
                seed_everything(P["seed"])
                base = dit_base(profile, P, scale, device)
                n_params = sum(p.numel() for p in base.parameters())
                key = (profile, scale, runs.params_hash(run_params))
                if key not in _BEFORE:  # the pretrained DiT on the new domain: the same for every method
                    _BEFORE[key] = _score(base, P, xv, device)["fid"]
                before = _BEFORE[key]
                base.train()
                model, optimizer, info = apply_method(base, method, P | {"lr_adapter": P["finetune_lr_adapter"]},
                                                      task_type=None)
                cfg = finetune_config(P, method, (imgs.size // P["patch"]) ** 2)
                track = tracking.for_run(profile, "lvm", f"{scale}-ft-{method}-seed{P['seed']}", P,
                                         run_params | {"method": method})
                result = train_method(model, method, n_params, optimizer, {"input_ids": xt, "labels": yt},
                                      {"input_ids": xv, "labels": yv}, cfg, profile, device, P["precision"],
                                      tracking=track)
                q = _score(model, P, xv, device)
                result["quality"] = {"loss": result["quality"]["loss"], "fid_before": before} | {
                    k: q[k] for k in q if k not in ("samples", "fid_unavailable")}
                result["artifacts"].update(method_info=info, samples=q["samples"],
                                           fid_features=imgs.fid_features, task=P["finetune_task"],
                                           fid_unavailable=q["fid_unavailable"], dataset=imgs.name)
                return result

            records.append(runs.execute("lvm", method, profile, run_params, fn, scale=f"{scale}-ft", force=force))
    return records


def run_sd_finetune(profile: str, P: dict[str, Any], force: bool = False) -> list:
    """Every method of P['finetune_methods'] on every model of P['diffusers_models'] (see the module docstring)."""

    device = resolve_device(profile, P["device"])
    check_choices(P["finetune_methods"], METHODS, "fine-tuning method(s)")
    if not P["diffusers_models"]:
        return []
    imgs = study_images(P)
    names = CLASS_NAMES.get(imgs.name) or [f"class {i}" for i in range(imgs.classes)]
    prompts = [f"a photo of a {n}" if imgs.name != "digits" else f"a handwritten digit {n}" for n in names]
    records = []
    for name, spec in P["diffusers_models"].items():
        run_params = TrainConfig.params_of(P) | {k: P[k] for k in ("dataset", "data_files", "image_size", "max_images",
                                        "diffusers_resolution", "diffusers_target_modules", "finetune_steps",
                                        "finetune_lr_full", "finetune_lr_adapter", *FINETUNE_KEYS) if k in P} | {
            "model": spec, "device": device}
        pending = [m for m in P["finetune_methods"]
                   if force or runs.ok_record(profile, "lvm", m, run_params, f"{name}-ft") is None]
        base = prep = None
        if pending:  # load once per model: the transformer, the latents and the prompt embeddings
            base, vae = load(spec["source"], profile)
            embeds, pooled, how = prompt_embeddings(spec["source"], prompts, base, device)
            prep = (latents(vae, imgs.x_train, P["diffusers_resolution"], device),
                    latents(vae, imgs.x_val, P["diffusers_resolution"], device), embeds, pooled, how)
            del vae
        for i, method in enumerate(P["finetune_methods"], 1):
            progress.stage(f"fine-tuning {name} by {method}, seed {P['seed']}", i, len(P["finetune_methods"]))

            def fn(method=method):
                seed_everything(P["seed"])
                zt, zv, embeds, pooled, how = prep
                model = FlowMatchingModel(copy.deepcopy(base), embeds, pooled).train()
                n_params = sum(p.numel() for p in model.parameters())
                model, optimizer, info = apply_method(model, method, P | {
                    "lr_adapter": P["finetune_lr_adapter"], "target_modules": P["diffusers_target_modules"]},
                    task_type=None)
                patch = base.config.patch_size
                T = zt[0, 0].numel() // (patch ** 2 if isinstance(patch, int) else math.prod(patch))  # patches
                result = train_method(model, method, n_params, optimizer, {"input_ids": zt, "labels": imgs.y_train},
                                      {"input_ids": zv, "labels": imgs.y_val}, finetune_config(P, method, T), profile,
                                      device, P["precision"], tracking=tracking.for_run(
                                          profile, "lvm", f"{name}-ft-{method}-seed{P['seed']}", P,
                                          run_params | {"method": method}))
                result["quality"] = {"loss": result["quality"]["loss"], "fid": None}
                result["artifacts"].update(method_info=info, conditioning=how,
                                           task=f"{imgs.name} at {P['diffusers_resolution']}px", model=name,
                                           fid_unavailable="FID needs the full sampling pipeline; not computed")
                return result

            records.append(runs.execute("lvm", method, profile, run_params, fn, scale=f"{name}-ft", force=force))
    return records


def run_study(study: str, profile: str, P: dict[str, Any], force: bool = False) -> list:
    """The whole study: DiT pretraining per (scale, technique), then PEFT on a pretrained DiT (scale '<name>-ft'),
    then, where `diffusers_models` names checkpoints (gpu/paper), Stable Diffusion 3.5 fine-tuning."""
    return run_lvm(profile, P, force) + run_lvm_finetune(profile, P, force) + run_sd_finetune(profile, P, force)
