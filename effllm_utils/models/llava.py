"""The LLaVA-style VLM: a CLIP vision tower, a projector and a causal LM, as transformers'
LlavaForConditionalGeneration.
"""
from __future__ import annotations


def build_llava(vision, text, image_token_id: int, projector_act: str = "gelu"):
    """LlavaForConditionalGeneration from a CLIP-style vision model and a transformers causal LM (weights copied):
    every feature of the encoder's last layer — the patches and the CLS token, which carries what the encoder was
    trained to classify ('full' strategy; LLaVA-1.5 drops CLS) — becomes one image token."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    n_tokens = (vision.config.image_size // vision.config.patch_size) ** 2 + 1  # the patches and CLS
    cfg = LlavaConfig(vision_config=vision.config.to_dict(), text_config=text.config.to_dict(),
                      image_token_id=image_token_id, projector_hidden_act=projector_act,
                      vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=n_tokens,
                      tie_word_embeddings=text.config.tie_word_embeddings)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    return model
