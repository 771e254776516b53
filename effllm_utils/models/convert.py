"""Conversions: the backbone (MHA/GQA/MQA, RoPE, dense) as a transformers Qwen2 model, so quantizers and kernels that
know Qwen2 run on it unchanged (tested equal in logits).
"""
from __future__ import annotations

from pathlib import Path

import torch


def to_qwen2(model):
    """An effllm backbone (mha/gqa/mqa + rope + dense) as a transformers Qwen2ForCausalLM with the same weights (zero
    q/k/v biases where the backbone has none), its logits checked against the backbone's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model.config
    if c.attention not in ("mha", "gqa", "mqa") or c.position != "rope" or c.ffn != "dense":
        raise ValueError(f"only mha/gqa/mqa + rope + dense backbones export to Qwen2, not {c.attention}/{c.position}/"
                         f"{c.ffn}")
    ref = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)).eval()
    state = ref.state_dict()
    for k in state:
        state[k] = model.state_dict()[k] if k in model.state_dict() else torch.zeros_like(state[k])
    ref.load_state_dict(state)
    x = torch.arange(min(32, c.max_position_embeddings))[None] % c.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, model.eval()(x, use_cache=False).logits, atol=1e-4, rtol=1e-4)
    return ref


def export_qwen2(model, out_dir: Path, tok=None) -> Path:
    """Save an effllm backbone as a transformers Qwen2ForCausalLM checkpoint (see to_qwen2)."""
    ref = to_qwen2(model)
    ref.save_pretrained(out_dir)
    if tok is not None:
        tok.save_pretrained(out_dir)
    return out_dir
