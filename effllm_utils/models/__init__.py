"""The effllm backbone (registered with transformers' Auto classes) and the attention-free baselines."""
from transformers import AutoConfig, AutoModelForCausalLM

from .config import ATTENTIONS, FFNS, POSITIONS, EffLLMConfig, config_fields_check
from .modeling import CACHE_FIELD, EffLLMForCausalLM, EffLLMModel, output_cache

AutoConfig.register("effllm", EffLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(EffLLMConfig, EffLLMForCausalLM, exist_ok=True)

# Named tiny configs (litgpt style) for tests and the tiny profile; studies override single fields.
NAMED_CONFIGS = {
    "test": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=128, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=8, nsa_block_size=4, nsa_num_selected=2, nsa_window=8,
                 num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=344, max_position_embeddings=512, kv_lora_rank=64, qk_nope_head_dim=32,
                 qk_rope_head_dim=16, v_head_dim=32, nsa_block_size=16, nsa_num_selected=4, nsa_window=64),
}


def config(name: str = "tiny", **overrides) -> EffLLMConfig:
    """A named config with fields overridden (`config("tiny", attention="mla")`)."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    config_fields_check(overrides, f"models.config({name!r})")
    return EffLLMConfig(**(NAMED_CONFIGS[name] | overrides))


__all__ = ["CACHE_FIELD", "output_cache", "ATTENTIONS", "FFNS", "POSITIONS", "EffLLMConfig", "EffLLMForCausalLM", "EffLLMModel", "config",
           "config_fields_check", "NAMED_CONFIGS"]
