"""Stable Diffusion 3.5-style fine-tuning pieces: a flow-matching wrapper around a transformer, the pipeline loader,
prompt embeddings and latents.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

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

    from effllm_utils.models.hub import ModelUnavailable

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
