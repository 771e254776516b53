"""The effllm backbone (registered with transformers' Auto classes) and the attention-free baselines."""
from transformers import AutoConfig, AutoModelForCausalLM

from effllm_utils.models.config import ATTENTIONS, FFNS, POSITIONS, EffLLMConfig, config_fields_check
from effllm_utils.models.modeling import CACHE_FIELD, EffLLMForCausalLM, EffLLMModel, output_cache, register_attention

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


# Named model scales for params files (`scales: {"1.5B": "qwen2.5-1.5b"}`): the dimensions of the paper's backbones
# (Qwen2.5 model cards), of the gpu profile's 0.3B model and of DiT-B/L/XL (Peebles & Xie, with GQA 4 KV heads).
_QWEN_CONTEXT = {"max_position_embeddings": 8192}
SCALES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, **_QWEN_CONTEXT),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, **_QWEN_CONTEXT),
    "qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008, **_QWEN_CONTEXT),
    "gpu-0.3b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                     intermediate_size=2048, max_position_embeddings=2048),
    "dit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048),
    "dit-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816),
    "dit-xl": dict(hidden_size=1152, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=4,
                   intermediate_size=3072),
}


def scale_dims(value, where: str = "scales") -> dict:
    """One entry of a study's `scales`: model dimensions (EffLLMConfig fields), a name from SCALES, or
    {"scale": name, ...overrides}. Returns the dimensions; an unknown name is a ValueError listing the known ones."""
    if isinstance(value, str):
        value = {"scale": value}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: a scale is a dict of model dimensions or a scale name, not {value!r}")
    if "scale" not in value:
        return value
    name = value["scale"]
    if name not in SCALES:
        raise ValueError(f"{where}: unknown scale name {name!r}; known: {', '.join(SCALES)}")
    return SCALES[name] | {k: v for k, v in value.items() if k != "scale"}


def config(name: str = "tiny", **overrides) -> EffLLMConfig:
    """A named config with fields overridden (`config("tiny", attention="mla")`)."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    config_fields_check(overrides, f"models.config({name!r})")
    return EffLLMConfig(**(NAMED_CONFIGS[name] | overrides))


__all__ = ["CACHE_FIELD", "output_cache", "ATTENTIONS", "FFNS", "POSITIONS", "EffLLMConfig", "EffLLMForCausalLM",
           "EffLLMModel", "config",
           "config_fields_check", "NAMED_CONFIGS", "SCALES", "scale_dims", "register_attention"]
