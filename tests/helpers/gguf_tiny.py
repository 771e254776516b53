"""A tiny Llama model and byte-level BPE tokenizer written to a GGUF file with the `gguf` package, in llama.cpp's
layout (tensor names, q/k rows permuted as llama.cpp's convert_hf_to_gguf does, Q4_1 2-D weights): the packaged
model's code path (models.packaged) runs on it in tests instead of the 93 MB SmolLM2 file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. Rough winds do shake the "
        "darling buds of May, and summer's lease hath all too short a date. ") * 8


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row order for q/k (the inverse of transformers' reverse permutation)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer(vocab_size: int = 320):
    from effllm_utils import data

    return data.train_tokenizer(vocab_size, min_frequency=1, texts=iter([TEXT]))


def llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def write(path: Path, model, tok, qtype: str = "Q4_1") -> Path:
    """`model` (LlamaForCausalLM, tied embeddings) and `tok` (byte-level BPE) as a GGUF file at `path`; 2-D weights in
    `qtype` (Q4_1 as SmolLM2's file, or F32), norms in F32."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        names |= {f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in parts.items()}
    q = getattr(gguf.GGMLQuantizationType, qtype)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied
        a = t.detach().float().numpy()
        if key.endswith("q_proj.weight"):
            a = _permute(a, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            a = _permute(a, c.num_key_value_heads)
        if a.ndim == 2 and q != gguf.GGMLQuantizationType.F32:
            w.add_tensor(names[key], gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(names[key], a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized(model, qtype: str = "Q4_1"):
    """`model` with each 2-D weight replaced by its `qtype` round trip (what a GGUF reader must give back)."""
    import gguf

    q = getattr(gguf.GGMLQuantizationType, qtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name != "lm_head.weight":
                a = p.detach().float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, q), q).reshape(a.shape)))
    return model
