"""A fast decode path: a static KV cache and a fixed-shape one-token step, compiled and captured in a CUDA graph.

HF `generate` in eager mode spends almost all of a small model's decode time launching kernels from Python (an H100
decodes a Qwen2.5-1.5B shape at ~2% of the memory-bandwidth roofline that way). Here the KV cache is preallocated
([layers] x [B, kv_heads, max_len, head_dim]), the step writes the new K/V at the current position with
`index_copy_` and attends over the whole buffer under a position mask, so every tensor has a fixed shape and address:
the step can be `torch.compile`d and replayed as one CUDA graph per token.

    dec = StaticDecoder(model, batch_size=1, max_len=512, cuda_graph=True, compile=True)
    tokens, stamps = dec.generate(prompt_ids, new_tokens=128)

Works for the effllm backbone with mha/gqa/mqa + rope + dense FFN, and for `transformers` Qwen2-family checkpoints
(Qwen2.5, DeepSeek-R1-Distill-Qwen) through `from_qwen2`, which loads them weight-for-weight into the backbone.
On CPU the same step runs without graphs (and is what the tests compare against `generate`).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .runtime import synchronize


def from_qwen2(hf_model):
    """A transformers Qwen2ForCausalLM as an effllm backbone with the same weights (q/k/v biases kept)."""
    from . import models

    c = hf_model.config
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    cfg = models.EffLLMConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=theta, attention="gqa", position="rope", ffn="dense", qkv_bias=True,
        tie_word_embeddings=c.tie_word_embeddings)
    with torch.device(next(hf_model.parameters()).device):
        ours = models.EffLLMForCausalLM(cfg).to(hf_model.dtype)
    missing, unexpected = ours.load_state_dict(hf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not c.tie_word_embeddings]:
        raise ValueError(f"{type(hf_model).__name__} does not map onto the backbone: missing {missing}, "
                         f"unexpected {unexpected}")
    if c.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    return ours.eval()


class StaticDecoder:
    """Greedy decoding with a preallocated KV cache and a fixed-shape step (see the module docstring)."""

    def __init__(self, model, batch_size: int, max_len: int, cuda_graph: bool = True, compile: bool = False):
        c = model.config
        if c.attention not in ("mha", "gqa", "mqa") or c.position != "rope" or c.ffn != "dense":
            raise ValueError(f"StaticDecoder supports mha/gqa/mqa + rope + dense, not {c.attention}/{c.position}/"
                             f"{c.ffn}")
        self.model, self.c = model.eval(), c
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.B, self.max_len = batch_size, max_len
        self.gqa = bool(c.num_key_value_heads != c.num_attention_heads)  # a plain bool: dynamo must not trace it
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(c.num_hidden_layers)]
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=self.device,
                                                             dtype=torch.float32) / c.head_dim))
        self.slots = torch.arange(max_len, device=self.device)
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # static step inputs
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self._step_fn = torch.compile(self._step, fullgraph=True) if compile else self._step
        self.graph, self.out = None, None

    @torch.no_grad()
    def _step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m, c, B = self.model.model, self.c, self.B
        freqs = pos.float() * self.inv_freq
        emb = torch.cat((freqs, freqs))
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        mask = (self.slots <= pos)[None, None, None, :]
        x = m.embed_tokens(tok)
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(B, 1, c.num_attention_heads, c.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(B, 1, c.num_key_value_heads, c.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(B, 1, c.num_key_value_heads, c.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i].index_copy_(2, pos.view(1), k)
            self.v[i].index_copy_(2, pos.view(1), v)
            o = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask,
                                               enable_gqa=self.gqa)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(m.norm(x))[:, -1]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt through the model once and copy its K/V into the static cache; returns the last logits."""
        if ids.shape[0] != self.B or ids.shape[1] >= self.max_len:
            raise ValueError(f"prompt must be [{self.B}, < {self.max_len}], got {tuple(ids.shape)}")
        out = self.model(input_ids=ids, use_cache=True)
        for i, layer in enumerate(out.past_key_values.layers):
            self.k[i][:, :, :ids.shape[1]].copy_(layer.keys)
            self.v[i][:, :, :ids.shape[1]].copy_(layer.values)
        return out.logits[:, -1]

    def _capture(self) -> None:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up (and compilation) outside the graph
            for _ in range(3):
                self._step_fn(self.tok, self.pos)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step_fn(self.tok, self.pos)

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.fill_(pos)
        if not self.use_graph:
            return self._step_fn(self.tok, self.pos)
        if self.graph is None:
            saved = [t.clone() for t in self.k + self.v]  # capture runs the step: keep the cache intact
            self._capture()
            for t, s in zip(self.k + self.v, saved):
                t.copy_(s)
            self.tok.copy_(tok)
            self.pos.fill_(pos)
        self.graph.replay()
        return self.out

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[float]]:
        """Greedy tokens [B, new_tokens] and a synchronised timestamp after each one (the first after prefill)."""
        if ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"prompt {ids.shape[1]} + {new_tokens} new tokens exceed max_len {self.max_len}")
        synchronize(str(self.device))
        nxt = self.prefill(ids).argmax(-1, keepdim=True)
        synchronize(str(self.device))
        stamps, out = [time.perf_counter()], [nxt]
        for t in range(ids.shape[1], ids.shape[1] + new_tokens - 1):
            nxt = self.step(nxt, t).argmax(-1, keepdim=True)
            synchronize(str(self.device))
            stamps.append(time.perf_counter())
            out.append(nxt)
        return torch.cat(out, 1), stamps


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def weight_bytes(model) -> int:
    """Bytes read per decoded token by a memory-bound decoder: every parameter once (the roofline numerator)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def roofline_fraction(tokens_per_s_per_sequence: float, model, bandwidth_bytes_per_s: float) -> float:
    """Achieved / memory-bandwidth-bound decode rate at batch 1: tokens/s x weight bytes / bandwidth."""
    return tokens_per_s_per_sequence * weight_bytes(model) / bandwidth_bytes_per_s
