"""DiT (Peebles & Xie): patchified images through adaLN-Zero blocks whose attention and feed-forward are the backbone's
own modules (MHA/GQA/MQA/MLA/NSA, dense or MoE), so the lvm study varies one component as the language studies do.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from effllm_utils.models.config import EffLLMConfig
from effllm_utils.models.modeling import ATTENTION_CLASSES, MLP, MoE


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (half the channels per axis)."""
    def one(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float32) / (d // 2))
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    return torch.cat([one(ys.reshape(-1), dim // 2), one(xs.reshape(-1), dim // 2)], 1)


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000 * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, cfg: EffLLMConfig, i: int):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = ATTENTION_CLASSES[cfg.attention](cfg, i)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MoE(cfg) if cfg.ffn == "moe" else MLP(d, cfg.intermediate_size)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c, positions, allowed):
        s1, g1, b1, s2, g2, b2 = self.ada(c).chunk(6, dim=-1)
        x = x + b1[:, None] * self.attn(_modulate(self.norm1(x), s1, g1), positions, None, allowed, None, None)
        h = self.mlp(_modulate(self.norm2(x), s2, g2))
        h, aux = h if isinstance(h, tuple) else (h, None)
        return x + b2[:, None] * h, aux


class DiT(nn.Module):
    """Class-conditional DiT on [B, C, H, W] images; `forward(input_ids=images, labels=classes)` returns the flow
    loss (so `train.train` trains it unchanged)."""

    def __init__(self, cfg: EffLLMConfig, image_size: int = 8, patch: int = 2, channels: int = 1, n_classes: int = 10,
                 label_dropout: float = 0.1):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        d, self.cfg, self.p, self.C, self.n_classes = cfg.hidden_size, cfg, patch, channels, n_classes
        self.grid, self.label_dropout = image_size // patch, label_dropout
        self.config = SimpleNamespace(vocab_size=n_classes, use_cache=False, to_dict=lambda: {
            "dit": True, "image_size": image_size, "patch": patch, **cfg.to_dict()})
        self.patch_embed = nn.Conv2d(channels, d, patch, patch)
        self.register_buffer("pos", sincos_2d(self.grid, d), persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embed = nn.Embedding(n_classes + 1, d)  # the last row is the null class (classifier-free guidance)
        self.blocks = nn.ModuleList(DiTBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, patch * patch * channels)
        for lin in (self.final_ada[1], self.out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for block in self.blocks:  # the backbone's initialisation for the shared modules
            for m in block.modules():
                if isinstance(m, nn.Linear) and m is not block.ada[1]:
                    nn.init.normal_(m.weight, std=cfg.initializer_range)
            if isinstance(block.mlp, MoE):
                nn.init.normal_(block.mlp.gate.weight, std=cfg.initializer_range)
                nn.init.normal_(block.mlp.experts.gate_up_proj, std=cfg.initializer_range)
                nn.init.normal_(block.mlp.experts.down_proj, std=cfg.initializer_range)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        c = self.t_embed(timestep_embedding(t).to(x.dtype)) + self.y_embed(y)
        T = h.shape[1]
        positions = torch.full((B, T), T - 1, device=x.device)  # bidirectional: every patch "sees" the whole image
        allowed = torch.ones(1, 1, T, T, dtype=torch.bool, device=x.device)
        aux = h.new_zeros(())
        for block in self.blocks:
            h, a = block(h, c, positions, allowed)
            aux = aux + (a if a is not None else 0)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = self.out(_modulate(self.final_norm(h), shift, scale))  # [B, T, p*p*C]
        g, p = self.grid, self.p
        v = h.view(B, g, g, p, p, self.C).permute(0, 5, 1, 3, 2, 4).reshape(B, self.C, g * p, g * p)
        self._aux = aux
        return v

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, use_cache: bool = False, **kwargs):
        x0, y = input_ids, labels
        if self.training and self.label_dropout:
            y = torch.where(torch.rand(y.shape, device=y.device) < self.label_dropout, self.n_classes, y)
        t = torch.rand(x0.shape[0], device=x0.device)
        e = torch.randn_like(x0)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * e
        loss = F.mse_loss(self.velocity(xt, t, y).float(), (e - x0).float())
        if self.cfg.ffn == "moe":
            loss = loss + self.cfg.router_aux_loss_coef * self._aux / self.cfg.num_hidden_layers
        return SimpleNamespace(loss=loss)

    @torch.no_grad()
    def sample(self, y: torch.Tensor, steps: int = 20, guidance: float = 1.5, generator=None) -> torch.Tensor:
        """Euler integration of the flow from noise (t=1) to images (t=0), classifier-free guided; in [-1, 1]."""
        g = self.grid * self.p
        x = torch.randn(len(y), self.C, g, g, generator=generator).to(y.device)
        null = torch.full_like(y, self.n_classes)
        for i in range(steps, 0, -1):
            t = torch.full((len(y),), i / steps, device=y.device)
            v_c, v_u = self.velocity(x, t, y), self.velocity(x, t, null)
            x = x - (v_u + guidance * (v_c - v_u)) / steps
        return x.clamp(-1, 1)
