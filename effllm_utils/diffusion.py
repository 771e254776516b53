"""PEFT on a pretrained diffusers transformer — the lvm study's Stable Diffusion 3.5 / Wan 2.1 part (paper Table 13,
`paper` profile).

The checkpoint is a diffusers folder or Hub id with `transformer/` — an `SD3Transformer2DModel` (Stable Diffusion
3.5) or a `WanTransformer3DModel` (Wan 2.1, text-to-video; trained here on single-frame clips) — its VAE (`vae/`:
`AutoencoderKL` / `AutoencoderKLWan`) and, normally, its text encoders. The study's images (the same
`vision.image_set` as the DiT, resized to `diffusers_resolution`, grey repeated to RGB) are encoded once by the VAE
into latents normalised as each model trains (SD3: (z - shift) x scaling; Wan: per-channel (z - mean) / std), and the
class prompts ("a photo of a {class}") once by the pipeline's `encode_prompt`; a checkpoint without text encoders
trains unconditionally on zero prompt embeddings, and the record says so. Each fine-tuning method of the peft study
(`finetune.apply_method`) then trains the transformer with the rectified-flow objective both models use:
x_s = (1 - s) x0 + s e with s drawn logit-normal (Esser et al. 2024), target e - x0, timestep 1000 s. Records: study
`lvm`, technique = the method, scale `<model>-ft`; quality = held-out flow loss (FID needs the full sampling pipeline
and is not computed here: `fid` is None with that reason).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CLASS_NAMES = {"digits": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
               "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}


class FlowMatchingModel(nn.Module):
    """A diffusers SD3 or Wan transformer as `train.train` drives models: input_ids = latents ([B, C, h, w] or
    [B, C, frames, h, w]), labels = class ids selecting precomputed prompt embeddings (and SD3's pooled ones; None
    for Wan); forward returns the rectified-flow loss."""

    def __init__(self, transformer, prompt_embeds: torch.Tensor, pooled: torch.Tensor | None):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)
        self.config = SimpleNamespace(vocab_size=len(prompt_embeds), use_cache=False,
                                      to_dict=lambda: {"diffusers": type(transformer).__name__})

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, use_cache: bool = False, **kwargs):
        x0 = input_ids
        s = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device))  # logit-normal(0, 1), SD3's default
        e = torch.randn_like(x0)
        sb = s.view(-1, *[1] * (x0.ndim - 1))
        xs = (1 - sb) * x0 + sb * e
        extra = {} if self.pooled is None else {"pooled_projections": self.pooled[labels]}
        v = self.transformer(hidden_states=xs.to(self.prompt_embeds.dtype),
                             encoder_hidden_states=self.prompt_embeds[labels], timestep=s * 1000, **extra).sample
        return SimpleNamespace(loss=F.mse_loss(v.float(), (e - x0).float()))


# transformer class -> (VAE class, pipeline class) of the supported families
FAMILIES = {"SD3Transformer2DModel": ("AutoencoderKL", "StableDiffusion3Pipeline"),
            "WanTransformer3DModel": ("AutoencoderKLWan", "WanPipeline")}


def load(source: str, profile: str):
    """(transformer, vae) of a diffusers SD3 or Wan checkpoint (Hub id or folder); missing: ModelUnavailable."""
    import diffusers
    from huggingface_hub import hf_hub_download

    from .finetune import ModelUnavailable

    def unavailable(e: Exception) -> ModelUnavailable:
        return ModelUnavailable(f"diffusers model {source!r} could not be loaded ({str(e).splitlines()[0][:160]}); "
                                f"the {profile} profile needs the Hugging Face Hub (Stable Diffusion 3.5 is gated: "
                                f"accept its licence and log in) or a copy in $HF_HOME")

    try:
        cfg = Path(source) / "transformer" / "config.json" if Path(source).is_dir() else \
            Path(hf_hub_download(source, "transformer/config.json"))
        name = json.loads(cfg.read_text())["_class_name"]
    except (OSError, ValueError) as e:
        raise unavailable(e) from None
    if name not in FAMILIES:
        raise ValueError(f"diffusers model {source!r}: transformer {name} is not supported; supported: "
                         f"{', '.join(FAMILIES)}")
    try:
        transformer = getattr(diffusers, name).from_pretrained(source, subfolder="transformer",
                                                               torch_dtype=torch.float32)
        vae = getattr(diffusers, FAMILIES[name][0]).from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise unavailable(e) from None
    return transformer, vae


@torch.no_grad()
def prompt_embeddings(source: str, prompts: list[str], transformer, device: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          str]:
    """(prompt_embeds [K, L, D], pooled [K, P] or None (Wan), how): the pipeline's text encoders on the class
    prompts, or zeros (unconditional) for a checkpoint that has none."""
    import diffusers

    c = transformer.config
    sd3 = type(transformer).__name__ == "SD3Transformer2DModel"
    if Path(source).is_dir() and not (Path(source) / "text_encoder").is_dir():
        dim = c.joint_attention_dim if sd3 else c.text_dim
        return (torch.zeros(len(prompts), 1, dim), torch.zeros(len(prompts), c.pooled_projection_dim) if sd3 else None,
                "unconditional: the checkpoint has no text encoders (zero prompt embeddings)")
    pipe = getattr(diffusers, FAMILIES[type(transformer).__name__][1]).from_pretrained(
        source, transformer=None, vae=None, torch_dtype=torch.float32)
    pipe.to(device)
    if sd3:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False)
    else:
        (embeds, _), pooled = pipe.encode_prompt(prompt=prompts, device=device, do_classifier_free_guidance=False), None
    del pipe
    how = "class prompts through the checkpoint's text encoders"
    return embeds.cpu(), None if pooled is None else pooled.cpu(), how


@torch.no_grad()
def latents(vae, images: torch.Tensor, resolution: int, device: str, batch: int = 16) -> torch.Tensor:
    """VAE latents of images [N, C, H, W] in [-1, 1] (grey repeated to RGB, resized), normalised as the model
    trains: SD3's (z - shift) x scaling [N, c, h, w], or Wan's per-channel (z - mean) / std of one-frame clips
    [N, c, 1, h, w]."""
    vae = vae.to(device).eval()
    wan = type(vae).__name__ == "AutoencoderKLWan"
    out = []
    for chunk in images.split(batch):
        x = chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk
        x = F.interpolate(x.float(), size=(resolution, resolution), mode="bilinear", align_corners=False)
        if wan:
            z = vae.encode(x[:, :, None].to(device)).latent_dist.sample()
            shape = (1, -1, 1, 1, 1)
            mean = torch.tensor(vae.config.latents_mean[: z.shape[1]], device=z.device).view(shape)
            std = torch.tensor(vae.config.latents_std[: z.shape[1]], device=z.device).view(shape)
            out.append(((z - mean) / std).cpu())
        else:
            z = vae.encode(x.to(device)).latent_dist.sample()
            out.append(((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).cpu())
    return torch.cat(out)


def run_finetune(profile: str, P: dict[str, Any], force: bool = False) -> list:
    """Every method of P['finetune_methods'] on every model of P['diffusers_models'] (see the module docstring)."""
    from . import check_choices, runs
    from .finetune import METHODS, apply_method, train_method
    from .runtime import resolve_device, seed_everything
    from .vision import FINETUNE_KEYS, TRAIN_KEYS, finetune_config, study_images

    device = resolve_device(profile, P["device"])
    check_choices(P["finetune_methods"], METHODS, "fine-tuning method(s)")
    if not P["diffusers_models"]:
        return []
    imgs = study_images(P)
    names = CLASS_NAMES.get(imgs.name) or [f"class {i}" for i in range(imgs.classes)]
    prompts = [f"a photo of a {n}" if imgs.name != "digits" else f"a handwritten digit {n}" for n in names]
    records = []
    for name, spec in P["diffusers_models"].items():
        run_params = {k: P[k] for k in (*TRAIN_KEYS, "dataset", "data_files", "image_size", "max_images",
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
        for method in P["finetune_methods"]:
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
                                      device, P["precision"])
                result["quality"] = {"loss": result["quality"]["loss"], "fid": None}
                result["artifacts"].update(method_info=info, conditioning=how,
                                           task=f"{imgs.name} at {P['diffusers_resolution']}px", model=name,
                                           fid_unavailable="FID needs the full sampling pipeline; not computed")
                return result

            records.append(runs.execute("lvm", method, profile, run_params, fn, scale=f"{name}-ft", force=force))
    return records
