"""EffLLMConfig: one decoder family whose attention, position encoding and feed-forward are config values.

Everything else — pre-norm RMSNorm, SwiGLU, the residual stream, the head — stays identical across variants, so a
study changes exactly one thing. Field names follow `transformers`' Qwen2 / DeepSeek-V3 / Mixtral configs so that
their weights load into this model unchanged (the parity tests do exactly that).
"""
from __future__ import annotations

from transformers import PretrainedConfig

ATTENTIONS = ("mha", "gqa", "mqa", "mla", "nsa")
# NSA's selected and sliding-window branches: dense-mask SDPA (reference), FlexAttention block-sparse kernels
# (flex), or auto = flex on CUDA when training/prefilling without padding, the reference otherwise
NSA_KERNELS = ("auto", "reference", "flex")
POSITIONS = ("rope", "sinusoidal", "learned", "relative", "none")
FFNS = ("dense", "moe")


class EffLLMConfig(PretrainedConfig):
    model_type = "effllm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size: int = 4096, hidden_size: int = 256, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, num_key_value_heads: int | None = None, head_dim: int | None = None,
                 intermediate_size: int = 688, max_position_embeddings: int = 2048, rms_norm_eps: float = 1e-6,
                 rope_theta: float = 10000.0, attention: str = "gqa", position: str = "rope", ffn: str = "dense",
                 qkv_bias: bool = False,
                 # MLA (DeepSeek-V2/V3 naming)
                 q_lora_rank: int | None = None, kv_lora_rank: int = 64, qk_nope_head_dim: int = 32,
                 qk_rope_head_dim: int = 16, v_head_dim: int = 32,
                 # NSA (Yuan et al. 2025, "Native Sparse Attention")
                 nsa_block_size: int = 16, nsa_num_selected: int = 4, nsa_window: int = 64,
                 nsa_kernel: str = "auto",
                 # relative position bias (T5)
                 relative_num_buckets: int = 32, relative_max_distance: int = 128,
                 # MoE (Mixtral naming)
                 num_local_experts: int = 8, num_experts_per_tok: int = 2, moe_intermediate_size: int | None = None,
                 router_aux_loss_coef: float = 0.01,
                 # training loss: 0 = cross-entropy over the full logits; N = fused head + loss, N tokens at a time
                 ce_chunk: int = 0,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = False, use_cache: bool = True,
                 bos_token_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 **kwargs):
        for name, value, allowed in (("attention", attention, ATTENTIONS), ("position", position, POSITIONS),
                                     ("ffn", ffn, FFNS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if hidden_size % num_attention_heads and head_dim is None:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads "
                             f"{num_attention_heads}; set head_dim")
        if attention == "mha":
            num_key_value_heads = num_attention_heads
        elif attention == "mqa":
            num_key_value_heads = 1
        elif num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} must be a multiple of num_key_value_heads "
                             f"{num_key_value_heads}")
        if nsa_kernel not in NSA_KERNELS:
            raise ValueError(f"unknown nsa_kernel {nsa_kernel!r}; choose one of {', '.join(NSA_KERNELS)}")
        if ffn == "moe" and not 1 <= num_experts_per_tok <= num_local_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_local_experts={num_local_experts}], "
                             f"got {num_experts_per_tok}")
        if attention == "mla" and position == "rope" and qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {qk_rope_head_dim}")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.rms_norm_eps, self.rope_theta = rms_norm_eps, rope_theta
        self.attention, self.position, self.ffn, self.qkv_bias = attention, position, ffn, qkv_bias
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.nsa_block_size, self.nsa_num_selected, self.nsa_window = nsa_block_size, nsa_num_selected, nsa_window
        self.nsa_kernel = nsa_kernel
        self.relative_num_buckets, self.relative_max_distance = relative_num_buckets, relative_max_distance
        self.num_local_experts, self.num_experts_per_tok = num_local_experts, num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.router_aux_loss_coef = router_aux_loss_coef
        if ce_chunk < 0:
            raise ValueError(f"ce_chunk must be 0 (plain cross-entropy) or a positive number of tokens, got {ce_chunk}")
        self.ce_chunk = ce_chunk
        self.initializer_range, self.use_cache = initializer_range, use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    def shape(self):
        """The effllm_utils.measure.metrics.TransformerShape of this config (for FLOPs and KV bytes)."""
        from effllm_utils.measure.metrics import TransformerShape

        return TransformerShape(
            d_model=self.hidden_size, n_layers=self.num_hidden_layers, n_heads=self.num_attention_heads,
            n_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, vocab_size=self.vocab_size,
            d_ff=self.intermediate_size, attention=self.attention,
            n_experts=self.num_local_experts if self.ffn == "moe" else 1, top_k=self.num_experts_per_tok,
            moe_d_ff=self.moe_intermediate_size, q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim, nsa_block=self.nsa_block_size, nsa_selected=self.nsa_num_selected,
            nsa_window=self.nsa_window)


def config_fields_check(fields, where: str = "EffLLMConfig") -> None:
    """Raise ValueError naming any key of `fields` that is not an EffLLMConfig argument (with the closest valid
    name). EffLLMConfig itself takes unknown keys (`transformers` passes its own when loading a checkpoint), so a
    typo in a study's params (`atention: mla`) would otherwise train the default model under the wrong name."""
    from effllm_utils import check_keys, config_args

    check_keys(fields, config_args(EffLLMConfig), where, "config key")
