"""The effllm backbone: a Qwen2.5-style decoder whose attention, position encoding and feed-forward are config values.

Module names follow `transformers`' Qwen2 (attention, MLP, norms), DeepSeek-V3 (MLA projections) and Mixtral (MoE
router and 3-D expert tensors), so their checkpoints load into this model with `load_state_dict` and the parity
tests compare logits directly.

Attention variants (config.attention)
  mha / gqa / mqa  one implementation, different numbers of KV heads; SDPA with native GQA.
  mla              DeepSeek-V2/V3 multi-head latent attention: low-rank Q (optional) and KV, decoupled RoPE; the KV
                   cache holds the normalised latent (kv_lora_rank) and the shared RoPE key, not per-head K/V.
  nsa              Native Sparse Attention (Yuan et al. 2025): a compressed branch (a learned linear map of each
                   block of `nsa_block_size` keys/values), a selected branch (the top `nsa_num_selected` blocks by
                   the compressed attention scores, shared across the heads of a KV group, plus the first and the
                   current block), and a sliding window of `nsa_window` tokens, mixed by learned sigmoid gates. The
                   reference formulation uses dense masks (O(T^2) memory): clear and testable, not fast. On CUDA
                   (`nsa_kernel` auto, or flex anywhere) the selected and window branches run as FlexAttention
                   block-sparse kernels instead (torch.compile'd; blocks no query selects are skipped, no T x T mask
                   is built), whenever the attention is plain causal (no padding, no cache offset); tested equal to
                   the reference.

Position encodings (config.position)
  rope        rotary embedding on q/k (Su et al.), theta = rope_theta.
  sinusoidal  fixed sin/cos absolute embedding added to the token embedding (Vaswani et al. 2017), times
              initializer_range. Vaswani et al. add the [-1, 1] table to token embeddings of std 1 (initialised at
              d_model^-0.5, multiplied by sqrt(d_model)); here token embeddings start at std initializer_range (0.02),
              so the bare table would outweigh them ~35 to 1 in the residual stream. Scaling the table keeps
              Vaswani's ratio of position to content and the other variants' input scale (the learned table starts
              at that std too). The tiny study is sensitive to this scale (README, positional encodings).
  learned     a trained absolute position embedding (GPT-2 style), max_position_embeddings rows.
  relative    T5's bucketed relative position bias (Raffel et al. 2020): a learned scalar per (head, bucket) added
              to the attention logits, computed once and shared by all layers. We use T5's scheme because it is the
              classic learned relative encoding, works with any attention kernel that takes an additive mask, and
              needs no change to q/k (unlike Shaw et al.'s per-layer key embeddings).
  none        no position information (NoPE): causal masking alone.

Feed-forward (config.ffn)
  dense  SwiGLU.
  moe    top-k softmax router (renormalised over the chosen k, as Mixtral) with the Switch load-balancing loss;
         experts run as one padded batched matmul over all experts (dropless, no Python loop over experts).

Long by design: the whole backbone (every attention, position and feed-forward variant) in one file read top to
bottom, litgpt-style.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from effllm_utils.models.config import EffLLMConfig
from effllm_utils.models.loss import linear_cross_entropy

# transformers 5.25 renamed the KV cache from `past_key_values` to `cache`, both as the forward keyword that `generate`
# passes and as the field of model outputs (5.0-5.24 use the old name). A model that only knows one name silently
# decodes without its cache on the other versions (the prompt is forgotten after the first step), so the backbone
# accepts both and every caller names the cache through `CACHE_FIELD` / `output_cache`.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(out) -> Cache | None:
    """The KV cache a model output carries, under this transformers version's field name."""
    return getattr(out, CACHE_FIELD, None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


# -- positions ---------------------------------------------------------------------------------------------------

def rope_cos_sin(dim: int, theta: float, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [B, T, dim] for integer positions [B, T] (the 'default' RoPE of transformers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, D]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def sinusoidal_table(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


def t5_relative_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal (unidirectional) bucketing of key_pos - query_pos: exact for small distances, log-spaced after."""
    n = torch.clamp(-relative_position, min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return torch.where(is_small, n, large)


# -- masks -------------------------------------------------------------------------------------------------------

def allowed_mask(q_pos: torch.Tensor, k_len: int, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk]: key j visible to query i when j <= position(i) and key j is not padding.
    q_pos: [B, Tq] absolute positions of the queries (keys are 0..k_len-1 in cache order)."""
    k_idx = torch.arange(k_len, device=q_pos.device)
    allowed = k_idx[None, None, :] <= q_pos[:, :, None]
    if pad_mask is not None:
        allowed = allowed & pad_mask[:, None, :k_len].bool()
    return allowed[:, None]


def _sdpa(q, k, v, allowed, bias):
    """Scaled dot-product attention with an optional boolean mask and additive bias; native GQA."""
    gqa = k.shape[1] != q.shape[1]
    if bias is None and allowed is None:  # no cache offset: plain causal; one decoded token sees every key
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    mask = allowed
    if bias is not None:
        mask = bias.to(q.dtype) if allowed is None else bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# -- attention ---------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """MHA / GQA / MQA (and the projections NSA builds on)."""

    def __init__(self, config: EffLLMConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim = layer_idx, c.num_attention_heads, \
            c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def qkv(self, x, rope, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return q, k, v

    def forward(self, x, positions, rope, allowed, bias, cache):
        q, k, v = self.qkv(x, rope, cache)
        out = _sdpa(q, k, v, allowed, bias)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MLAttention(nn.Module):
    """Multi-head latent attention, weight-compatible with transformers' DeepseekV3Attention (rope_interleave=False)."""

    def __init__(self, config: EffLLMConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx, self.n_heads = layer_idx, c.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = c.q_lora_rank, c.kv_lora_rank
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        qk = self.nope + self.rope
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.qkv_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + self.rope, bias=c.qkv_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, c.hidden_size, bias=c.qkv_bias)

    def forward(self, x, positions, rope, allowed, bias, cache):
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope).transpose(1, 2)
        q_pass, q_rot = q.split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent).view(B, 1, T, self.kv_lora_rank)
        k_rot = k_rot.view(B, 1, T, self.rope)
        if rope is not None:
            q_rot, k_rot = apply_rope(q_rot, *rope), apply_rope(k_rot, *rope)
        if cache is not None:  # the cache holds the compressed latent and the shared rotary key
            latent, k_rot = cache.update(latent, k_rot, self.layer_idx)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, self.n_heads, -1, -1)], dim=-1)
        out = _sdpa(torch.cat([q_pass, q_rot], dim=-1), k, v, allowed, bias)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class NSAttention(Attention):
    """Native Sparse Attention on GQA projections; see the module docstring."""

    def __init__(self, config: EffLLMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        c = config
        self.block, self.n_sel, self.window = c.nsa_block_size, c.nsa_num_selected, c.nsa_window
        self.k_compress = nn.Linear(self.block * self.head_dim, self.head_dim, bias=False)
        self.v_compress = nn.Linear(self.block * self.head_dim, self.head_dim, bias=False)
        self.gate = nn.Linear(c.hidden_size, 3 * self.n_heads, bias=True)
        self.kernel = c.nsa_kernel

    def _flex_branches(self, q, k, v, sel_blocks):
        """The selected and sliding-window branches as FlexAttention over block masks (keys 0..T-1, causal):
        the same function as the reference's dense masks, computed by a fused kernel that skips unselected blocks."""
        from torch.nn.attention.flex_attention import create_block_mask

        B, H, T, _ = q.shape
        l, w, last = self.block, self.window, sel_blocks.shape[-1] - 1

        def selected(b, h, qi, ki):
            return (ki <= qi) & sel_blocks[b, h, qi, torch.clamp(ki // l, max=last)]

        def window(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < w)

        attend = _flex_attention(q.is_cuda)
        gqa = self.n_kv != self.n_heads
        sel = attend(q, k, v, block_mask=create_block_mask(selected, B, H, T, T, device=q.device), enable_gqa=gqa)
        win = attend(q, k, v, block_mask=create_block_mask(window, None, None, T, T, device=q.device), enable_gqa=gqa)
        return sel, win

    def forward(self, x, positions, rope, allowed, bias, cache):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, rope, cache)
        S, G, l = k.shape[2], self.n_heads // self.n_kv, self.block
        # FlexAttention needs plain causal attention over keys 0..T-1 (allowed None: no padding; S == T: no cache);
        # its CUDA kernel rejects head_dim < 16 (measured), where auto keeps the reference
        flex = allowed is None and S == T and (
            self.kernel == "flex" or (self.kernel == "auto" and x.is_cuda and self.head_dim >= 16))
        if flex and not x.is_cuda and torch.is_grad_enabled() and q.requires_grad:
            raise ValueError("nsa_kernel='flex' cannot train on CPU (torch's FlexAttention has no CPU backward); "
                             "use nsa_kernel='auto' (flex on CUDA only) or 'reference'")
        if allowed is None:
            allowed = allowed_mask(positions, S, None)
        scale = self.head_dim ** -0.5
        # compressed branch: block i summarises keys [i*l, (i+1)*l); query t sees it once the block is complete
        nb = S // l
        outs, gates = [], torch.sigmoid(self.gate(x)).view(B, T, self.n_heads, 3).permute(0, 2, 1, 3)
        kq = None if flex else k.repeat_interleave(G, dim=1)
        vq = None if flex else v.repeat_interleave(G, dim=1)
        block_of_key = torch.arange(S, device=x.device) // l
        if nb > 0:
            kc = self.k_compress(k[:, :, : nb * l].reshape(B, self.n_kv, nb, l * self.head_dim))
            vc = self.v_compress(v[:, :, : nb * l].reshape(B, self.n_kv, nb, l * self.head_dim))
            block_end = torch.arange(nb, device=x.device) * l + l - 1
            cmp_ok = block_end[None, None, None, :] <= positions[:, None, :, None]  # [B,1,T,nb]
            scores = (q @ kc.repeat_interleave(G, dim=1).transpose(-1, -2)) * scale
            scores = scores.masked_fill(~cmp_ok, float("-inf"))
            p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no complete block: zero
            outs.append(p @ vc.repeat_interleave(G, dim=1))
            # importance of each block for each query, shared by the heads of a KV group
            imp = p.view(B, self.n_kv, G, T, nb).sum(2).repeat_interleave(G, dim=1)  # [B,H,T,nb]
            top = imp.topk(min(self.n_sel, nb), dim=-1).indices
            sel_blocks = torch.zeros(B, self.n_heads, T, nb + 1, dtype=torch.bool, device=x.device)
            sel_blocks.scatter_(-1, top, imp.gather(-1, top) > 0)
        else:
            outs.append(torch.zeros_like(q))
            sel_blocks = torch.zeros(B, self.n_heads, T, 1, dtype=torch.bool, device=x.device)
        sel_blocks[..., 0] = True  # the first block
        cur = (positions // l).clamp(max=sel_blocks.shape[-1] - 1)
        sel_blocks.scatter_(-1, cur[:, None, :, None].expand(B, self.n_heads, T, 1), True)  # the current block
        if flex:
            outs.extend(self._flex_branches(q, k, v, sel_blocks))
        else:
            sel_mask = sel_blocks.gather(-1, block_of_key.clamp(max=sel_blocks.shape[-1] - 1)
                                         .expand(B, self.n_heads, T, S)) & allowed
            outs.append(F.scaled_dot_product_attention(q, kq, vq, attn_mask=sel_mask))
            win = allowed & (torch.arange(S, device=x.device)[None, None, None, :]
                             > positions[:, None, :, None] - self.window)
            outs.append(F.scaled_dot_product_attention(q, kq, vq, attn_mask=win))
        out = sum(gates[..., i, None] * o for i, o in enumerate(outs))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


_COMPILED_FLEX = None


def _flex_attention(cuda: bool):
    """FlexAttention: compiled on CUDA (its fast, fused kernel; inlined when the model itself is compiled), eager
    elsewhere (a reference that materialises the scores: for tests on CPU)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not cuda:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


# -- feed-forward ------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, hidden: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))


class Experts(nn.Module):
    """All experts' SwiGLU weights as 3-D tensors (Mixtral layout: gate and up stacked)."""

    def __init__(self, n_experts: int, hidden: int, inner: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inner))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d]; idx, weights [N, k] -> [N, d]. Dropless: every routed token is computed."""
        dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
        if x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") \
                and torch.cuda.get_device_capability(x.device) >= (9, 0):
            return self._grouped(x, idx, weights, dtype)
        return self._padded(x, idx, weights)

    def _grouped(self, x, idx, weights, dtype):
        """Hopper: tokens sorted by expert, one grouped GEMM per projection over jagged groups (no padding, no host
        sync, so torch.compile sees static shapes)."""
        N, k = idx.shape
        E = self.gate_up_proj.shape[0]
        sorted_e, order = torch.sort(idx.reshape(-1))
        token = order // k
        offs = torch.cumsum(torch.histc(sorted_e.int(), bins=E, min=0, max=E - 1), 0, dtype=torch.int32)
        gate, up = torch._grouped_mm(x[token].to(dtype), self.gate_up_proj.to(dtype).transpose(-2, -1),
                                     offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down_proj.to(dtype).transpose(-2, -1), offs=offs)
        contrib = y * weights.reshape(-1)[order, None].to(dtype)
        return torch.zeros_like(x).index_add_(0, token, contrib.to(x.dtype))

    def _padded(self, x, idx, weights):
        """Anywhere: tokens grouped by expert into a zero-padded [E, C, d] batch, all experts as two batched
        matmuls. C is the busiest expert's load; under torch.compile it is rounded up to a power of two so the graph
        sees few shapes (eager, the rounding would double the padded FLOPs at a typical load: the tiny MoE study's
        step measured 0.66 s rounded, 0.38 s exact)."""
        N, k = idx.shape
        E = self.gate_up_proj.shape[0]
        flat_e = idx.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        sorted_e = flat_e[order]
        counts = torch.bincount(flat_e, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(N * k, device=x.device) - starts[sorted_e]
        token = order // k
        C = int(counts.max())
        if torch.compiler.is_compiling():
            C = 1 << (C - 1).bit_length()
        batch = x.new_zeros(E, C, x.shape[-1])
        batch[sorted_e, rank] = x[token]
        gate, up = torch.bmm(batch, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2))
        contrib = y[sorted_e, rank] * weights.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, contrib.to(x.dtype))  # autocast: bmm gives bf16


class MoE(nn.Module):
    def __init__(self, config: EffLLMConfig):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.num_local_experts
        self.gate = Router(config.hidden_size, self.n_experts)
        self.experts = Experts(self.n_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x):
        B, T, d = x.shape
        h = x.reshape(-1, d)
        logits = F.linear(h, self.gate.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        out = self.experts(h, top_i, top_p).view(B, T, d)
        # Switch-Transformer balance loss: E * sum_e (fraction of assignments to e) * (mean router prob of e)
        frac = F.one_hot(top_i, self.n_experts).sum((0, 1)).float() / top_i.numel()  # no host sync
        aux = self.n_experts * (frac * probs.mean(0)).sum()
        return out, aux


# -- the model ---------------------------------------------------------------------------------------------------

ATTENTION_CLASSES = {"mha": Attention, "gqa": Attention, "mqa": Attention, "mla": MLAttention, "nsa": NSAttention}


def register_attention(name: str, cls: type[nn.Module]) -> None:
    """Make `attention: <name>` a valid config value built as `cls(config, layer_idx)` (docs/adding-a-technique.md).

    `cls` takes the arguments of `Attention` and its forward(x, positions, rope, allowed, bias, cache) returns the
    attention output [B, T, hidden]. FLOPs and KV bytes are counted as for grouped-query attention with the config's
    KV heads (measure.metrics); an attention whose matmuls differ adds its own branch there."""
    import importlib

    config_module = importlib.import_module("effllm_utils.models.config")  # (models.config is also a function)
    if name in ATTENTION_CLASSES and ATTENTION_CLASSES[name] is not cls:
        raise ValueError(f"attention {name!r} is already registered as {ATTENTION_CLASSES[name].__name__}")
    ATTENTION_CLASSES[name] = cls
    if name not in config_module.ATTENTIONS:
        config_module.ATTENTIONS = (*config_module.ATTENTIONS, name)


class DecoderLayer(nn.Module):
    def __init__(self, config: EffLLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ATTENTION_CLASSES[config.attention](config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.ffn == "moe" else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, positions, rope, allowed, bias, cache):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, allowed, bias, cache)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            return x + h[0], h[1]
        return x + h, None


class EffLLMPreTrainedModel(PreTrainedModel):
    config_class = EffLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (Router,)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
            nn.init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, EffLLMModel) and module.relative_bias is not None:
            nn.init.normal_(module.relative_bias.weight, mean=0.0, std=std)


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache passed under either name (see CACHE_FIELD); both at once is a caller's mistake."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once, as `cache` (or the older name `past_key_values`), not both")
    return cache if cache is not None else past_key_values


class EffLLMModel(EffLLMPreTrainedModel):
    def __init__(self, config: EffLLMConfig):
        super().__init__(config)
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size) \
            if c.position == "learned" else None
        if c.position == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(c.max_position_embeddings, c.hidden_size)
                                 * c.initializer_range, persistent=False)  # see the module docstring
        self.relative_bias = nn.Embedding(c.relative_num_buckets, c.num_attention_heads) \
            if c.position == "relative" else None
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                inputs_embeds=None, past_key_values=None, **kwargs):
        c = self.config
        past_key_values = _one_cache(cache, past_key_values)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        if c.position in ("learned", "sinusoidal") and int(position_ids.max()) >= c.max_position_embeddings:
            raise ValueError(f"position {int(position_ids.max())} is beyond max_position_embeddings "
                             f"{c.max_position_embeddings} of this {c.position} position encoding")
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        elif c.position == "sinusoidal":
            x = x + self.sinusoidal[position_ids].to(x.dtype)
        S = past + T
        # keys are in cache order 0..S-1; queries sit at cache slots past..past+T-1
        slots = torch.arange(past, S, device=x.device)[None].expand(B, T)
        pad = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        needs_mask = pad is not None or past > 0 or c.position == "relative"
        allowed = allowed_mask(slots, S, pad) if needs_mask and not (past > 0 and T == 1 and pad is None) else None
        bias = None
        if self.relative_bias is not None:
            rel = torch.arange(S, device=x.device)[None, :] - torch.arange(past, S, device=x.device)[:, None]
            buckets = t5_relative_bucket(rel, c.relative_num_buckets, c.relative_max_distance)
            bias = self.relative_bias(buckets).permute(2, 0, 1)[None]  # [1, H, T, S]
            if allowed is None:
                allowed = allowed_mask(slots, S, pad)
        aux = x.new_zeros(())
        rope = None  # cos/sin once per forward, shared by every layer
        if c.position == "rope":
            rope = rope_cos_sin(c.qk_rope_head_dim if c.attention == "mla" else c.head_dim, c.rope_theta,
                                position_ids, x.dtype)
        # NSA's blocks are laid out over cache slots; RoPE uses the (possibly padded) position ids
        for layer in self.layers:
            x, layer_aux = layer(x, slots, rope, allowed, bias, past_key_values)
            if layer_aux is not None:
                aux = aux + layer_aux
        return self.norm(x), past_key_values, aux


class EffLLMForCausalLM(EffLLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EffLLMConfig):
        super().__init__(config)
        self.model = EffLLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                past_key_values: Cache | None = None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        h, cache, aux = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=_one_cache(cache, past_key_values), use_cache=use_cache,
                                   inputs_embeds=inputs_embeds)
        loss = logits = None
        # training with ce_chunk: the head and the loss fused, chunk by chunk, no logits kept (models/loss.py);
        # only for a plain Linear head (a PEFT-wrapped one computes more than its weight)
        fused = (labels is not None and self.config.ce_chunk and torch.is_grad_enabled()
                 and type(self.lm_head) is nn.Linear)
        if not fused:
            logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        if labels is not None:
            # shift the labels, not the logits: slicing [B, T, vocab] logits would copy them
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
            if fused:
                loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, shifted.reshape(-1),
                                            self.config.ce_chunk)
            else:
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                                       ignore_index=-100)
            if self.config.ffn == "moe":
                loss = loss + self.config.router_aux_loss_coef * aux / self.config.num_hidden_layers
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
        out["aux_loss"] = aux
        return out

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the KV cache stores per token across all layers (MLA: the latent and the rotary key)."""
        from effllm_utils.measure.metrics import kv_bytes_per_token

        itemsize = (dtype or next(self.parameters()).dtype).itemsize
        return kv_bytes_per_token(self.config.shape(), itemsize)
